"""Logging: one line per lifecycle step, carrying the job id, to syslog for operators.

Modules log with ``logging.getLogger(__name__)`` and pass the job id through
:func:`job_logger`, so every line names its job without string formatting at
each call site.
"""

import logging
import logging.handlers
import os
import sys

_FMT = "%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s"


class JobAdapter(logging.LoggerAdapter):
    def process(self, msg, kwargs):
        return f"job {self.extra['job_id']}: {msg}", kwargs


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (it may be replaced after setup)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def job_logger(name, job_id):
    return JobAdapter(logging.getLogger(name), {"job_id": job_id})


def setup(verbose=False, syslog=True, debug_log=None, stderr=True):
    """Configure the root logger once per process."""
    root = logging.getLogger()
    if getattr(root, "_vmwn_configured", False):
        return
    root._vmwn_configured = True
    root.setLevel(logging.DEBUG)
    if stderr:
        h = _CurrentStderr()
        h.setLevel(logging.DEBUG if verbose else logging.WARNING)
        h.setFormatter(logging.Formatter("vmwn: %(levelname)s %(message)s"))
        root.addHandler(h)
    if syslog and os.path.exists("/dev/log"):
        try:
            s = logging.handlers.SysLogHandler(address="/dev/log",
                                               facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        except OSError:
            s = None
        if s:
            s.setLevel(logging.INFO)
            s.setFormatter(logging.Formatter("vmwn[%(process)d]: %(message)s"))
            root.addHandler(s)
    if debug_log:
        try:
            f = logging.FileHandler(debug_log)
        except OSError:
            f = None
        if f:
            f.setLevel(logging.DEBUG)
            f.setFormatter(logging.Formatter(_FMT))
            root.addHandler(f)
    for noisy in ("paramiko",):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def restart(syslog=True, debug_log=None):
    """Close the handlers a forked child inherited and set up syslog and the debug
    log again, without stderr (for the job's warden).  Returns the descriptors the
    new handlers use, which the caller must keep open."""
    root = logging.getLogger()
    for h in root.handlers[:]:
        root.removeHandler(h)
        h.close()
    root._vmwn_configured = False
    setup(syslog=syslog, debug_log=debug_log, stderr=False)
    if not root.handlers:
        root.addHandler(logging.NullHandler())
    fds = set()
    for h in root.handlers:
        for obj in (getattr(h, "stream", None), getattr(h, "socket", None)):
            try:
                fds.add(obj.fileno())
            except (AttributeError, OSError, ValueError):
                pass
    return fds
