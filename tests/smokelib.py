"""What the scripts run inside scripts/debian13-smoke's root share (standard library
only, and vmwn: the root has no pytest)."""

import os
import subprocess
import time

from vmwn.domain import domain_name
from vmwn.state import job_dir


def read_text(path):
    """The file's text ("" when there is none)."""
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def poll(probe, timeout, every=0.5):
    """Call ``probe`` until it returns something true or ``timeout`` seconds have
    passed; its last value."""
    end = time.monotonic() + timeout
    while True:
        got = probe()
        if got or time.monotonic() > end:
            return got
        time.sleep(every)


def leftovers(cfg, job):
    """The job's state directory and libvirt domain, if they are left."""
    left = [p for p in (job_dir(cfg, job),) if os.path.lexists(p)]
    cp = subprocess.run(["virsh", "-c", cfg.site["libvirt_uri"], "list", "--all", "--name"],
                        capture_output=True, text=True, timeout=60)
    return left + [d for d in cp.stdout.split() if d == domain_name(job)]
