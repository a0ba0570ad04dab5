"""Per-job disks: a qcow2 overlay on the environment's read-only base image.

Creating an overlay writes only a header, so it costs the same for a 200 MB
and a 20 GB base; the base is opened read-only by QEMU and never written.
"""

import glob
import json
import os
import stat
import struct

from . import subp
from .errors import SiteError, TransientError

# Room kept free on the overlay file system beyond every guest's disk limit:
# qcow2 metadata, and the rest of the node.
ROOM_MARGIN = 256 << 20


def overlay_path(cfg, job_id):
    from .state import safe_name
    return os.path.join(cfg.site["overlay_dir"], safe_name(job_id) + ".qcow2")


def base_format(base):
    """The base image's format as qemu-img sees it (qcow2 or raw)."""
    cp = subp.run(["qemu-img", "info", "--output=json", "-U", base], timeout=30,
                  fix=f"check that {base} is a disk image")
    try:
        return json.loads(cp.stdout)["format"]
    except (ValueError, KeyError):
        raise SiteError(f"qemu-img cannot read {base}", "rebuild the environment's image") from None


def create_overlay(cfg, job_id, base, timeout=60):
    """Create the job's overlay; raises SiteError when the base is missing or unreadable."""
    if not os.path.isfile(base):
        raise SiteError(f"base image {base} is missing",
                        "build it ('vmwn image build ENV') or fix the environment's image key")
    os.makedirs(cfg.site["overlay_dir"], mode=0o711, exist_ok=True)
    if os.stat(cfg.site["overlay_dir"]).st_mode & 0o111 != 0o111:
        os.chmod(cfg.site["overlay_dir"], 0o711)  # made under a umask of 077: QEMU must reach it
    path = overlay_path(cfg, job_id)
    if os.path.lexists(path):
        os.unlink(path)  # a leftover of an earlier attempt of the same job id
    return make_overlay(path, base, timeout)


def make_overlay(path, base, timeout=60):
    """A qcow2 at ``path`` whose backing file is ``base`` (its format named, never probed
    by QEMU); returns ``path``."""
    fmt = "qcow2" if base.endswith(".qcow2") else base_format(base)
    subp.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt, "-b", base, path],
             timeout=timeout, fix="check the overlay directory and the base image")
    return path



def to_raw(overlay, raw, timeout):
    """``overlay`` (with its backing chain) as a sparse raw image at ``raw``, 0600.
    Run as the overlay's owner: qemu-img then opens only what that user may."""
    subp.run(["qemu-img", "convert", "-q", "-f", "qcow2", "-O", "raw", overlay, raw],
             timeout=max(1.0, timeout), fix="check free space in the state directory")
    os.chmod(raw, 0o600)


# A teardown moves the overlay aside (vmwn.lifecycle.destroy) before it looks for the
# domain; the name keeps .qcow2, and the reap counts it as its job's overlay.
ASIDE = ".ending"


def aside(path):
    """Where a teardown moves the file ``path`` so that no domain start finds it."""
    if path.endswith(".qcow2"):
        return path[:-len(".qcow2")] + ASIDE + ".qcow2"
    return path + ASIDE


def owner_stem(path):
    """The job name (``state.safe_name``) an overlay file belongs to, set aside or not."""
    stem = os.path.basename(path)[:-len(".qcow2")]
    return stem[:-len(ASIDE)] if stem.endswith(ASIDE) else stem


def remove(path):
    """Remove an overlay; True if one was there.

    It is emptied first: it belongs to the job's user, who could have hard-linked
    it elsewhere on the file system, where its blocks would outlive the job."""
    empty(path)
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def empty(path):
    """Truncate the regular file ``path`` to nothing (never through a symlink)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def virtual_size(path):
    """A qcow2 image's virtual size in bytes (from its header); None if not qcow2."""
    try:
        with open(path, "rb") as f:
            head = f.read(32)
    except OSError:
        return None
    if len(head) < 32 or head[:4] != b"QFI\xfb":
        return None
    return struct.unpack(">Q", head[24:32])[0]


def check_room(cfg, base, job_id):
    """Refuse a new guest unless every guest on the node can fill its disk.

    A guest's disk limit is its base image's virtual size: the overlay can
    grow to that and no further.  The new guest needs that much free on the
    overlay file system, beyond what the running guests may still write
    (their limit less what their overlay already holds), so one job filling
    its disk fills only its own and never pauses its neighbours.
    """
    need = virtual_size(base)
    if need is None:
        return
    d = cfg.site["overlay_dir"]
    os.makedirs(d, mode=0o711, exist_ok=True)
    owed = 0
    mine = overlay_path(cfg, job_id)
    for path in glob.glob(os.path.join(glob.escape(d), "*.qcow2")):
        if path == mine:
            continue
        limit = virtual_size(path)
        try:
            used = os.stat(path).st_blocks * 512
        except OSError:
            continue
        if limit:
            owed += max(0, limit - used)
    vfs = os.statvfs(d)
    free = vfs.f_bavail * vfs.f_frsize
    if free - owed < need + ROOM_MARGIN:
        raise TransientError(
            f"this node has no room for another guest disk: {free >> 20} MiB free in {d}, "
            f"{owed >> 20} MiB promised to running guests, {need >> 20} MiB needed",
            "the site should free space in [site] overlay_dir")


def unsealed_base(env):
    """The first of ``env``'s base files (image, kernel, initrd) that a job could
    change, as (path, why), or None.  They are shared by every job: root's, and
    written by no one else."""
    for _, path in env.artefacts():
        try:
            st = os.stat(path)
        except OSError:
            continue  # missing: Environment.missing() reports it
        if st.st_uid != 0:
            return path, f"owned by uid {st.st_uid}"
        if st.st_mode & 0o022:
            return path, f"writable by {'others' if st.st_mode & 0o002 else 'its group'}"
    return None


def seal_base(env):
    """Make ``env``'s base files root's and read-only to others; returns those changed."""
    changed = []
    for _, path in env.artefacts():
        try:
            st = os.stat(path)
        except OSError:
            continue
        if st.st_uid != 0 or st.st_gid != 0 or st.st_mode & 0o7777 != 0o644:
            os.chown(path, 0, 0)
            os.chmod(path, 0o644)
            changed.append(path)
    return changed
