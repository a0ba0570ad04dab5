"""Recover a dead guest's output from its disk, without the guest.

When the guest died (QEMU killed, guest kernel crashed) its qcow2 overlay still
holds what the job had written to disk.  The overlay is converted to a sparse
raw copy by ``qemu-img`` running as the job user: the overlay is the job
user's file (its QEMU ran as that user), so its header, and the backing file
or data file it names, are read with that user's rights only.  The filesystem
inside it is the guest's and may be
hostile, so the host kernel never mounts it: ``debugfs`` parses it in user
space, running as the job user and confined by Landlock to writing in its own
scratch directory.  What it extracted is then copied into the job's working
directory with the live harvest's symlink-safe writer (``transfer.write_tree``).
The scratch directory lives in the job's state directory, so a teardown that
finds it left behind removes it with the rest of the job.
"""

import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import posixpath
import re
import shutil
import stat
import struct
import tempfile
import time

from . import guestfiles, privs, subp, transfer
from .errors import GuestLost, SiteError, UserError

log = logging.getLogger(__name__)

# Disks whose ext4 volume label says where the guest mounts them.  A disk
# without a known label that holds ROOT_MARK is the guest's root filesystem.
MOUNTS = {"vmwn-home": "/home"}
ROOT_MARK = "/etc/debian_version"
_MAX_MANIFEST = 64 << 20
_MAX_LISTED_DIRS = 20000
_MAX_SPECIALS = 50
_SBIN = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")

_LS_P = re.compile(r"^/(\d+)/([0-7]+)/\d+/\d+/(.*)/(\d*)/$")
_KINDS = {stat.S_IFIFO: "a fifo", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}


def guest_gone(cfg, st):
    """True when the job's domain no longer runs and its overlay is still on disk.

    A guest paused on a disk I/O error counts as gone (it is stopped here, so
    its overlay holds still for reading): it cannot run or answer again.
    """
    from . import virt
    if not st.overlay or not os.path.isfile(st.overlay):
        return False
    conn = virt.connect(cfg.site["libvirt_uri"])
    try:
        dom = virt.lookup(conn, st.domain)
        if dom is not None and virt.paused_on_io_error(dom):
            log.warning("job %s: the guest is paused on a disk I/O error (the file system "
                        "of its overlay is full); treating it as lost", st.job_id)
            virt.destroy(conn, st.domain)
            return True
        return dom is None or not virt.is_active(dom)
    finally:
        conn.close()


def _convert_as_user(overlay, raw, out, timeout):
    """In the job user's child: the overlay as a sparse raw image, and the output dir."""
    subp.run(["qemu-img", "convert", "-q", "-f", "qcow2", "-O", "raw", overlay, raw],
             timeout=max(1.0, timeout), fix="check free space in the state directory")
    os.chmod(raw, 0o600)
    os.mkdir(out, 0o700)
    return True


def recover(cfg, st, timeout=240.0):
    """Copy the job's new and changed files from its dead guest's overlay to st.host_workdir.

    Called as root.  Returns a ``transfer.HarvestResult``; raises UserError when
    the output directory was not on the guest's disk.
    """
    from . import state
    from .config import parse_bytes
    cap = parse_bytes(cfg.site["harvest_max"])
    if not st.overlay or not os.path.isfile(st.overlay):
        raise GuestLost("the VM's disk is gone", "the output was lost with the VM")
    debugfs = shutil.which("debugfs", path=os.pathsep.join(_SBIN))
    e2fsck = shutil.which("e2fsck", path=os.pathsep.join(_SBIN))
    if not debugfs or not e2fsck:
        raise SiteError("debugfs or e2fsck is not installed", "install Debian package e2fsprogs")
    t0 = time.monotonic()
    end = t0 + timeout
    scratch = tempfile.mkdtemp(prefix="offline-", dir=state.job_dir(cfg, st.job_id))
    try:
        # The job user's from here on; root only removes it (rmtree never follows links).
        os.chown(scratch, st.uid, st.gid)
        raw = os.path.join(scratch, "disk.raw")
        out = os.path.join(scratch, "out")
        privs.run_as(st.user, st.uid, st.gid, _convert_as_user, st.overlay, raw, out,
                     max(1.0, end - time.monotonic()) - 1.0,
                     timeout=max(1.0, end - time.monotonic()))
        t1 = time.monotonic()
        found = privs.run_as(st.user, st.uid, st.gid, _extract_as_user, debugfs, e2fsck, raw, out,
                             st.output_dir, st.user, timeout=max(1.0, end - time.monotonic()))
        t2 = time.monotonic()
        done = privs.run_as(st.user, st.uid, st.gid, _write_as_user, found["tree"],
                            st.host_workdir, cap, found["staged"], found["skip"], found["umask"],
                            timeout=max(1.0, end - time.monotonic()))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if os.path.lexists(scratch):
            log.warning("job %s: could not remove %s", st.job_id, scratch)
    res = transfer.HarvestResult(**done)
    res.problems = found["specials"] + res.problems
    res.seconds = time.monotonic() - t0
    log.info("job %s: offline harvest from %s (mounted at %s): convert %.2f s, extract "
             "%.2f s, copy %.2f s; %s", st.job_id, st.overlay, found["mount"], t1 - t0,
             t2 - t1, res.seconds - (t2 - t0), res.summary())
    return res


