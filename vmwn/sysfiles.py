"""Files an installer writes into the system (hooks, starters, plugin lines): each
replaced atomically, root-owned when run as root, never through a link."""

import os


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
