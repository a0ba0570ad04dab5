"""Run a function as another user in a forked child; get its result back through a pipe.

Root hooks (the epilogue) must touch the user's files with the user's rights
only: a child process drops to the job user for good (supplementary groups,
gid, then uid), does the work, and reports a JSON result or a vmwn error to
the parent.  The parent never touches the user's files itself.
"""

import json
import logging
import os
import select
import signal
import time

from . import errors

log = logging.getLogger(__name__)

_MAX_REPLY = 16 << 20


def drop_to(user, uid, gid):
    """Irrevocably become ``uid``/``gid`` with ``user``'s groups (call only in a child)."""
    try:
        groups = os.getgrouplist(user, gid)
    except (KeyError, OSError):
        groups = [gid]
    os.setgroups(groups)
    os.setgid(gid)
    os.setuid(uid)
    if uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            raise errors.SiteError(f"dropping privileges to uid {uid} is reversible",
                                   "check the kernel's capability settings")
    if os.getuid() != uid or os.geteuid() != uid or os.getegid() != gid:
        raise errors.SiteError(f"could not become uid {uid} gid {gid}",
                               "check the job's user in the state record")


def _encode_error(exc):
    if isinstance(exc, errors.VmwnError):
        return {"class": type(exc).__name__, "problem": exc.problem, "fix": exc.fix,
                "base": next(c.__name__ for c in type(exc).__mro__
                             if c in (errors.UserError, errors.SiteError,
                                      errors.TransientError, errors.GuestLost,
                                      errors.VmwnError))}
    return {"class": "SiteError", "base": "SiteError",
            "problem": f"unexpected {type(exc).__name__} as the job's user: {exc}",
            "fix": "see the operator log"}


def _decode_error(d):
    cls = getattr(errors, d.get("base") or "SiteError", errors.SiteError)
    if not (isinstance(cls, type) and issubclass(cls, errors.VmwnError)):
        cls = errors.SiteError
    return cls(d.get("problem") or "failed as the job's user", d.get("fix"))


def _child(wfd, user, uid, gid, func, args):
    status = 0
    try:
        drop_to(user, uid, gid)
        reply = {"ok": func(*args)}
    except BaseException as exc:  # noqa: BLE001 - everything goes to the parent
        log.error("as %s: %s", user, exc, exc_info=not isinstance(exc, errors.VmwnError))
        reply, status = {"error": _encode_error(exc)}, 1
    try:
        data = json.dumps(reply).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(wfd, view):]
    except BaseException:  # noqa: BLE001 - the parent reports a silent child
        status = 2
    finally:
        os._exit(status)


TERM_GRACE = 3.0


def _terminate(pid, rfd):
    """SIGTERM (the child may clean up after itself), SIGKILL after TERM_GRACE."""
    os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + TERM_GRACE
    while time.monotonic() < end:
        ready, _, _ = select.select([rfd], [], [], max(0.0, end - time.monotonic()))
        if ready and not os.read(rfd, 65536):
            return  # it exited
    os.kill(pid, signal.SIGKILL)


def run_as(user, uid, gid, func, *args, timeout=None):
    """Call ``func(*args)`` as ``user`` in a child; return its JSON-able result.

    Errors raised in the child come back as the same vmwn error class.  After
    ``timeout`` seconds the child is terminated (SIGTERM, then SIGKILL) and
    TransientError raised.
    """
    for stream in logging.getLogger().handlers:
        stream.flush()
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        _child(wfd, user, uid, gid, func, args)
    os.close(wfd)
    deadline = None if timeout is None else time.monotonic() + timeout
    buf, killed, finished = bytearray(), False, False
    try:
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                _terminate(pid, rfd)
                killed = True
                break
            ready, _, _ = select.select([rfd], [], [], left)
            if not ready:
                continue
            chunk = os.read(rfd, 65536)
            if not chunk:
                break
            buf += chunk
            if len(buf) > _MAX_REPLY:
                os.kill(pid, signal.SIGKILL)
                raise errors.SiteError(f"the child running as {user} sent too much",
                                       "see the operator log")
        finished = True
    finally:
        os.close(rfd)
        if not finished:
            # Interrupted (the hook's SIGTERM, a KeyboardInterrupt) or gave up:
            # a child still at work would make the wait below endless.
            os.kill(pid, signal.SIGKILL)
        _, wstatus = os.waitpid(pid, 0)
    if killed:
        raise errors.TransientError(f"work as {user} did not finish within {timeout:.0f} s",
                                    "the guest may be hung; see the operator log")
    try:
        reply = json.loads(bytes(buf).decode())
    except ValueError:
        raise errors.SiteError(f"the child running as {user} died (wait status {wstatus}) "
                               "without a result", "see the operator log") from None
    if "error" in reply:
        raise _decode_error(reply["error"])
    return reply.get("ok")
