"""Forwarded SSH ports on the loopback address, allocated without races.

Concurrent prologues on one node serialise on a lock file; a port is taken if
a live job's state record holds it or if something else is bound to it.  The
caller records its port in its state record before releasing the lock.
"""

import contextlib
import errno
import fcntl
import os
import socket

from . import state as statemod
from .errors import TransientError


@contextlib.contextmanager
def flocked(path):
    """Hold an exclusive flock on the root-only file ``path`` (made if missing)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def locked(cfg):
    """Hold the node-wide allocation lock (blocking; held for milliseconds)."""
    return flocked(os.path.join(statemod.ensure_root(cfg), ".ports.lock"))


def _free(address, port):
    fam = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        try:
            s.bind((address, port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def pick(cfg, taken_extra=()):
    """A port of [site] port_range that no job holds and nothing listens on.

    Must be called with :func:`locked` held.
    """
    lo, hi = cfg.site["port_range"]
    taken = {st.port for st in statemod.all_jobs(cfg)} | set(taken_extra)
    for port in range(lo, hi + 1):
        if port not in taken and _free(cfg.site["bind_address"], port):
            return port
    raise TransientError(f"no free SSH port in {lo}-{hi} on {cfg.site['bind_address']}",
                         "wait for jobs to end or widen [site] port_range")
