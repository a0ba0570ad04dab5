"""Per-job disks: a qcow2 overlay on the environment's read-only base image.

Creating an overlay writes only a header, so it costs the same for a 200 MB
and a 20 GB base; the base is opened read-only by QEMU and never written.
"""

import json
import os

from . import subp
from .errors import SiteError


def overlay_path(cfg, job_id):
    from .state import safe_name
    return os.path.join(cfg.site["overlay_dir"], safe_name(job_id) + ".qcow2")


def base_format(base):
    """The base image's format as qemu-img sees it (qcow2 or raw)."""
    cp = subp.run(["qemu-img", "info", "--output=json", "-U", base], timeout=30,
                  fix=f"check that {base} is a disk image")
    try:
        return json.loads(cp.stdout)["format"]
    except (ValueError, KeyError):
        raise SiteError(f"qemu-img cannot read {base}", "rebuild the environment's image") from None


def create_overlay(cfg, job_id, base, timeout=60):
    """Create the job's overlay; raises SiteError when the base is missing or unreadable."""
    if not os.path.isfile(base):
        raise SiteError(f"base image {base} is missing",
                        "build it ('vmwn image build ENV') or fix the environment's image key")
    os.makedirs(cfg.site["overlay_dir"], mode=0o711, exist_ok=True)
    if os.stat(cfg.site["overlay_dir"]).st_mode & 0o111 != 0o111:
        os.chmod(cfg.site["overlay_dir"], 0o711)  # made under a umask of 077: QEMU must reach it
    path = overlay_path(cfg, job_id)
    if os.path.lexists(path):
        os.unlink(path)  # a leftover of an earlier attempt of the same job id
    fmt = "qcow2" if base.endswith(".qcow2") else base_format(base)
    subp.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt, "-b", base, path],
             timeout=timeout, fix="check the overlay directory and the base image")
    return path


def remove(path):
    """Remove an overlay; True if one was there."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
