"""Network namespaces: where the guest's forwarded SSH port can be reached.

QEMU's user networking forwards the guest's port 22 on ``bind_address`` in the
network namespace of the process that runs QEMU, which is libvirt's (libvirt's
daemon starts it).  A batch daemon confined to a namespace of its own (the test
cluster's OpenPBS, in ``vmwn-pbs``, whose 127.0.0.1 is another loopback) runs
its hooks and jobs there.  So vmwn's root processes of a job (the batch system's
hooks, the warden) enter libvirt's namespace first (:func:`enter_libvirts`);
the job starter, which runs as the job's user and may not enter it, gets a
socket connected there from the warden (vmwn.wardenclient.open_connection).  Where
both are the same namespace, as on any ordinary node, nothing changes.

A namespace is named by its ``readlink /proc/PID/ns/net`` text (``net:[INODE]``).
"""

import ctypes
import os
import socket
import struct
from urllib.parse import parse_qs, urlsplit

from .errors import SiteError

CLONE_NEWNET = 0x40000000
# The local daemons' sockets for qemu:///system: modular (virtqemud), monolithic (libvirtd).
_SYSTEM_SOCKETS = ("/run/libvirt/virtqemud-sock", "/run/libvirt/libvirt-sock")


def of(pid="self"):
    """The network namespace of ``pid`` ("net:[N]"), or "" when it cannot be read."""
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return ""


def current():
    return of("self")


def is_other(name):
    """True when ``name`` (a namespace, or "" for unknown) is not this process's."""
    return bool(name) and name != current()


def libvirt_sockets(uri):
    """The Unix sockets of a local libvirt URI's daemon, most likely first; () for a
    remote one (its QEMU's namespace is not this host's to enter)."""
    parts = urlsplit(uri)
    if parts.netloc or "+" in parts.scheme:
        return ()
    given = parse_qs(parts.query).get("socket")
    if given:
        return tuple(given)
    if parts.scheme == "qemu" and parts.path == "/system":
        return _SYSTEM_SOCKETS
    return ()


def libvirt_pid(uri):
    """The pid of the daemon serving ``uri`` (its socket's peer), or 0 when unknown."""
    for path in libvirt_sockets(uri):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(5)
            s.connect(path)
            pid, _, _ = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET,
                                                         socket.SO_PEERCRED,
                                                         struct.calcsize("3i")))
            if pid > 0:
                return pid
        except OSError:
            continue
        finally:
            s.close()
    return 0


# This process's first network namespace (the node's: where the batch daemon
# runs), kept open when :func:`enter` leaves it, for what must be made there (a
# job network's VXLAN socket, vmwn.jobnet).
_origin_fd = -1


def origin():
    """A path naming the network namespace this process started in, when it has
    left it (for ``nsenter --net=``); None while it is still there."""
    return f"/proc/{os.getpid()}/fd/{_origin_fd}" if _origin_fd >= 0 else None


def enter(pid):
    """Move this process (all of it: call before any thread starts) into ``pid``'s
    network namespace."""
    global _origin_fd
    libc = ctypes.CDLL(None, use_errno=True)
    here = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC) if _origin_fd < 0 else -1
    try:
        fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        if here >= 0:
            os.close(here)
        raise SiteError(f"cannot open the network namespace of libvirt's daemon (pid {pid}): "
                        f"{e.strerror}", "run vmwn's hooks as root") from None
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            if here >= 0:
                os.close(here)
            raise SiteError(f"cannot enter the network namespace of libvirt's daemon (pid "
                            f"{pid}): {os.strerror(err)}",
                            "run vmwn's hooks as root (setns needs CAP_SYS_ADMIN)")
    finally:
        os.close(fd)
    if here >= 0:
        _origin_fd = here


def at_origin(fn, *args):
    """``fn(*args)`` in the namespace this process started in (the batch daemon's,
    where its server is reached), back here after; plainly where it never left."""
    if _origin_fd < 0:
        return fn(*args)
    libc = ctypes.CDLL(None, use_errno=True)
    here = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(_origin_fd, CLONE_NEWNET) != 0:
            return fn(*args)  # cannot go back (never seen): ask from here
        try:
            return fn(*args)
        finally:
            if libc.setns(here, CLONE_NEWNET) != 0:
                raise SiteError("cannot return to libvirt's network namespace: "
                                f"{os.strerror(ctypes.get_errno())}", "report this as a bug")
    finally:
        os.close(here)


def back_to_origin():
    """Return for good to the namespace this process started in (a child about to
    act in the batch daemon's namespace, as another user)."""
    if _origin_fd >= 0:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(_origin_fd, CLONE_NEWNET) != 0:
            raise SiteError("cannot return to the batch daemon's network namespace: "
                            f"{os.strerror(ctypes.get_errno())}", "report this as a bug")


def enter_libvirts(uri):
    """Enter the network namespace of the libvirt daemon serving ``uri`` when it is
    not this process's; returns True if this process moved.  A daemon that cannot be
    found leaves the process where it is (libvirt's own error comes later)."""
    pid = libvirt_pid(uri)
    if not pid:
        return False
    theirs = of(pid)
    if not theirs or theirs == current():
        return False
    enter(pid)
    return True


__all__ = ["current", "is_other", "of", "origin", "at_origin", "back_to_origin",
           "libvirt_pid", "enter", "enter_libvirts"]
