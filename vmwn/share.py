"""The job's host directories inside its guest, served with the job user's rights only.

Mounted mode gives the guest the job's working directory, its home and the
site's shared paths at the same paths as on the host, over virtio-fs, so
output lands on the host as it is written.  Each path is served by its own
``virtiofsd`` that runs as the job's uid: it is started in a user namespace
whose only mapped ids are the job user's uid and gid, so its capabilities
(which virtiofsd needs for its chroot sandbox and to act as the guest's
caller) reach only inodes the job user owns, and everything else is checked
against the job user's own uid and groups.  A guest whose kernel the job
subverts gets no more than that user has on the host; a guest process of any
other uid (root included) cannot create files at all (virtiofsd cannot take
an unmapped id).

The launcher first enters the directory as the job user (the access check that
counts); the path reaches virtiofsd's option parser with every punctuation
character backslash-escaped, so a comma in a path cannot add an option.  The
listening socket is made here, owned by the job's user (QEMU runs as it) and
passed by descriptor; QEMU connects at domain start and virtiofsd exits when
that connection closes.  :func:`stop` ends what is left.
"""

import ctypes
import dataclasses
import os
import signal
import re
import socket
import time

from . import interrupt, subp
from .usage import start_time, stat_fields
from .errors import SiteError, UserError
from .logsetup import job_logger

# "auto": the first of these that exists.  The Rust daemon (Debian 13's virtiofsd
# package, and any distribution's since QEMU 8 dropped its own) and the C one of
# QEMU 7.2 and older (Debian 12) take other options; Daemon.argv speaks to each.
VIRTIOFSD = "auto"
CANDIDATES = ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd")
# What virtiofsd logs (at level info; the C daemon of QEMU <= 7.2 and the Rust one
# alike) just before it waits for QEMU on its socket.  Its log, not its state in
# /proc, tells: /proc/PID/syscall numbers and wchan names differ by architecture
# and kernel.
WAITING = b"Waiting for vhost-user socket connection"
TAG_PREFIX = "vmwn"
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNS = 0x00020000
_MS_BIND, _MS_REC, _MS_SLAVE = 0x1000, 0x4000, 0x80000
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_RAISE = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
# What virtiofsd keeps for itself (chown, dac_override, fowner, fsetid, setgid,
# setuid, mknod, setfcap) plus sys_chroot for its sandbox and setpcap so it
# may drop the rest: all of them confined to the job's user namespace.
_CAPS = (0, 1, 3, 4, 6, 7, 8, 18, 27, 31)


@dataclasses.dataclass
class Share:
    path: str     # host path, also the guest mount point
    tag: str      # virtio-fs tag the guest mounts
    socket: str   # vhost-user socket QEMU connects to
    pid: int = 0  # its virtiofsd
    inode: int = 0  # of its listening socket (closed once QEMU has connected)
    started: int = 0  # the pid's start time, to know that pid is still ours


def plan(workdir, home, site_paths):
    """The host directories to mount: the job's working directory, its home and
    the site's paths that exist on this node, minus those inside another one.
    The order is the mount order (parents first).  A home that does not exist
    on this node is left out (the guest then has its own, as a native job
    would find none); a missing working directory is the job's problem."""
    paths = ([workdir] if workdir else []) + [p for p in (home, *site_paths)
                                                if p and os.path.isdir(p)]
    norm = sorted({os.path.normpath(p) for p in paths}, key=lambda p: (p.count("/"), p))
    out = []
    for p in norm:
        if p == "/" or any(p == q or p.startswith(q.rstrip("/") + "/") for q in out):
            continue
        out.append(p)
    return out


def check_mountable(paths):
    """UserError for the first of ``paths`` a guest cannot be told to mount: the path
    reaches the guest's set-up (its seed) as text, so it must be UTF-8 (what lies
    below it need not be)."""
    for p in paths:
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:
            shown = os.fsencode(p).decode("utf-8", "backslashreplace")
            raise UserError(f"{shown} cannot be mounted in the virtual machine: its path is "
                            "not UTF-8", "submit from a directory below your home or with a "
                            "UTF-8 path, or ask for an environment with data = copy") from None


def shares_for(job_dir, paths):
    return [Share(path=p, tag=f"{TAG_PREFIX}{i}", socket=os.path.join(job_dir, f"fs{i}.sock"))
            for i, p in enumerate(paths)]