# --------------------------------------------------------------- as the job user

def _write_as_user(tree, host_dir, cap, staged, skip, umask):
    staged = {k: tuple(v) for k, v in staged.items()}
    return dataclasses.asdict(transfer.write_tree(tree, host_dir, cap, staged, skip, umask))


def _extract_as_user(debugfs, e2fsck, raw, out, output_dir, user):
    """Child side: confine, find the output on the disk, extract it with debugfs."""
    confine(out, raw)
    fs = _Fs(debugfs, raw, out)
    fs.replay(e2fsck)
    label = fs.label()
    mount = MOUNTS.get(label)
    if mount is None and fs.kind(ROOT_MARK) is not None:
        mount = "/"
    if mount is None:
        raise SiteError(f"the VM's disk (ext4 label {label or 'none'!r}) is not one vmwn "
                        "can read offline", "label the home disk vmwn-home or use a "
                        "Debian root filesystem")
    src = on_disk(output_dir, mount)
    if src is None:
        raise UserError(f"the job's output directory {output_dir} was in the VM's memory, "
                        f"not on its disk (mounted at {mount}), and is lost with the VM",
                        f"work under {mount.rstrip('/') or '/'}/ in the VM to have output "
                        "recovered after a VM failure")
    if fs.kind(src) != "directory":
        raise GuestLost(f"the job's output directory {output_dir} is not on the VM's disk",
                        "nothing could be recovered")
    tree = os.path.join(out, "tree")
    os.mkdir(tree, 0o700)
    fs.run(f"rdump {quote(src)} .", cwd=tree)
    if src != "/":
        names = os.listdir(tree)
        if len(names) != 1:
            raise GuestLost(f"debugfs did not extract {output_dir} from the VM's disk",
                            "nothing could be recovered")
        tree = os.path.join(tree, names[0])
    home = guestfiles.guest_home(user)
    ctl = posixpath.join(home, guestfiles.HOME_CONTROL_DIR)
    skip = list(transfer.GUEST_OWN) if posixpath.dirname(ctl) == output_dir.rstrip("/") else []
    if src == "/":
        skip.append("lost+found")
    staged, umask = _staged(fs, mount, ctl, output_dir)
    return {"tree": tree, "mount": mount, "skip": skip,
            "staged": staged, "umask": umask,
            "specials": _specials(fs, src)}


def _staged(fs, mount, ctl, output_dir):
    """(stage-in manifest keyed by path relative to the output directory, the job's
    umask); ({}, the default umask) if unreadable."""
    none = ({}, transfer.DEFAULT_UMASK)
    path = on_disk(posixpath.join(ctl, guestfiles.MANIFEST), mount)
    if path is None or fs.kind(path) != "regular":
        return none
    dest = os.path.join(fs.out, "manifest.json")
    fs.run(f"dump {quote(path)} manifest.json", cwd=fs.out)
    try:
        with open(dest, "rb") as f:
            m = json.loads(f.read(_MAX_MANIFEST).decode())
        files = m.get("files", {})
        prefix = output_dir.rstrip("/") + "/"
        return ({k[len(prefix):]: [int(v[0]), int(v[1])] for k, v in files.items()
                 if isinstance(k, str) and k.startswith(prefix)},
                int(m.get("umask", transfer.DEFAULT_UMASK)) & 0o777)
    except (OSError, ValueError, AttributeError, TypeError, IndexError, UnicodeDecodeError):
        log.warning("the stage-in manifest on the VM's disk is unreadable; recovering every file")
        return none
    finally:
        with contextlib.suppress(OSError):
            os.unlink(dest)


