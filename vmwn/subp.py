"""The one place vmwn runs other programs.

Everything goes through :func:`run`: argv lists only (never a shell), a
timeout, and failures turned into one-line errors.  Tests replace nothing here;
they forbid unexpected commands by wrapping ``subprocess.Popen`` instead.
"""

import logging
import subprocess

from .errors import SiteError

# Where system programs live: batch daemons run their hooks with PATH=/bin:/usr/bin,
# which lacks iptables, debugfs and iproute2's bridge.
SBIN = "/usr/sbin:/sbin:/usr/bin:/bin"

log = logging.getLogger(__name__)


class ProcessFailed(SiteError):
    """A helper program exited non-zero; carries its status and stderr."""

    def __init__(self, argv, status, stderr, fix):
        self.argv, self.status, self.stderr = argv, status, stderr
        tail = " ".join((stderr or "").strip().splitlines()[-2:])[-300:]
        super().__init__(f"{argv[0]} exited {status}: {tail or 'no message'}", fix)


def run(argv, *, input=None, timeout=600, check=True, env=None, cwd=None,
        fix="see the operator log", capture=True):
    """Run ``argv``; return CompletedProcess with text stdout/stderr."""
    argv = [str(a) for a in argv]
    log.debug("run: %s", " ".join(argv))
    try:
        cp = subprocess.run(argv, input=input, timeout=timeout, env=env, cwd=cwd,
                            stdout=subprocess.PIPE if capture else None,
                            stderr=subprocess.PIPE if capture else None,
                            text=True, errors="replace")
    except FileNotFoundError:
        raise SiteError(f"{argv[0]} is not installed", "run 'make deps'") from None
    except subprocess.TimeoutExpired:
        raise SiteError(f"{argv[0]} did not finish within {timeout:.0f} s", fix) from None
    if check and cp.returncode != 0:
        raise ProcessFailed(argv, cp.returncode, cp.stderr, fix)
    return cp