@dataclasses.dataclass(frozen=True)
class Daemon:
    """A virtiofsd and which of the two kinds it is."""
    path: str
    rust: bool
    version: str

    def inner(self, uid):
        """The id the job's ``uid`` (or gid) has inside virtiofsd's user namespace.
        The C daemon runs as the job's own uid there, with the capabilities it needs
        as ambient ones.  The Rust daemon refuses its chroot sandbox to any uid but
        0, so there the job's uid is 0 (namespace root: its capabilities reach only
        what the job user owns, as the C daemon's do) and :meth:`argv` translates
        the guest's ids to it.  Its namespace denies setgroups, so it keeps the job
        user's supplementary groups (it drops them where it may, and a process
        without them would be checked as "other" against a file of one of them:
        sometimes more than the user may).  The C daemon exits when it cannot drop
        them (QEMU's fix of CVE-2022-0358), so it serves the primary group only."""
        return 0 if self.rust else uid

    def argv(self, sh, uid, gid):
        """Serve share ``sh`` on descriptor _FD in a chroot, no cache (the host sees the
        job's writes as they happen), logging at info (:data:`WAITING`), with the
        descriptor limit the launcher set.

        The Rust daemon (1.13) serves only a directory whose canonical path is UTF-8:
        it gets the share bound at :func:`mount_point` (vmwn's name) in a mount
        namespace of its own, so a path of any bytes is served and none reaches its
        argv.  It maps the guest's ``uid``/``gid`` to the namespace's 0 and refuses
        every other guest id (as the C daemon does, which cannot take an id its
        namespace does not map)."""
        if self.rust:
            ids = []
            for opt, n in (("--translate-uid", uid), ("--translate-gid", gid)):
                ids += [f"{opt}=map:{n}:0:1"]
                if n > 0:
                    ids += [f"{opt}=forbid-guest:0:{n}"]
                if n < _ID_MAX:
                    ids += [f"{opt}=forbid-guest:{n + 1}:{_ID_MAX - n}"]
            return ["virtiofsd", f"--fd={_FD}", f"--shared-dir={mount_point(sh)}",
                    "--sandbox=chroot", "--cache=never", "--log-level=info",
                    "--rlimit-nofile=0"] + ids
        return ["virtiofsd", f"--fd={_FD}", "-o", "source=" + fuse_escape(sh.path),
                "-o", "sandbox=chroot", "-o", "cache=none", "-o", "log_level=info",
                "--rlimit-nofile=0"]


def mount_point(sh):
    """Where the Rust daemon sees share ``sh``: a directory of the job's (made by
    :func:`_launch`), in its own mount namespace only."""
    return os.path.join(os.path.dirname(sh.socket), f"{sh.tag}.root")


def serves(argv, sh=None, *, path=None, job_dir=None):
    """``argv`` (a /proc cmdline, split at NULs) is a virtiofsd's that serves share
    ``sh`` (in either daemon's words), or: the directory ``path`` (the C daemon
    names it) or any share of the job directory ``job_dir`` (the Rust daemon names
    its mount point there)."""
    if not argv or os.path.basename(argv[0]) != b"virtiofsd":
        return False
    if sh is not None:
        path, points = sh.path, [b"--shared-dir=" + os.fsencode(mount_point(sh))]
    else:
        points = []
    if path is not None and b"source=" + os.fsencode(fuse_escape(path)) in argv:
        return True
    if any(a in points for a in argv):
        return True
    prefix = b"--shared-dir=" + os.fsencode(os.path.join(job_dir, "")) if job_dir else None
    return bool(prefix) and any(a.startswith(prefix) for a in argv)


def serving(job_dir, paths=()):
    """Pids of live (not zombie) virtiofsd processes of the job whose directory is
    ``job_dir``: the Rust daemon names its mount point there, the C one names the
    directory it serves (one of ``paths``).  What a teardown must have ended."""
    pids = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        fields = stat_fields(int(p))
        if fields and fields[0] != "Z" and any(
                serves(argv, path=path, job_dir=job_dir) for path in (*paths, None)):
            pids.append(int(p))
    return pids


_daemons = {}


