"""Copy the job's files between the host and its guest over SSH.

Stage-in (job starter, as the job user): PBS_O_WORKDIR goes into the guest's
working directory before the job runs, in the one tar stream that also
carries vmwn's control files (:func:`prepare`).  Harvest (epilogue, as root):
a child that has dropped to the job user copies back what the job created or
changed.

File-system rules, both directions:

* Only regular files, directories and (stage-in only) symlinks are copied.
  Host symlinks inside PBS_O_WORKDIR are recreated in the guest as symlinks
  with their target text untouched, never followed; guest symlinks are never
  copied back, so harvest writes nothing but guest content.
* Modes (without set-id bits on harvest) and mtimes are preserved.
* Harvest never writes through a host symlink: every directory is opened with
  O_NOFOLLOW relative to its parent, files are written to a temporary name and
  renamed within the same directory, and an existing symlink in the way is left
  alone and reported.
* The guest's control directory (``~/.vmwn``: job script, pidfile, manifest)
  is never harvested.  The manifest records every staged-in file (size,
  mtime), and harvest skips files that are unchanged since stage-in.
"""

import collections
import dataclasses
import errno
import json
import logging
import os
import posixpath
import re
import stat
import time

from .errors import GuestLost, SiteError, TransientError, UserError
from .guestfiles import HOME_CONTROL_DIR as CONTROL, MANIFEST

log = logging.getLogger(__name__)

# The guest's own files, relative to the job user's home there: the control
# directory and the per-job key that lets the starter and the epilogue in.
# A job submitted from $HOME must neither overwrite them at stage-in (its own
# ~/.ssh/authorized_keys would lock vmwn out) nor get them back at harvest.
GUEST_OWN = (CONTROL, ".ssh/authorized_keys")


def guest_own(home):
    """Absolute guest paths of :data:`GUEST_OWN` for the guest home ``home``."""
    return frozenset(posixpath.join(home, p) for p in GUEST_OWN)
# Applied when the job starter recorded no umask: nothing comes back group- or
# world-writable that the job did not ask for.
DEFAULT_UMASK = 0o022
CHUNK = 32768
# Seconds before its hard timeout that a harvest stops itself and reports.
STOP_MARGIN = 10.0
_MAX_MANIFEST = 64 << 20
_MAX_PROBLEMS = 50


def _fmt(n):
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _sftp_errors():
    import paramiko
    return (IOError, OSError, EOFError, paramiko.SSHException)


# --------------------------------------------------------------------- stage-in

@dataclasses.dataclass
class StageResult:
    files: int = 0
    dirs: int = 0
    links: int = 0
    bytes: int = 0
    skipped: list = dataclasses.field(default_factory=list)
    manifest: dict = dataclasses.field(default_factory=lambda: {"files": {}, "dirs": [],
                                                                 "umask": DEFAULT_UMASK})


def scan_host(host_dir, max_bytes):
    """Walk ``host_dir`` without following symlinks: list of (rel, kind, lstat).

    Raises UserError when the regular files add up to more than ``max_bytes``,
    before anything is copied.
    """
    try:
        top = os.lstat(host_dir)
    except OSError as e:
        raise UserError(f"cannot read the job's working directory {host_dir}: {e.strerror}",
                        "submit from a directory readable on the execution host") from None
    if not stat.S_ISDIR(top.st_mode):
        raise UserError(f"the job's working directory {host_dir} is not a directory",
                        "submit from a directory") from None
    entries, total, skipped = [], 0, []

    stack = [(host_dir, "")]
    while stack:  # iterative: any depth; one directory open at a time
        path, rel = stack.pop()
        try:
            with os.scandir(path) as it:
                names = sorted(it, key=lambda e: e.name)
        except OSError as e:
            if not rel:  # the job would run in an empty directory and lose its output
                raise UserError(f"cannot read the job's working directory {host_dir}: "
                                f"{e.strerror}", "make it readable by you, or submit from "
                                "another directory") from None
            skipped.append(f"{printable(rel)}: {e.strerror}")
            continue
        subdirs = []
        for e in names:
            r = posixpath.join(rel, e.name) if rel else e.name
            try:
                st = e.stat(follow_symlinks=False)
            except OSError as ex:
                skipped.append(f"{printable(r)}: {ex.strerror}")
                continue
            if stat.S_ISDIR(st.st_mode):
                entries.append((r, "dir", st))
                subdirs.append((e.path, r))
            elif stat.S_ISREG(st.st_mode):
                entries.append((r, "file", st))
                total += st.st_size
                if total > max_bytes:
                    raise UserError(
                        f"the job's working directory {host_dir} holds more than "
                        f"{_fmt(max_bytes)}, the most that is copied into the virtual machine",
                        "submit from a smaller directory (qsub -d) or ask the site to raise "
                        "[site] stage_in_max")
            elif stat.S_ISLNK(st.st_mode):
                entries.append((r, "link", st))
            else:
                skipped.append(f"{printable(r)}: not a regular file, directory or symlink")
        stack.extend(reversed(subdirs))
    return entries, total, skipped


