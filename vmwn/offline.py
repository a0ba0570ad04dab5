"""Recover a dead guest's output from its disk, without the guest.

When the guest died (QEMU killed, guest kernel crashed) its qcow2 overlay still
holds what the job had written to disk.  The overlay is converted to a sparse
raw copy by ``qemu-img`` running as the job user: the overlay is the job
user's file (its QEMU ran as that user), so its header, and the backing file
or data file it names, are read with that user's rights only.  The filesystem
inside it is the guest's and may be
hostile, so the host kernel never mounts it: ``debugfs`` parses it in user
space (``extfs``), running as the job user and confined by Landlock
(``landlock``) to writing in its own scratch directory.  What it extracted is then copied into the job's working
directory with the live harvest's symlink-safe writer (``transfer.write_tree``).
The scratch directory lives in the job's state directory, so a teardown that
finds it left behind removes it with the rest of the job.
"""

import contextlib
import dataclasses
import json
import logging
import os
import posixpath
import shutil
import tempfile
import time

from . import disk, extfs, guestfiles, landlock, privs, transfer
from .errors import GuestLost, SiteError, UserError

log = logging.getLogger(__name__)

# Disks whose ext4 volume label says where the guest mounts them.  A disk
# without a known label that holds ROOT_MARK is the guest's root filesystem.
MOUNTS = {"vmwn-home": "/home"}
ROOT_MARK = "/etc/debian_version"
_MAX_MANIFEST = 64 << 20


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
    debugfs, e2fsck = extfs.tools()
    t0 = time.monotonic()
    end = t0 + timeout
    scratch = tempfile.mkdtemp(prefix="offline-", dir=state.job_dir(cfg, st.job_id))
    try:
        # The job user's from here on; root only removes it (rmtree never follows links).
        os.chown(scratch, st.uid, st.gid)
        raw = os.path.join(scratch, "disk.raw")
        out = os.path.join(scratch, "out")
        privs.run_as(st.user, st.uid, st.gid, _to_raw_as_user, st.overlay, raw, out,
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

def _to_raw_as_user(overlay, raw, out, timeout):
    """The overlay as a sparse raw image, and the output directory."""
    disk.to_raw(overlay, raw, timeout)
    os.mkdir(out, 0o700)
    return True


def _write_as_user(tree, host_dir, cap, staged, skip, umask):
    staged = {k: tuple(v) for k, v in staged.items()}
    return dataclasses.asdict(transfer.write_tree(tree, host_dir, cap, staged, skip, umask))


def _extract_as_user(debugfs, e2fsck, raw, out, output_dir, user):
    """Child side: confine, find the output on the disk, extract it with debugfs."""
    landlock.confine(out, raw)
    fs = extfs.Image(debugfs, raw, out)
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
    fs.run(f"rdump {extfs.quote(src)} .", cwd=tree)
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
            "specials": fs.specials(src)}


def _staged(fs, mount, ctl, output_dir):
    """(stage-in manifest keyed by path relative to the output directory, the job's
    umask); ({}, the default umask) if unreadable."""
    none = ({}, transfer.DEFAULT_UMASK)
    path = on_disk(posixpath.join(ctl, guestfiles.MANIFEST), mount)
    if path is None or fs.kind(path) != "regular":
        return none
    dest = fs.dump(path, "staged.json")
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