def daemon(configured=VIRTIOFSD):
    """The :class:`Daemon` at ``configured`` ([site] virtiofsd; ``auto``: the first of
    :data:`CANDIDATES`), its kind from its ``--version`` ("virtiofsd version 7.2.22"
    is QEMU's C daemon, "virtiofsd 1.13.2" the Rust one).  SiteError when there is
    none or it answers neither way."""
    paths = CANDIDATES if configured == "auto" else (configured,)
    path = next((p for p in paths if os.access(p, os.X_OK)), None)
    if path is None:
        raise SiteError(f"no virtiofsd at {' or '.join(paths)}",
                        "install virtiofsd (Debian 13) or qemu-system-common (Debian 12) "
                        "with 'make deps', or set [site] virtiofsd")
    st = os.stat(path)
    key = (path, st.st_ino, st.st_mtime_ns)
    if key not in _daemons:
        cp = subp.run([path, "--version"], timeout=30, check=False,
                      fix="check [site] virtiofsd")
        first = (cp.stdout or cp.stderr or "").strip().splitlines()[:1]
        m = re.match(r"virtiofsd (version )?v?(\d+\.\d+\S*)", first[0] if first else "")
        if cp.returncode != 0 or not m:
            raise SiteError(f"{path} is no virtiofsd that vmwn knows: --version said "
                            f"{(first or ['nothing'])[0][:100]!r}", "check [site] virtiofsd")
        _daemons[key] = Daemon(path=path, rust=not m.group(1), version=m.group(2))
    return _daemons[key]


def start(st, shares, virtiofsd=VIRTIOFSD):
    """Start one virtiofsd per share as the job user; fills in ``Share.pid``.

    Raises UserError naming the path if the job user cannot enter it, SiteError
    if virtiofsd cannot be started.  On error nothing started is left running.
    """
    log = job_logger(__name__, st.job_id)
    if not shares:
        return shares
    virtiofsd = daemon(virtiofsd)
    try:
        for sh in shares:
            sh.pid = _launch(st, sh, virtiofsd)
            sh.started = start_time(sh.pid)
            log.info("virtiofsd %d serves %s as tag %s", sh.pid, sh.path, sh.tag)
    except BaseException:
        stop(st, shares)
        raise
    return shares