@dataclasses.dataclass
class Prepared:
    """What the job starter learns from preparing the guest."""
    staged: StageResult = None   # copy mode's stage-in, else None
    has_shell: bool = True       # the job's shell exists in the guest
    has_tmpdir: bool = False     # $TMPDIR (the host's) is a directory there
    proc_mounts: str = ""        # the guest's /proc/mounts, when asked for


# Run by the guest user's (POSIX) shell with one tar stream on its stdin: the
# control directory and the working directory (made 0700 where missing), the
# stream unpacked at / (its names are relative to /), then one line for the job
# starter (does the job's shell exist, is $TMPDIR a directory) and, when asked,
# the guest's mount table.  Only the shell's builtins besides mkdir and tar:
# every process a guest starts costs it milliseconds under TCG.
PREPARE = ('for d in {dirs}; do [ -d "$d" ] || (umask 077 && mkdir -p -- "$d") '
           '|| {{ echo "vmwn-mkdir $d" >&2; exit 3; }}; done; '
           'tar -xf - -C / || exit 4; '
           'if [ -e {shell} ]; then s=1; else s=0; fi; '
           'if [ -n {tmp} ] && [ -d {tmp} ]; then t=1; else t=0; fi; '
           'echo "vmwn-prepared shell=$s tmp=$t"{mounts}')
_MOUNTS = '; while IFS= read -r l; do printf "%s\\n" "$l"; done < /proc/mounts'


def _member(path):
    """A tar member name for the absolute guest ``path`` (unpacked at /)."""
    return "./" + path.lstrip("/")


