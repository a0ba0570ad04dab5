"""e2fsprogs: a lost guest's ext4 filesystem read in user space, never mounted.

The filesystem is the guest's and may be hostile, so the host kernel never
parses it: ``debugfs`` (read-only, ``-n``) does, in a process that runs as the
job's user and is confined by Landlock (``offline``).  ``e2fsck -E
journal_only`` first replays the journal into the raw copy.
"""

import logging
import os
import posixpath
import re
import shutil
import stat

from . import subp
from .errors import GuestLost, SiteError, UserError

log = logging.getLogger(__name__)

_MAX_LISTED_DIRS = 20000
_MAX_SPECIALS = 50
_LS_P = re.compile(r"^/(\d+)/([0-7]+)/\d+/\d+/(.*)/(\d*)/$")
_KINDS = {stat.S_IFIFO: "a fifo", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}


def tools():
    """(debugfs, e2fsck) paths; SiteError when e2fsprogs is missing."""
    debugfs = shutil.which("debugfs", path=subp.SBIN)
    e2fsck = shutil.which("e2fsck", path=subp.SBIN)
    if not debugfs or not e2fsck:
        raise SiteError("debugfs or e2fsck is not installed", "install Debian package e2fsprogs")
    return debugfs, e2fsck


class Image:
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

    def dump(self, path, name):
        """Copy the file ``path`` of the image to ``name`` in the scratch directory."""
        self.run(f"dump {quote(path)} {name}", cwd=self.out)
        return os.path.join(self.out, name)

    def specials(self, src):
        """Fifos, devices and sockets below ``src``: debugfs never extracts them; say so."""
        found, level, dirs = [], [(quote(src), "")], 0
        while level and dirs < _MAX_LISTED_DIRS:
            dirs += len(level)
            cmds = os.path.join(self.out, "ls.cmds")
            with open(cmds, "w", encoding="utf-8") as f:
                f.writelines(f"ls -p {spec}\n" for spec, _ in level)
            text = self.run("", cmdfile=cmds)
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


def quote(path):
    """``path`` as one debugfs argument (its command parser doubles quotes inside quotes)."""
    if any(ord(c) < 32 for c in path):
        raise UserError(f"the path {path!r} cannot be read from the VM's disk",
                        "use paths without control characters")
    return '"' + path.replace('"', '""') + '"'
