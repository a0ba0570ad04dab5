"""Files an installer writes into the system (hooks, starters, plugin lines): each
replaced atomically, root-owned when run as root, never through a link."""

import os
import shutil

from . import subp
from .errors import SiteError


def own_root(path):
    if os.geteuid() == 0:
        os.chown(path, 0, 0, follow_symlinks=False)


def write(path, text, mode):
    """Atomically replace ``path`` with ``text``, root-owned, ``mode``."""
    tmp = f"{path}.vmwn-new"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        own_root(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def compile_c(out, sources, flags, what, fix, libs=()):
    """Build ``sources`` with the node's C compiler into ``out`` (atomically, root-owned,
    0755), linked with ``libs``; ``what`` names the result in the error, ``fix`` says
    what to do when the build fails."""
    cc = "cc"
    if shutil.which(cc) is None:
        raise SiteError(f"no C compiler ({cc}) to build {what}",
                        "install one (Debian: apt install gcc libc6-dev)")
    tmp = out + ".vmwn-new"
    cp = subp.run([cc, "-O2", "-Wall", *flags, "-o", tmp, *sources, *libs], timeout=120,
                  check=False)
    if cp.returncode != 0:
        raise SiteError(f"building {what} failed: "
                        f"{' '.join((cp.stderr or cp.stdout).split())[:300]}", fix)
    own_root(tmp)
    os.chmod(tmp, 0o755)
    os.replace(tmp, out)