def prepare(guest, ctl, control_files, workdir=None, host_dir=None, max_bytes=0,
            home=None, shell="/bin/sh", tmpdir=None, mounts=False, umask=DEFAULT_UMASK):
    """Make the guest ready for the job in one command over one channel (runs as the
    job user): vmwn's control directory ``ctl`` with ``control_files`` in it (name,
    bytes, mode; the copy mode's manifest is added last, with the job's ``umask``
    that harvest applies), and, with ``host_dir``, the host's working directory
    copied into ``workdir``.  Returns Prepared.

    One tar stream into the guest's tar, so many small files cost what they cost
    ``tar | ssh tar``: any depth, names that are not UTF-8, symlinks as symlinks
    (never followed).  The guest's own files below ``home`` (its key, vmwn's
    control directory) are never overwritten by the job's.
    """
    import shlex
    import tarfile
    staged = None
    if host_dir is not None:
        entries, _total, skipped = scan_host(host_dir, max_bytes)
        staged = StageResult(skipped=list(skipped))
        staged.manifest["umask"] = umask
    dirs = " ".join(shlex.quote(d) for d in (ctl, workdir) if d)
    chan = guest.exec(PREPARE.format(dirs=dirs, shell=shlex.quote(shell),
                                     tmp=shlex.quote(tmpdir or ""),
                                     mounts=_MOUNTS if mounts else ""))
    writer = _ChannelWriter(chan)
    what = f"copying {host_dir} into the virtual machine" if host_dir is not None else \
        "preparing the job in the virtual machine"
    out = bytearray()
    try:
        with tarfile.open(fileobj=writer, mode="w|", format=tarfile.GNU_FORMAT,
                          encoding="utf-8", errors="surrogateescape") as tf:
            if staged is not None:
                _stage(tf, entries, host_dir, workdir, max_bytes, guest_own(home or ctl),
                       staged)
                control_files = list(control_files) + [
                    (MANIFEST, json.dumps(staged.manifest, separators=(",", ":")).encode(),
                     0o600)]
            now = int(time.time())
            for name, data, mode in control_files:
                info = tarfile.TarInfo(_member(posixpath.join(ctl, name)))
                info.size, info.mode, info.mtime = len(data), mode, now
                info.uid, info.gid = os.getuid(), os.getgid()
                tf.addfile(info, _BytesReader(data))
        chan.shutdown_write()
        status, err = _finish(chan, out=out)
    except (OSError, EOFError) as e:
        status, err = _finish(chan, out=out)
        if status not in (3, 4):
            why = _first_line(err) or " ".join(str(e).split()) or type(e).__name__
            raise GuestLost(f"{what} failed: {why}",
                            "the virtual machine may be out of disk space or lost") from None
    if status == 3:  # the shell's mkdir said why on stderr, then PREPARE said which
        named = [ln[len("vmwn-mkdir "):] for ln in err.decode("utf-8", "surrogateescape")
                 .splitlines() if ln.startswith("vmwn-mkdir ")]
        d = named[-1] if named else (workdir or ctl)
        if d == ctl:
            raise SiteError(f"cannot make vmwn's directory {d} in the virtual machine",
                            "check the environment's image (the job user's home)")
        raise UserError(f"cannot make the working directory {d} in the virtual machine "
                        f"({_mkdir_why(err)})", "choose another working directory (qsub -d)")
    if status != 0:
        raise GuestLost(f"{what} failed: {_first_line(err) or f'exit status {status}'}",
                        "the virtual machine may be out of disk space") from None
    text = bytes(out).decode("utf-8", "surrogateescape")
    head, _, rest = text.partition("\n")
    m = re.fullmatch(r"vmwn-prepared shell=([01]) tmp=([01])", head.strip())
    if not m:
        raise GuestLost(f"{what} failed: the guest answered {head.strip()[:100]!r}",
                        "the virtual machine's shell is not a POSIX shell")
    if staged is not None:
        log.info("staged in %d files, %d dirs, %d links, %d bytes from %s",
                 staged.files, staged.dirs, staged.links, staged.bytes, host_dir)
    return Prepared(staged=staged, has_shell=m.group(1) == "1", has_tmpdir=m.group(2) == "1",
                    proc_mounts=rest)


def _mkdir_why(err):
    """mkdir's own reason (its message's last part), else a generic one."""
    for line in err.decode("utf-8", "backslashreplace").splitlines():
        if "mkdir" in line and ":" in line:
            return line.rsplit(":", 1)[1].strip()[:200]
    return "a part of it is not a directory, or not writable"


def _stage(tf, entries, host_dir, workdir, max_bytes, guests, res):
    """The working directory's members, below ``workdir``; fills ``res``."""
    import tarfile
    for rel, kind, st in entries:
        dst = posixpath.join(workdir, rel)
        if dst in guests or any(dst.startswith(o + "/") for o in guests):
            continue
        info = tarfile.TarInfo(_member(dst))
        info.mtime, info.uid, info.gid = int(st.st_mtime), st.st_uid, st.st_gid
        info.mode = stat.S_IMODE(st.st_mode)
        if kind == "dir":
            info.type, info.mode = tarfile.DIRTYPE, info.mode | 0o700
            tf.addfile(info)
            res.dirs += 1
            res.manifest["dirs"].append(dst)
        elif kind == "link":
            info.type = tarfile.SYMTYPE
            try:
                info.linkname = os.readlink(os.path.join(host_dir, rel))
            except OSError as e:
                res.skipped.append(f"{printable(rel)}: {e.strerror}")
                continue
            tf.addfile(info)
            res.links += 1
        else:
            n = _add_file(tf, info, os.path.join(host_dir, rel), max_bytes - res.bytes)
            if isinstance(n, str):
                res.skipped.append(f"{printable(rel)}: {n}")
                continue
            res.bytes += n
            res.files += 1
            res.manifest["files"][dst] = [n, info.mtime]


