"""Landlock: a process that may write only where it is told (Linux 5.13+).

Used for the one program vmwn runs on a filesystem a job controlled: debugfs
reading a lost guest's disk (``offline``).  ctypes and three system calls, so
that no extra package is needed.
"""

import ctypes
import logging
import os
import struct

from .errors import SiteError

log = logging.getLogger(__name__)

_SYS_CREATE, _SYS_ADD_RULE, _SYS_RESTRICT = 444, 445, 446     # x86_64 and aarch64 alike
_PR_SET_NO_NEW_PRIVS = 38
_WRITE_FILE, _TRUNCATE, _REFER = 1 << 1, 1 << 14, 1 << 13
_DIR_WRITES = (1 << 1) | (1 << 4) | (1 << 5) | sum(1 << i for i in range(6, 13))


def confine(writable, *files):
    """Allow this process and its children to write only below ``writable``, to ``files``
    and to /dev/null.

    Returns False (and logs) when the kernel has no Landlock: the process is
    then bounded only by the job user's own rights.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(ctypes.c_long(_SYS_CREATE), None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        log.warning("Landlock is not available (%s); debugfs runs unconfined as the job user",
                    os.strerror(ctypes.get_errno()))
        return False
    handled = _DIR_WRITES | (_REFER if abi >= 2 else 0) | (_TRUNCATE if abi >= 3 else 0)
    attr = ctypes.create_string_buffer(struct.pack("<Q", handled), 8)
    rfd = libc.syscall(ctypes.c_long(_SYS_CREATE), attr, ctypes.c_size_t(8), ctypes.c_uint32(0))
    if rfd < 0:
        raise SiteError(f"cannot create a Landlock ruleset: {os.strerror(ctypes.get_errno())}",
                        "see the operator log")
    try:
        rules = [(writable, handled, os.O_DIRECTORY)] + [
            (f, handled & (_WRITE_FILE | _TRUNCATE), 0) for f in (os.devnull,) + files]
        for path, rights, flags in rules:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC | flags)
            try:
                rule = ctypes.create_string_buffer(struct.pack("<Qi", rights, fd), 12)
                if libc.syscall(ctypes.c_long(_SYS_ADD_RULE), ctypes.c_int(rfd),
                                ctypes.c_int(1), rule, ctypes.c_uint32(0)) != 0:
                    raise SiteError(f"cannot add a Landlock rule for {path}: "
                                    f"{os.strerror(ctypes.get_errno())}", "see the operator log")
            finally:
                os.close(fd)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or \
                libc.syscall(ctypes.c_long(_SYS_RESTRICT), ctypes.c_int(rfd),
                             ctypes.c_uint32(0)) != 0:
            raise SiteError(f"cannot enforce Landlock: {os.strerror(ctypes.get_errno())}",
                            "see the operator log")
    finally:
        os.close(rfd)
    return True
