"""The job starter's side of the job's warden socket (vmwn.warden, vmwn.keeper).

Kept apart from the warden, which loads the whole boot (libvirt, the images'
keys, cryptography): a starter imports this alone, so that what stays resident
for the job's life is small.
"""

import json
import os
import socket

from . import errors
from .errors import SiteError, VmwnError


class short_path:
    """A name for ``path`` that fits a Unix socket address (108 bytes on Linux):
    ``/proc/self/fd/N/NAME`` through an open descriptor of its directory."""

    def __init__(self, path):
        self.dir, self.name = os.path.split(path)
        self.fd = None

    def __enter__(self):
        # O_PATH: the job user may search its job directory (0711), not read it.
        self.fd = os.open(self.dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        return f"/proc/self/fd/{self.fd}/{self.name}"

    def __exit__(self, *exc):
        os.close(self.fd)


def wait_answer(path, timeout=None):
    """The starter's side: connect to the warden and read its answer.

    Returns (answer dict, socket); the socket stays open for the job's life
    (its closing tells the warden the job ended).
    """
    gone = ("the job's warden ended before the guest was ready",
            "the site should look at the node's syslog for the job")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with short_path(path) as short:
            s.connect(short)
    except OSError as e:
        s.close()
        raise SiteError(f"{gone[0]} ({e.strerror})", gone[1]) from None
    s.settimeout(timeout)
    buf = b""
    while b"\n" not in buf:
        try:
            chunk = s.recv(65536)
        except InterruptedError:
            continue
        if not chunk:
            s.close()
            raise SiteError(*gone) from None
        buf += chunk
    s.settimeout(None)
    return json.loads(buf.split(b"\n", 1)[0]), s


def answer_error(answer):
    """The VmwnError a failure answer carries."""
    cls = getattr(errors, answer.get("kind", ""), None)
    if not (isinstance(cls, type) and issubclass(cls, VmwnError)):
        cls = SiteError
    return cls(answer.get("problem") or "the job's virtual machine could not be started",
               answer.get("fix"))


def open_connection(wsock, timeout=30.0):
    """The starter's side of ``connect``: a socket connected to the guest's forward,
    opened by the job's warden in libvirt's network namespace.  Raises
    ConnectionRefusedError when the warden could not connect."""
    wsock.settimeout(timeout)
    try:
        wsock.sendall(b"connect\n")
        data, fds, _, _ = socket.recv_fds(wsock, 1, 1)
    finally:
        wsock.settimeout(None)
    if data != b"1" or not fds:
        for fd in fds:
            os.close(fd)
        raise ConnectionRefusedError("the job's warden could not connect to the guest")
    s = socket.socket(fileno=fds[0])
    s.settimeout(timeout)
    return s