class _BytesReader:
    """A file-like reader of bytes, for tarfile's addfile."""

    def __init__(self, data):
        self.data, self.pos = data, 0

    def read(self, n=-1):
        n = len(self.data) - self.pos if n is None or n < 0 else n
        chunk = self.data[self.pos:self.pos + n]
        self.pos += len(chunk)
        return chunk


class _ChannelWriter:
    """A file-like writer into an SSH channel's stdin, for tarfile's stream mode."""

    def __init__(self, chan):
        self.chan = chan

    def write(self, data):
        self.chan.sendall(data)
        return len(data)

    def close(self):
        pass


def _finish(chan, timeout=60, out=None):
    """(exit status, stderr bytes) of a guest command; -1 if it did not end within
    ``timeout`` seconds (a copy cut short).  With ``out`` (a bytearray) its stdout
    is kept there (up to 1 MiB).  Closes the channel."""
    chan.settimeout(timeout)
    err = bytearray()
    try:
        while True:
            chunk = chan.recv_stderr(65536)
            if not chunk:
                break
            if len(err) < 65536:
                err += chunk
        while out is not None:
            chunk = chan.recv(65536)
            if not chunk:
                break
            if len(out) < 1 << 20:
                out += chunk
        status = chan.recv_exit_status()
    except OSError:
        status = -1
    chan.close()
    return status, bytes(err)


def _first_line(err):
    for line in err.decode("utf-8", "backslashreplace").splitlines():
        if line.strip():
            return line.strip()[:300]
    return ""


class _Exactly:
    """Reads exactly ``size`` bytes of ``f``: zeros if it shrank, no more if it grew."""

    def __init__(self, f, size):
        self.f, self.left = f, size

    def read(self, n=-1):
        if self.left <= 0:
            return b""
        n = self.left if n is None or n < 0 else min(n, self.left)
        data = self.f.read(n) or bytes(n)
        self.left -= len(data)
        return data