def _specials(fs, src):
    """Fifos, devices and sockets below ``src``: debugfs never extracts them; say so."""
    found, level, dirs = [], [(quote(src), "")], 0
    while level and dirs < _MAX_LISTED_DIRS:
        dirs += len(level)
        cmds = os.path.join(fs.out, "ls.cmds")
        with open(cmds, "w", encoding="utf-8") as f:
            f.writelines(f"ls -p {spec}\n" for spec, _ in level)
        text = fs.run("", cmdfile=cmds)
        os.unlink(cmds)
        chunks = re.split(r"^debugfs: ls -p .*$", text, flags=re.M)[1:]
        nxt = []
        for (_, rel), chunk in zip(level, chunks):
            for line in chunk.splitlines():
                m = _LS_P.match(line)
                if not m or m.group(3) in (".", ".."):
                    continue
                mode = int(m.group(2), 8)
                r = posixpath.join(rel, m.group(3)) if rel else m.group(3)
                if stat.S_ISDIR(mode):
                    nxt.append((f"<{int(m.group(1))}>", r))
                elif stat.S_IFMT(mode) in _KINDS:
                    found.append(f"{r}: {_KINDS[stat.S_IFMT(mode)]} in the guest; not copied back")
        level = nxt
    return found[:_MAX_SPECIALS]


class _Fs:
    """One raw ext4 image, read by debugfs (read-only, never the kernel)."""

    def __init__(self, debugfs, raw, out):
        self.debugfs, self.raw, self.out = debugfs, raw, out

    ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "DEBUGFS_PAGER": "__none__"}

    def replay(self, e2fsck):
        """Apply the journal to the copy: a guest that died mid-flight left its last
        committed changes (synced files among them) only in the journal."""
        cp = subp.run([e2fsck, "-E", "journal_only", "-y", self.raw], cwd=self.out,
                      timeout=600, env=self.ENV, check=False)
        if cp.returncode not in (0, 1, 2):
            log.warning("e2fsck could not replay the journal of the VM's disk (status %d): %s",
                        cp.returncode, " ".join(cp.stdout.split()[-20:]))

    def run(self, request, cwd=None, cmdfile=None):
        # -n: a disk that was in use when its VM died may fail checksums debugfs need not trust
        argv = ([self.debugfs, "-n"] + (["-f", cmdfile] if cmdfile else ["-R", request])
                + [self.raw])
        cp = subp.run(argv, cwd=cwd or self.out, timeout=600, env=self.ENV,
                      fix="the VM's disk is damaged; its output cannot be recovered")
        self.stderr = cp.stderr
        return cp.stdout

    def label(self):
        m = re.search(r"^Filesystem volume name:\s*(.*)$", self.run("stats"), re.M)
        if not m:
            why = " ".join(ln for ln in self.stderr.splitlines()
                           if not ln.startswith("debugfs ")).strip()[:200]
            raise GuestLost(f"the VM's disk holds no ext2/3/4 filesystem debugfs can read "
                            f"({why or 'no message'})", "its output cannot be recovered")
        name = m.group(1).strip()
        return "" if name == "<none>" else name

    def kind(self, path):
        """'directory', 'regular', another type word, or None when ``path`` is missing."""
        m = re.search(r"Type:\s*(\S+)", self.run(f"stat {quote(path)}"))
        return m.group(1) if m else None


def quote(path):
    """``path`` as one debugfs argument (its command parser doubles quotes inside quotes)."""
    if any(ord(c) < 32 for c in path):
        raise UserError(f"the path {path!r} cannot be read from the VM's disk",
                        "use paths without control characters")
    return '"' + path.replace('"', '""') + '"'


def on_disk(guest_path, mount):
    """Path inside the filesystem mounted at ``mount`` for ``guest_path``, or None."""
    p = posixpath.normpath(guest_path)
    if mount == "/":
        return p
    if p == mount:
        return "/"
    if p.startswith(mount.rstrip("/") + "/"):
        return p[len(mount.rstrip("/")):]
    return None


# -------------------------------------------------------------------- Landlock

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