def stop(st, shares, timeout=5.0):
    """End the virtiofsd of each share (if still ours) and remove its socket (and mount
    point). Idempotent.  A daemon QEMU has connected to no longer holds its socket and
    ends when QEMU hangs up, in its own time: it is ended here all the same, and is
    gone (or a zombie of this process) when this returns."""
    log = job_logger(__name__, st.job_id)
    live = []
    for sh in shares:
        if sh.pid > 0 and _is_ours(sh):
            try:
                os.kill(sh.pid, signal.SIGTERM)
                live.append(sh)
            except ProcessLookupError:
                pass
    end = time.monotonic() + timeout
    for sh in live:
        while time.monotonic() < end and _is_ours(sh):
            time.sleep(0.05)
        if _is_ours(sh):
            log.warning("virtiofsd %d ignored SIGTERM; killing it", sh.pid)
            try:
                os.kill(sh.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            dead = time.monotonic() + timeout  # SIGKILL cannot be ignored: not long
            while time.monotonic() < dead and _is_ours(sh):
                time.sleep(0.05)
    for sh in shares:
        try:
            os.unlink(sh.socket)
        except FileNotFoundError:
            pass
        try:
            os.rmdir(mount_point(sh))  # the Rust daemon's; bound in its namespace only
        except OSError:
            pass
        if sh.pid > 0:
            try:
                os.waitpid(sh.pid, os.WNOHANG)  # our child when started by this process
            except ChildProcessError:
                pass


def health(shares):
    """One clause per share on what became of its virtiofsd (for a QEMU that could not
    connect to one): still waiting on its socket, gone (its log's last line), or
    running but no longer on its socket."""
    out = []
    for sh in shares:
        fields = stat_fields(sh.pid) if sh.pid > 0 else None
        if _is_ours(sh) and _socket_inode(sh.pid) == sh.inode:
            what = "waits on its socket"
        elif not fields or fields[0] == "Z":
            what = f"has exited ({_log_tail(sh) or 'its log is empty'})"
        else:
            what = f"runs (state {fields[0]}) but no longer on its socket"
        out.append(f"virtiofsd {sh.pid} for {sh.path} {what}")
    return "; ".join(out) or "no virtiofsd"


def _log_path(sh):
    """Where the share's virtiofsd writes (its job directory)."""
    return os.path.join(os.path.dirname(sh.socket), f"{sh.tag}.log")


def _log_tail(sh):
    try:
        with open(_log_path(sh), "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 300))
            lines = f.read().decode("utf-8", "replace").strip().splitlines()
    except OSError:
        return ""
    said = [line for line in lines if not any(m in line for m in _PROGRESS)] or lines
    return " ".join(said[-1].split()) if said else ""


# virtiofsd's own progress at log level info, never the reason it ended.
_PROGRESS = (WAITING.decode(), "Received vhost-user socket connection", "virtio_loop: Entry",
             "virtio_loop: Exit", "Client connected, servicing requests")


def _is_ours(sh):
    """The pid is still the virtiofsd of this share (pids are reused): a live one, of
    the start time recorded (a record without it: still on the share's socket)."""
    try:
        with open(f"/proc/{sh.pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    fields = stat_fields(sh.pid)
    if not fields or fields[0] == "Z" or os.path.basename(argv[0]) != b"virtiofsd":
        return False
    if sh.started:
        return start_time(sh.pid) == sh.started
    return _socket_inode(sh.pid) == sh.inode


def _socket_inode(pid):
    try:
        link = os.readlink(f"/proc/{pid}/fd/{_FD}")
    except OSError:
        return -1
    return int(link[8:-1]) if link.startswith("socket:[") else -1


_FD = 3  # the listening socket's number in virtiofsd
_ID_MAX = 0xFFFFFFFE  # the highest uid or gid ((uid_t) -1 is none)
_READY = b"\0"  # the child has its user namespace (an error message never starts so)


def _listen(path, uid):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        s.bind(path)
    finally:
        os.umask(old)
    os.chown(path, uid, -1)  # the job's QEMU runs as the job's user; nobody else connects
    s.listen(1)
    return s


def _launch(st, sh, virtiofsd):
    """Fork virtiofsd into a user namespace holding only the job's ids (see module doc)."""
    if virtiofsd.rust:
        os.makedirs(mount_point(sh), mode=0o700, exist_ok=True)  # empty, root's
    lsock = _listen(sh.socket, st.uid)
    sh.inode = os.fstat(lsock.fileno()).st_ino
    groups = _groups(st)
    to_child_r, to_child_w = os.pipe()
    to_parent_r, to_parent_w = os.pipe2(os.O_CLOEXEC)
    log_path = _log_path(sh)
    try:
        log_start = os.stat(log_path).st_size  # a restart appends to the same log
    except OSError:
        log_start = 0
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        import fcntl
        code = 1
        try:
            os.close(to_child_w)
            os.close(to_parent_r)
            high = fcntl.fcntl(to_parent_w, fcntl.F_DUPFD_CLOEXEC, 64)  # clear of _FD
            os.close(to_parent_w)
            to_parent_w = high
            _child(st, sh, lsock.fileno(), groups, to_child_r, to_parent_w, log_path, virtiofsd)
        except BaseException as e:  # noqa: BLE001 - report and leave, never return
            try:
                os.write(to_parent_w, _reason(e).encode("utf-8", "replace")[:1000])
            except OSError:
                pass
        os._exit(code)
    os.close(to_child_r)
    os.close(to_parent_w)
    lsock.close()
    try:
        ready = os.read(to_parent_r, 1)  # the child has its own user namespace
        if ready == _READY:
            if virtiofsd.rust:  # it then keeps the job user's groups (see Daemon.inner)
                with open(f"/proc/{pid}/setgroups", "w") as f:
                    f.write("deny\n")
            with open(f"/proc/{pid}/uid_map", "w") as f:
                f.write(f"{virtiofsd.inner(st.uid)} {st.uid} 1\n")
            with open(f"/proc/{pid}/gid_map", "w") as f:
                f.write(f"{virtiofsd.inner(st.gid)} {st.gid} 1\n")
            os.write(to_child_w, b"g")
            msg = _read_all(to_parent_r)  # empty: exec succeeded
        else:
            msg = ready + _read_all(to_parent_r)
    except OSError as e:
        msg = f"cannot set up virtiofsd's user namespace: {e.strerror}".encode()
    finally:
        os.close(to_child_w)
        os.close(to_parent_r)
    if msg:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
        text = msg.decode("utf-8", "replace")
        if text.startswith("user:"):
            raise UserError(f"{sh.path} cannot be shared with the virtual machine: {text[5:]}",
                            "submit from a directory you can enter, or ask for the copy mode")
        raise SiteError(f"virtiofsd for {sh.path} did not start: {text}",
                        "see the node's log; user namespaces must be enabled "
                        "(user.max_user_namespaces > 0)")
    try:
        _await_accept(pid, sh, log_path, log_start)
    except BaseException:  # not started, or a stop request: no record will name this pid
        _kill(pid)
        raise
    return pid


def _kill(pid):
    """SIGKILL and reap the child ``pid``, unless it has been reaped (its pid may be
    another process's by now)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0]:
            return
    except ChildProcessError:
        return
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _await_accept(pid, sh, log_path, log_start=0, timeout=10.0):
    """Return once virtiofsd waits for QEMU on its socket (it has logged
    :data:`WAITING` past ``log_start``); SiteError if it exits first.  A waiting point
    of the boot (vmwn.interrupt)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        interrupt.check()
        if _logged(log_path, log_start, WAITING):
            return
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            raise SiteError(f"virtiofsd for {sh.path} exited at once "
                            f"({_log_tail(sh) or f'status {status}'})",
                            f"check {log_path} and [site] virtiofsd")
        time.sleep(0.005)
    raise SiteError(f"virtiofsd for {sh.path} did not start within {timeout:.0f} s",
                    "the node may be overloaded")


def _logged(log_path, start, marker):
    """``marker`` is in the log at ``log_path`` past offset ``start``."""
    try:
        with open(log_path, "rb") as f:
            f.seek(start)
            return marker in f.read(1 << 16)
    except OSError:
        return False


def fuse_escape(text):
    """``text`` as one libfuse option value: punctuation backslash-escaped."""
    return "".join("\\" + c if c.isascii() and not (c.isalnum() or c in "/._-") else c
                   for c in text)


def _read_all(fd):
    chunks = []
    while True:
        b = os.read(fd, 4096)
        if not b:
            return b"".join(chunks)
        chunks.append(b)


def _reason(e):
    if isinstance(e, UserError):
        return "user:" + e.problem
    if isinstance(e, OSError):
        return f"{e.strerror or e}"
    return f"{type(e).__name__}: {e}"


def _groups(st):
    try:
        return os.getgrouplist(st.user, st.gid)
    except (KeyError, OSError):
        return [st.gid]


def _child(st, sh, lfd, groups, to_child_r, to_parent_w, log_path, virtiofsd):  # pragma: no cover
    import resource
    libc = ctypes.CDLL(None, use_errno=True)
    os.setsid()
    # virtiofsd holds a descriptor for every inode the guest has looked up: a
    # job making 100k files needs 100k.  Up to 1M (virtiofsd's own default) if
    # root may raise the hard limit here, else the hard limit pbs_mom passed on.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1 << 20 if hard == resource.RLIM_INFINITY else max(hard, 1 << 20)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # Opened as root: the job directory is root's.
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    null = os.open("/dev/null", os.O_RDWR)
    os.setgroups(groups)
    if libc.unshare(_CLONE_NEWUSER) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER): "
                      + os.strerror(ctypes.get_errno()))
    os.write(to_parent_w, _READY)
    if os.read(to_child_r, 1) != b"g":
        raise OSError(0, "the id maps were not written")
    os.close(to_child_r)
    gid, uid = virtiofsd.inner(st.gid), virtiofsd.inner(st.uid)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    try:
        os.chdir(sh.path)  # as the job user: the only check that counts
    except OSError as e:
        raise UserError(e.strerror or str(e), "") from None
    if virtiofsd.rust:  # namespace root has its capabilities; see Daemon.argv
        _bind_here(libc, mount_point(sh))
    else:
        _ambient_caps(libc)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    if lfd != _FD:
        os.dup2(lfd, _FD)
    os.set_inheritable(_FD, True)
    os.closerange(_FD + 1, to_parent_w)  # to_parent_w itself closes on exec
    os.closerange(to_parent_w + 1, 65536)
    os.execve(virtiofsd.path, virtiofsd.argv(sh, st.uid, st.gid),
              {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _bind_here(libc, target):  # pragma: no cover - runs in the child
    """Bind the working directory (the share, entered as the job user) at ``target``
    in a mount namespace of virtiofsd's own."""
    def call(what, rc):
        if rc != 0:
            raise OSError(ctypes.get_errno(), f"{what}: " + os.strerror(ctypes.get_errno()))
    call("unshare(CLONE_NEWNS)", libc.unshare(_CLONE_NEWNS))
    # Slave, not private: a host mount that goes (an automount) goes here too.
    call("making / a slave", libc.mount(None, b"/", None, _MS_REC | _MS_SLAVE, None))
    call(f"binding the share at {target}",
         libc.mount(b".", os.fsencode(target), None, _MS_BIND | _MS_REC, None))


def _ambient_caps(libc):  # pragma: no cover - runs in the child
    """Keep _CAPS across exec as a non-root uid (ambient set; namespaced caps)."""
    hdr, data = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0), (_CapData * 2)()
    if libc.capget(ctypes.byref(hdr), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    inh = 0
    for c in _CAPS:
        inh |= 1 << c
    data[0].inheritable, data[1].inheritable = inh, 0
    if libc.capset(ctypes.byref(hdr), data) != 0:
        raise OSError(ctypes.get_errno(), "capset: " + os.strerror(ctypes.get_errno()))
    for c in _CAPS:
        if libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, c, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), f"ambient capability {c}: "
                          + os.strerror(ctypes.get_errno()))