def _add_file(tf, info, path, budget):
    """Add one host file; returns its size, or the reason it was skipped."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        return e.strerror
    with os.fdopen(fd, "rb", buffering=0) as f:
        now = os.fstat(fd)
        if not stat.S_ISREG(now.st_mode):
            return "changed into a non-regular file"
        if now.st_size > budget:
            raise UserError(f"{path} grew past [site] stage_in_max while it was copied",
                            "do not modify the working directory while the job starts")
        info.size, info.mtime = now.st_size, int(now.st_mtime)
        info.mode = stat.S_IMODE(now.st_mode)
        tf.addfile(info, _Exactly(f, now.st_size))
    return now.st_size


def read_manifest(sftp, ctl):
    """(staged files {path: (size, mtime)}, staged dirs, the job's umask)."""
    try:
        with sftp.open(posixpath.join(ctl, MANIFEST), "rb") as f:
            data = f.read(_MAX_MANIFEST)
        m = json.loads(data.decode())
        return ({k: tuple(v) for k, v in m.get("files", {}).items()}, set(m.get("dirs", [])),
                int(m.get("umask", DEFAULT_UMASK)) & 0o777)
    except FileNotFoundError:
        return {}, set(), DEFAULT_UMASK
    except (ValueError, AttributeError, TypeError, UnicodeDecodeError):
        log.warning("the guest's stage-in manifest is unreadable; harvesting every file")
        return {}, set(), DEFAULT_UMASK


# ---------------------------------------------------------------------- harvest

@dataclasses.dataclass
class HarvestResult:
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    truncated: bool = False
    unchanged: int = 0
    out_of_time: bool = False
    problems: list = dataclasses.field(default_factory=list)

    def summary(self):
        s = (f"copied {self.files} files ({_fmt(self.bytes)}) back in {self.seconds:.1f} s, "
             f"{self.unchanged} unchanged files skipped")
        if self.truncated:
            s += "; files over [site] harvest_max left behind"
        if self.problems:
            s += f"; {len(self.problems)} not copied"
        return s


def harvest(cfg, st, timeout=180.0):
    """Copy the job's new and changed files from st.output_dir to st.host_workdir.

    Called as root; the work happens in a child running as the job user.
    """
    from . import privs
    from .config import parse_bytes
    cap = parse_bytes(cfg.site["harvest_max"])
    _preload()
    t0 = time.monotonic()
    # The child stops itself at its budget and says so; run_as's timeout is the backstop.
    budget = max(1.0, timeout - STOP_MARGIN)
    try:
        out = privs.run_as(st.user, st.uid, st.gid, _harvest_as_user,
                           dataclasses.asdict(st), cap, budget, timeout=timeout)
    except TransientError as e:
        if "did not finish within" not in e.problem:
            raise
        raise TransientError(  # the backstop: the copy did not stop itself in time
            f"copying the output back did not finish within its {timeout:.0f} s budget (what "
            "the batch system's hook alarm leaves the cleanup); files copied until then are in "
            "place, the rest stayed in the virtual machine",
            "write fewer, larger files, or ask for the mounted mode") from None
    res = HarvestResult(**out)
    res.seconds = time.monotonic() - t0
    log.info("job %s: harvest %s", st.job_id, res.summary())
    return res


def _preload():
    """Import before the fork what the child needs: once it is the job user it may not
    be able to read the Python installation (a root-only prefix, for instance)."""
    import encodings.idna  # noqa: F401 - socket.getaddrinfo on a str host
    import paramiko
    import paramiko.sftp_client  # noqa: F401
    from . import ssh, state  # noqa: F401
    paramiko.Ed25519Key, paramiko.SFTPClient  # noqa: B018


def _harvest_as_user(st_fields, cap, budget):
    """Child side of :func:`harvest`, already running as the job user."""
    import signal
    from .ssh import Guest
    from .state import JobState

    def stop(signo, frame):  # killed at the backstop: unwind, so no temporary file stays
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)
    deadline = time.monotonic() + budget
    st = JobState.from_json(st_fields)
    guest = Guest.connect(st)
    try:
        sftp = guest.sftp()
        try:
            res = pull(guest, sftp, st.output_dir, st.host_workdir, cap, deadline=deadline,
                       budget=budget, control=st.control_dir or None)
        finally:
            sftp.close()
    finally:
        guest.close()
    return dataclasses.asdict(res)


class _HostTree:
    """Writes below one host directory, never following a symlink below it.

    Directory descriptors are cached, at most MAX_FDS at a time (least
    recently used closed first): a tree of thousands of directories, or one
    thousands of levels deep, needs no more descriptors than a flat one.
    New files and directories get the job's ``umask`` applied to their modes.
    """

    MAX_FDS = 64

    def __init__(self, root, umask=0):
        try:
            self.root = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            fix = ("keep the submit directory until the job ends" if e.errno == errno.ENOENT
                   else "keep the submit directory writable by you until the job ends")
            raise UserError(f"cannot open the job's working directory {root} to copy output "
                            f"back: {e.strerror}; the output stayed in the virtual machine",
                            fix) from None
        self.fds = collections.OrderedDict()
        self.seq = 0
        self.umask = umask & 0o777

    def close(self):
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        os.close(self.root)

    def mode(self, mode):
        return mode & 0o777 & ~self.umask

    def dir(self, rel, mode=0o700):
        """fd of host directory ``rel`` (created when missing); OSError if in the way."""
        if not rel:
            return self.root
        fd = self.fds.get(rel)
        if fd is not None:
            self.fds.move_to_end(rel)
            return fd
        parts = rel.split("/")
        i = len(parts) - 1
        while i > 0 and "/".join(parts[:i]) not in self.fds:
            i -= 1
        fd = self.fds["/".join(parts[:i])] if i else self.root
        for j in range(i, len(parts)):
            fd = self._open(fd, parts[j], mode)
            self._cache("/".join(parts[:j + 1]), fd)
        return fd

    def _open(self, pfd, name, mode):
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
        try:
            return os.open(name, flags, dir_fd=pfd)
        except FileNotFoundError:
            os.mkdir(name, 0o700, dir_fd=pfd)
            fd = os.open(name, flags, dir_fd=pfd)
            os.fchmod(fd, self.mode(mode) | 0o700)  # the harvest must write into it
            return fd

    def _cache(self, rel, fd):
        self.fds[rel] = fd
        while len(self.fds) > self.MAX_FDS:
            _, old = self.fds.popitem(last=False)
            os.close(old)

    def blocker(self, dfd, name):
        """Why ``name`` in ``dfd`` must not be replaced, or None."""
        try:
            a = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(a.st_mode):
            return "the host path is a symlink; not written through"
        if not stat.S_ISREG(a.st_mode):
            return "the host path is not a regular file"
        return None

    def tmpname(self, name):
        self.seq += 1
        return os.fsdecode(b".%s.vmwn-%d-%d.tmp" % (os.fsencode(name)[:100], os.getpid(),
                                                    self.seq))


def printable(rel):
    """A path as text a user can read in a message: undecodable bytes as \\xNN."""
    return "".join(c if c.isprintable() else repr(c)[1:-1]
                   for c in os.fsencode(rel).decode("utf-8", "backslashreplace"))


def _valid_name(name):
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name


class OutOfTime(Exception):
    """The harvest reached its time budget (raised in the walk, reported as a problem)."""


class _ChannelReader:
    """A file-like reader over an SSH channel's stdout for tarfile's stream mode;
    recv waits at most until ``deadline`` (then OutOfTime)."""

    def __init__(self, chan, deadline):
        self.chan, self.deadline = chan, deadline

    def read(self, n=-1):
        import socket
        if n is None or n < 0:
            n = 1 << 20
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise OutOfTime()
            self.chan.settimeout(left)
        try:
            return self.chan.recv(n)
        except socket.timeout:
            raise OutOfTime() from None


# Run by the guest user's shell: the output directory as one tar stream.  GNU
# tar (debian12) sends a sparse file's data only; busybox's (tiny) has no
# --sparse and sends its zeros, which come back as holes all the same.
TAR_OUT = ("cd {dir} && if tar --version 2>/dev/null | grep -q 'GNU tar'; "
           "then exec tar --sparse -cf - .; else exec tar -cf - .; fi")


def pull(guest, sftp, guest_dir, host_dir, cap, deadline=None, budget=0.0, control=None):
    """Copy new and changed regular files from ``guest_dir`` into ``host_dir``.

    The guest sends the directory as one tar stream over the job's SSH
    connection (as fast as ``ssh guest tar -c | tar -x``): any depth, any
    number of files, names need not be UTF-8, zeros come back as holes.  Each
    member goes through :func:`_store` (no symlink followed on the host, the
    job's umask, the cap).  At ``deadline`` (time.monotonic) it stops and says
    so, naming the budget.
    """
    import shlex
    import tarfile
    res = HarvestResult()
    home = sftp.normalize(".")
    ctl = control or posixpath.join(home, CONTROL)
    guests = guest_own(home) | {ctl}
    staged, staged_dirs, umask = read_manifest(sftp, ctl)
    tree = _HostTree(host_dir, umask)

    def problem(rel, why):
        if len(res.problems) < _MAX_PROBLEMS:
            res.problems.append(f"{printable(rel)}: {why}")
        elif len(res.problems) == _MAX_PROBLEMS:
            res.problems.append("... more problems not listed")

    chan = guest.exec(TAR_OUT.format(dir=shlex.quote(guest_dir)))
    chan.shutdown_write()
    done = {}  # guest path -> host rel of regular files written, for hard links
    try:
        tf = tarfile.open(fileobj=_ChannelReader(chan, deadline), mode="r|",
                          encoding="utf-8", errors="surrogateescape")
        for m in tf:
            rel = posixpath.normpath(m.name)
            if rel == ".":
                continue
            if rel.startswith("../") or rel == ".." or rel.startswith("/"):
                problem(rel, "the guest sent a path outside the output directory")
                continue
            gp = posixpath.join(guest_dir, rel)
            if gp in guests or any(gp.startswith(o + "/") for o in guests):
                continue
            if m.isdir():
                if gp not in staged_dirs:
                    try:
                        tree.dir(rel, stat.S_IMODE(m.mode))
                    except OSError as e:
                        problem(rel, _why(e))
            elif m.isreg() or m.islnk():
                a = _TarAttr(m)
                if m.isreg() and staged.get(gp) == (a.st_size, a.st_mtime):
                    res.unchanged += 1
                    continue
                a.staged = gp in staged  # the job changed a file it was given: its mode stays
                if m.islnk():  # a second name of a file already in the stream
                    first = done.get(posixpath.join(guest_dir, posixpath.normpath(m.linkname)))
                    if first is None:
                        problem(rel, "a hard link to a file that was not copied")
                        continue
                    _store(tree, rel, _HostAttr(tree, first, m), cap, res, problem,
                           _host_source(tree, first))
                else:
                    _store(tree, rel, a, cap, res, problem, lambda m=m: tf.extractfile(m))
                done[gp] = rel
            elif m.issym():  # stays in the guest; said unless it is one it was given
                try:
                    given = os.readlink(os.path.join(host_dir, rel)) == m.linkname
                except OSError:
                    given = False
                if not given:
                    problem(rel, "a symlink in the guest; not copied back")
            # fifos and devices stay in the guest
    except OutOfTime:
        res.out_of_time = True
        problem(".", f"the copy stopped at its time budget of {budget:.0f} s (what the batch "
                     "system's hook alarm leaves the cleanup) after "
                     f"{res.files} files; the rest stayed in the virtual machine: write "
                     "fewer, larger files, or ask for the mounted mode")
    except (tarfile.TarError, EOFError, OSError) as e:
        if chan.get_transport() is None or not chan.get_transport().is_active() or (
                chan.exit_status_ready() and chan.recv_exit_status() == -1):
            raise GuestLost(f"copying output back from the virtual machine failed: "
                            f"{' '.join(str(e).split()) or type(e).__name__}",
                            f"{res.files} files were copied before the failure") from None
        problem(".", f"the guest's tar stream broke off ({' '.join(str(e).split())})")
    finally:
        tree.close()
        # The guest's complaints (unreadable files); none to wait for when cut short.
        _, err = _finish(chan, timeout=0.5 if res.out_of_time else 5)
        for line in err.decode("utf-8", "backslashreplace").splitlines()[:20]:
            if line.strip():
                problem(".", f"in the guest: {line.strip()[:300]}")
    if not _alive_chan(guest):
        raise GuestLost("the virtual machine went away while its output was copied",
                        f"{res.files} files were copied before")
    return res


def _alive_chan(guest):
    t = guest.client.get_transport()
    return t is not None and t.is_active()


class _TarAttr:
    """A tar member's size, mode and times in the shape _store reads."""

    staged = False

    def __init__(self, m):
        self.st_size, self.st_mode, self.st_gid = m.size, m.mode, m.gid
        self.st_mtime = int(m.mtime)
        self.st_atime = self.st_mtime


class _HostAttr(_TarAttr):
    def __init__(self, tree, rel, m):
        super().__init__(m)
        dfd = tree.dir(posixpath.dirname(rel))
        self.st_size = os.stat(posixpath.basename(rel), dir_fd=dfd,
                               follow_symlinks=False).st_size


def _host_source(tree, rel):
    def source():
        dfd = tree.dir(posixpath.dirname(rel))
        fd = os.open(posixpath.basename(rel), os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dfd)
        return os.fdopen(fd, "rb", buffering=0)
    return source


def _why(e):
    if e.errno in (errno.ELOOP, errno.ENOTDIR):
        return "a host path component is a symlink or not a directory; not written through"
    return e.strerror or str(e)


def _store(tree, rel, a, cap, res, problem, open_source, on_error=_why):
    """Write one file at ``rel`` under the host tree from ``open_source()``.

    The one writer behind online and offline harvests: the cap, the refusal to
    write through host symlinks, a temporary name renamed into place, the
    guest's mode (no set-id bits; the job's umask applied to a file it was not
    given at stage-in, whose mode a native job would have chosen), its mtime, and
    holes where the source reads zeros.  What it cannot write it names in
    ``problem`` (a file over the cap among them) and the copy goes on.
    """
    size = a.st_size or 0
    if res.bytes + size > cap:  # skipped by name; smaller files after it still fit
        res.truncated = True
        problem(rel, f"not copied: {_fmt(size)} would take the output past [site] "
                     f"harvest_max ({_fmt(cap)}, {_fmt(res.bytes)} copied)")
        return
    parent, name = posixpath.split(rel)
    try:
        dfd = tree.dir(parent)
    except OSError as e:
        problem(rel, _why(e))
        return
    why = tree.blocker(dfd, name)
    if why:
        problem(rel, why)
        return
    tmp = tree.tmpname(name)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                     dir_fd=dfd)
    except OSError as e:
        problem(rel, _why(e))
        return
    n, done = 0, False
    try:
        with open_source() as src:
            while True:
                chunk = src.read(CHUNK)
                if not chunk:
                    break
                n += len(chunk)
                if res.bytes + n > cap:
                    res.truncated = True
                    problem(rel, "not copied: it grew past [site] harvest_max")
                    return
                if chunk.count(0) == len(chunk):  # a hole stays a hole
                    os.lseek(fd, len(chunk), os.SEEK_CUR)
                    continue
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
        os.ftruncate(fd, n)
        gid = getattr(a, "st_gid", None)
        if gid is not None and gid != os.getegid():
            try:
                os.fchown(fd, -1, gid)  # one of the user's other groups, as the job chose
            except OSError:
                pass  # a group the user is not in on the host: the file stays theirs
        mode = stat.S_IMODE(a.st_mode)
        os.fchmod(fd, mode & 0o777 if getattr(a, "staged", False) else tree.mode(mode))
        if a.st_mtime is not None:
            os.utime(fd, (a.st_atime or a.st_mtime, a.st_mtime))
        why = tree.blocker(dfd, name)
        if why:
            problem(rel, why)
            return
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        done = True
    except OSError as e:
        problem(rel, on_error(e))
        return
    finally:
        os.close(fd)
        if not done:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
    res.files += 1
    res.bytes += n


def write_tree(src_dir, host_dir, cap, staged=None, skip=(), umask=DEFAULT_UMASK):
    """Copy a local tree's regular files and directories into ``host_dir`` as :func:`pull` does.

    For output recovered from a dead guest's disk (``vmwn.offline``): the same
    symlink-safe writer, cap, umask and manifest rule, with ``staged`` mapping
    a path relative to ``src_dir`` to its stage-in (size, mtime) and ``skip``
    naming paths relative to ``src_dir`` never copied.  Runs as the job user.
    """
    staged = staged or {}
    res = HarvestResult()
    tree = _HostTree(host_dir, umask)

    def problem(rel, why):
        if len(res.problems) < _MAX_PROBLEMS:
            res.problems.append(f"{printable(rel)}: {why}")
        elif len(res.problems) == _MAX_PROBLEMS:
            res.problems.append("... more problems not listed")

    def copy(sfd, name, rel, a):
        def source():
            src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=sfd)
            return os.fdopen(src, "rb", buffering=0)
        return _store(tree, rel, a, cap, res, problem, source)

    def visit(path, rel):
        sfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        subdirs = []
        try:
            for name in sorted(os.listdir(sfd)):
                r = posixpath.join(rel, name) if rel else name
                if r in skip:
                    continue
                a = os.stat(name, dir_fd=sfd, follow_symlinks=False)
                if stat.S_ISDIR(a.st_mode):
                    try:
                        tree.dir(r, stat.S_IMODE(a.st_mode))
                    except OSError as e:
                        problem(r, _why(e))
                        continue
                    subdirs.append((os.path.join(path, name), r))
                elif stat.S_ISREG(a.st_mode):
                    if staged.get(r) == (a.st_size, int(a.st_mtime)):
                        res.unchanged += 1
                    else:
                        copy(sfd, name, r, a)
                elif stat.S_ISLNK(a.st_mode):
                    problem(r, "a symlink in the guest; not copied back")
        finally:
            os.close(sfd)
        return subdirs

    stack = [(src_dir, "")]
    try:
        while stack:
            path, rel = stack.pop()
            stack.extend(reversed(visit(path, rel)))
    finally:
        tree.close()
    return res
