"""Warm starts: a guest booted once per environment, saved, and restored for each job.

``vmwn warm prepare ENV`` boots the environment's guest with the kernel
argument ``vmwn.warm=1``, its memory a file (vmwn's launcher makes QEMU's
memory backend that file, shared); the guest sets itself up as far as it can
without knowing its job (modules, file systems, network lease), zeroes its
free memory, prints ``vmwn-guest: prepared`` and polls its seed disk, which
holds a placeholder.  libvirt saves it with QEMU's x-ignore-shared: the saved
stream holds the device state only, the memory stays in its file, whose zero
pages become holes.  Stream, memory and the disk the guest had written are
sealed as one *generation* in ``[site] warm_dir``/ENV/, named by ``current``.

A job's QEMU then starts with ``-incoming defer`` instead of a boot: its
launcher gives it a memfd of its own holding a copy of the memory file's data
(written as the job's user, counted in the job's memory, shared so that a
virtiofsd can map it) or, where QEMU can (8.2+) and no virtio-fs daemon needs
it shared, the file itself mapped private (its unwritten pages shared by every
guest restored from it, in the page cache: what jobs share is a guest kernel
no job has run in, as host processes share a library's pages); vmwn hands it
the stream over libvirt's monitor, and
the job gets an overlay on the generation's disk and its seed in the
placeholder's place (same size).  The job's shares (mounted mode) are added
to the restored guest before it runs on: QEMU cannot save a guest with
virtio-fs devices.  The restored guest finds the seed, sets its clock from the
host's time vmwn writes on the seed disk once it runs (:func:`give_clock`),
rekeys its RNG from the host's entropy and makes its machine-id
(vmwn-restored), and applies the seed as a cold guest would: users, keys,
host name, mounts (waiting for the added devices), sshd.  Nothing unique to a
job is in the saved state, so one generation serves any number of jobs.

A generation is used only while everything it was made from is unchanged
(:func:`fingerprint`: base files, QEMU, template, machine, memory, vCPUs);
otherwise, and when a job asks for other vCPUs or memory, the job boots cold
and the node log says why.  Jobs hold their generation (their overlay is backed
by its disk): a new generation never replaces files a running job uses, and old
ones are removed once no job refers to them.
"""

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import tempfile
import time

from . import disk, keys, ports, state as statemod, subp, virt
from .console import Console, console_tail
from .errors import SiteError

log = logging.getLogger(__name__)

# Every job's seed is padded to this size in warm mode: the restored guest's
# kernel knows the seed disk's size from before the save.
SEED_BYTES = 1 << 20
PLACEHOLDER_MAGIC = b"vmwn-warm-placeholder"
# The host's clock, written on the seed's last 4 KiB once the restored guest runs
# (vmwn/guest/vmwn-restored.c sets its clock from it): magic, seconds, nanoseconds.
CLOCK_OFFSET = SEED_BYTES - 4096
CLOCK_MAGIC = b"vmwn-host-clock\0"
_CLOCK = struct.Struct("<16sqq")
# The placeholder also carries a throwaway host key, so the guest's sshd can be
# saved listening (stopped); a restored guest serves connections only with its job's.
HOST_KEY_OFFSET = 4096
KERNEL_FLAG = "vmwn.warm=1"
PREPARED_LINE = b"vmwn-guest: prepared"
# The preparing guest runs as nobody: it never holds anything of a job.
PREPARE_UID = PREPARE_GID = 65534
# libvirt's save image (src/qemu/qemu_saveimage.h): magic, version 2, then
# data_len, was_running, format, cookieOffset, 14 unused words; the domain
# XML (data_len bytes) follows, then QEMU's migration stream.
_SAVE_MAGIC = b"LibvirtQemudSave"
_SAVE_HEADER = struct.Struct("=16sIIIII56x")
FORMAT = 2  # of a generation (2: the memory in a file of its own)


class NotPrepared(Exception):
    """No usable generation; the text says why (for the node log)."""


@dataclasses.dataclass(frozen=True)
class Generation:
    path: str
    vcpus: int
    memory_mib: int

    @property
    def state(self):
        return state_of(self.path)

    @property
    def disk(self):
        return disk_of(self.path)

    @property
    def ram(self):
        return ram_of(self.path)


def state_of(generation):
    """The QEMU stream of the generation at path ``generation`` (a job's ``warm`` field)."""
    return os.path.join(generation, "state")


def ram_of(generation):
    """The prepared guest's memory, a sparse file: each job's guest starts from a copy."""
    return os.path.join(generation, "ram")


def restore_by(generation, shares):
    """How a job's guest gets the memory of ``generation``: 'map' (the file itself,
    mapped private: its pages shared by every guest restored from it) where its QEMU
    can map a read-only file so and the guest has no virtio-fs device (whose daemon
    must map the guest's memory shared), else 'copy' (a memfd of the job's own)."""
    if shares:
        return "copy"
    try:
        with open(os.path.join(generation, "meta.json"), encoding="utf-8") as f:
            return "map" if json.load(f).get("maps_private") else "copy"
    except (OSError, ValueError):
        return "copy"


def maps_private(qemu):
    """Whether ``qemu``'s file memory backend maps a read-only file private and
    writable (its 'rom' property: QEMU 8.2 and later)."""
    cp = subp.run([qemu, "-object", "memory-backend-file,help"], timeout=30, check=False)
    return re.search(r"^\s*rom=", cp.stdout, re.M) is not None


def disk_of(generation):
    """The disk the prepared guest had written: backing file of its jobs' overlays."""
    return os.path.join(generation, "disk.qcow2")


def env_dir(cfg, env_name):
    return os.path.join(cfg.site["warm_dir"], env_name)


def _identity(path):
    st = os.stat(path)
    return [path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


def fingerprint(cfg, env):
    """What a saved guest depends on; a generation is restored only if this is unchanged."""
    # The template by its text alone: an install that writes the same template again
    # (a node's upgrade, 'make install') keeps its guests warm.
    files = [p for _, p in env.artefacts()] + [cfg.site["qemu"]]
    with open(os.path.join(cfg.site["template_dir"], env.template), "rb") as f:
        template_sha = hashlib.sha256(f.read()).hexdigest()
    return {"files": [_identity(p) for p in files], "template_sha256": template_sha,
            "cmdline": env.cmdline, "machine": env.machine, "accel": env.accel,
            "network": env.network, "vcpus": env.vcpus, "memory_mib": env.memory_mib,
            "seed_bytes": SEED_BYTES, "format": FORMAT}


def current(cfg, env):
    """The generation a job of ``env`` may restore; raises NotPrepared saying why not."""
    link = os.path.join(env_dir(cfg, env.name), "current")
    try:
        path = os.path.join(os.path.dirname(link), os.readlink(link))
        with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise NotPrepared(f"no prepared guest for {env.name} "
                          f"(run 'vmwn warm prepare {env.name}')") from None
    except (OSError, ValueError) as e:
        raise NotPrepared(f"the prepared guest of {env.name} is unreadable ({e}); "
                          f"run 'vmwn warm prepare {env.name}'") from None
    try:
        now = fingerprint(cfg, env)
    except OSError as e:
        raise NotPrepared(f"cannot check {env.name}'s files: {e}") from None
    if meta.get("fingerprint") != now:
        changed = sorted(k for k in now if meta.get("fingerprint", {}).get(k) != now[k])
        raise NotPrepared(f"the prepared guest of {env.name} was made from other "
                          f"{', '.join(changed)}; run 'vmwn warm prepare {env.name}'")
    gen = Generation(path=path, vcpus=meta["fingerprint"]["vcpus"],
                     memory_mib=meta["fingerprint"]["memory_mib"])
    for p in (gen.state, gen.ram, gen.disk):
        try:
            st = os.stat(p)
        except OSError as e:
            raise NotPrepared(f"{p} of the prepared guest of {env.name} is unreadable "
                              f"({e.strerror}); run 'vmwn warm prepare {env.name}'") from None
        if st.st_uid != 0 or st.st_mode & 0o022:
            raise NotPrepared(f"{p} is not root's or is writable by others: a job could "
                              "change what later jobs restore; run "
                              f"'vmwn warm prepare {env.name}'")
    return gen


def choose(cfg, env, vcpus, memory_mib, log=log):
    """The generation for a job, or None (a cold boot); the node log says why it is cold."""
    if not env.warm:
        return None
    try:
        gen = current(cfg, env)
    except NotPrepared as e:
        log.warning("cold boot: %s", e)
        return None
    if (vcpus, memory_mib) != (gen.vcpus, gen.memory_mib):
        log.info("cold boot: the job asks for %d vCPUs and %d MiB; the prepared guest of %s "
                 "has %d and %d", vcpus, memory_mib, env.name, gen.vcpus, gen.memory_mib)
        return None
    return gen


def pad_seed(path):
    """Give a job's seed the placeholder's size; False if it does not fit."""
    size = os.path.getsize(path)
    if size > CLOCK_OFFSET:
        return False
    with open(path, "r+b") as f:
        f.truncate(SEED_BYTES)
    return True


def give_clock(seed_path):
    """Write the host's time where the restored guest waits for it (on its seed disk)."""
    now = time.time_ns()
    record = _CLOCK.pack(CLOCK_MAGIC, now // 1_000_000_000, now % 1_000_000_000)
    fd = os.open(seed_path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        # The time first, the magic after it: the guest, polling, never takes a
        # record it reads half written.
        n = len(CLOCK_MAGIC)
        os.pwrite(fd, record[n:], CLOCK_OFFSET + n)
        os.pwrite(fd, record[:n], CLOCK_OFFSET)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- preparing

def prepare(cfg, env, say=print):
    """Boot ``env``'s guest to its waiting point, save it and make it current.

    Returns a dict of what it cost (seconds, state and disk bytes).  Raises
    SiteError; nothing half-made is left behind.
    """
    from .domain import render
    if not env.warm:
        raise SiteError(f"environment {env.name} does not have warm = on",
                        f"set warm = on in [env {env.name}] first")
    missing = env.missing()
    if missing:
        raise SiteError(f"environment {env.name} is not installed (missing {missing[0]})",
                        f"run 'vmwn image build {env.name}'")
    unsealed = disk.unsealed_base(env)
    if unsealed:
        raise SiteError(f"base file {unsealed[0]} of {env.name} is {unsealed[1]}",
                        f"run 'vmwn image build {env.name}'")
    if not virt.monitor_passes_files():
        raise SiteError("this libvirt cannot pass the saved state to a job's QEMU "
                        "(it needs libvirt 8.2 or later)", f"set warm = off for {env.name}")
    root = env_dir(cfg, env.name)
    os.makedirs(root, mode=0o755, exist_ok=True)
    os.chmod(cfg.site["warm_dir"], 0o755)
    os.chmod(root, 0o755)  # job QEMUs (the job's user) read the generation
    t0 = time.monotonic()
    with ports.flocked(os.path.join(root, ".lock")):  # one prepare of ENV at a time
        for n in os.listdir(root):  # an earlier prepare's, killed midway
            if n.startswith(".new-"):
                shutil.rmtree(os.path.join(root, n), ignore_errors=True)
        _check_room(root, env)
        work = tempfile.mkdtemp(prefix=".new-", dir=root)
        os.chmod(work, 0o711)
        name = f"vmwn-warm-{env.name}"
        conn = virt.connect(cfg.site["libvirt_uri"])
        try:
            virt.destroy(conn, name)  # an earlier prepare's, killed midway
            placeholder = os.path.join(work, "placeholder")
            with open(placeholder, "wb") as f:
                f.write(PLACEHOLDER_MAGIC)
                f.seek(HOST_KEY_OFFSET)
                f.write(keys.generate("vmwn-warm-throwaway").private_openssh.encode())
                f.truncate(SEED_BYTES)
            gen_disk = disk.make_overlay(disk_of(work), env.image)
            ram = ram_of(work)
            with open(ram, "wb") as f:
                f.truncate(env.memory_mib << 20)
            for p in (placeholder, gen_disk, ram):
                os.chown(p, PREPARE_UID, PREPARE_GID)
                os.chmod(p, 0o600)
            console = os.path.join(work, "console.log")
            with ports.locked(cfg):
                port = ports.pick(cfg)
            xml = render(cfg, env, job_id=f"warm-{env.name}", user="nobody", port=port,
                         overlay=gen_disk, seed=placeholder, console_log=console,
                         uid=PREPARE_UID, gid=PREPARE_GID, warm=True, ram=ram, name=name)
            if "VMWN_RAM_FILE" not in xml:
                raise SiteError(f"template {env.template} does not give the prepared guest "
                                "its memory file (one copied from an earlier vmwn?)",
                                "take the VMWN_RAM_* and -incoming lines of vmwn's "
                                "templates/domain.xml.j2 into it")
            virt.open_domain_dirs()
            dom = virt.start(conn, xml)
            _wait_prepared(console, dom, virt, env.boot_timeout, env.name)
            t_boot = time.monotonic() - t0
            saved = os.path.join(work, "saved")
            virt.leave_out_memory(dom)
            virt.save(dom, saved)
            _strip_libvirt_header(saved, state_of(work))
            os.unlink(saved)
            for p in (placeholder, console):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
            # What the preparing QEMU (nobody) wrote goes to files of root's own: an fd
            # another process of nobody's opened meanwhile reaches no file of the
            # generation.  The guest zeroed its free memory: holes, which no job copies.
            for p in (ram, gen_disk):
                _copy_sparse(p, p + ".root")
                os.replace(p + ".root", p)
            for p in (gen_disk, state_of(work), ram):
                os.chown(p, 0, 0)
                os.chmod(p, 0o644)
            cost = {"maps_private": maps_private(cfg.site["qemu"]),
                    "prepare_seconds": round(time.monotonic() - t0, 2),
                    "boot_seconds": round(t_boot, 2),
                    "state_bytes": os.path.getsize(state_of(work)),
                    "ram_bytes": _allocated(ram),
                    "disk_bytes": _allocated(gen_disk)}
            with open(os.path.join(work, "meta.json"), "w", encoding="utf-8") as f:
                json.dump({"fingerprint": fingerprint(cfg, env), "created": time.time(),
                           **cost}, f, indent=1)
            os.chmod(os.path.join(work, "meta.json"), 0o644)
            gen = os.path.join(root, f"g{time.time_ns()}")
            os.rename(work, gen)
            os.chmod(gen, 0o755)
            work = None
            tmp = os.path.join(root, ".current.tmp")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            os.symlink(os.path.basename(gen), tmp)
            os.replace(tmp, os.path.join(root, "current"))
        finally:
            try:
                virt.destroy(conn, name)
            finally:
                conn.close()
                if work:
                    shutil.rmtree(work, ignore_errors=True)
        for old in remove_unused(cfg, env.name):
            say(f"{env.name}: removed generation {old}, which no job uses")
    log.info("%s: prepared guest saved in %.1f s (%d MiB memory, %d KiB state)", env.name,
             cost["prepare_seconds"], cost["ram_bytes"] >> 20, cost["state_bytes"] >> 10)
    return cost


def _check_room(root, env):
    """The preparing guest's memory is a file in ``root``, written whole (the guest
    zeroes its free memory) before it is copied without its zeros."""
    st = os.statvfs(root)
    need = (2 * env.memory_mib + 64) << 20
    if st.f_bavail * st.f_frsize < need:
        raise SiteError(f"{root} has less than {need >> 20} MiB free, which preparing "
                        f"{env.name} needs (twice its memory)", "free space in [site] warm_dir")


PAGE = 4096
_ZERO = bytes(PAGE)


def _copy_sparse(src, dst):
    """Copy ``src`` into a new file ``dst`` (root's, 0600), leaving out its holes and
    its pages of zeros (holes in the copy)."""
    with open(src, "rb") as f, open(dst, "xb") as o:
        os.fchmod(o.fileno(), 0o600)
        size = os.fstat(f.fileno()).st_size
        off = 0
        while off < size:
            try:
                data = os.lseek(f.fileno(), off, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            hole = os.lseek(f.fileno(), data, os.SEEK_HOLE)
            f.seek(data)
            off = data
            while off < hole:
                chunk = f.read(min(1 << 20, hole - off))
                if not chunk:
                    break
                for i in range(0, len(chunk), PAGE):
                    page = chunk[i:i + PAGE]
                    if page != _ZERO[:len(page)]:
                        o.seek(off + i)
                        o.write(page)
                off += len(chunk)
        o.truncate(size)


def _allocated(path):
    return os.stat(path).st_blocks * 512


def _wait_prepared(console, dom, virt, timeout, env_name):
    watch = Console(console, ready=PREPARED_LINE)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        said = watch.poll()
        if said == "ready":
            return
        if said or not virt.is_active(dom):
            raise SiteError(f"the guest of {env_name} failed while being prepared "
                            f"({said or console_tail(console)})",
                            f"run 'vmwn check --boot {env_name}'")
        time.sleep(0.05)
    raise SiteError(f"the guest of {env_name} did not say it was prepared within "
                    f"{timeout:.0f} s ({console_tail(console)})",
                    "warm = on needs vmwn's tiny guest (or one whose init implements "
                    "vmwn.warm=1); see docs/performance.md")


def _strip_libvirt_header(saved, out):
    """Write the QEMU migration stream of libvirt's save image ``saved`` to ``out``."""
    with open(saved, "rb") as f:
        head = f.read(_SAVE_HEADER.size)
        if len(head) != _SAVE_HEADER.size:
            raise SiteError(f"libvirt's save image {saved} is truncated", "see the libvirt log")
        magic, version, data_len, _running, fmt, _cookie = _SAVE_HEADER.unpack(head)
        if magic != _SAVE_MAGIC or version != 2 or fmt != 0:
            raise SiteError(f"libvirt's save image is not an uncompressed version-2 image "
                            f"(magic {magic!r}, version {version}, format {fmt})",
                            "set save_image_format = \"raw\" in /etc/libvirt/qemu.conf")
        f.seek(_SAVE_HEADER.size + data_len)
        with open(out, "wb") as o:
            shutil.copyfileobj(f, o, 1 << 20)


def in_use(cfg):
    """Generation directories that live jobs' overlays are backed by."""
    return {os.path.realpath(st.warm) for st in statemod.all_jobs(cfg) if st.warm}


def remove_unused(cfg, env_name):
    """Remove the generations of ``env_name`` that are not current and no job uses."""
    root = env_dir(cfg, env_name)
    try:
        cur = os.path.realpath(os.path.join(root, "current"))
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    busy = in_use(cfg)
    removed = []
    for n in sorted(names):
        p = os.path.join(root, n)
        if n.startswith("g") and os.path.isdir(p) and os.path.realpath(p) not in busy | {cur}:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(n)
    return removed


def drop(cfg, env_name):
    """Remove every generation no job uses, the current one too (warm starts stop), and
    the environment's directory once nothing of it is left."""
    root = env_dir(cfg, env_name)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(root, "current"))
    removed = remove_unused(cfg, env_name)
    with contextlib.suppress(FileNotFoundError):
        if not [n for n in os.listdir(root) if n != ".lock"]:
            shutil.rmtree(root)
    return removed


def status(cfg, env):
    """One line about ``env``'s warm state, for operators."""
    if not env.warm:
        return f"{env.name}: warm off"
    try:
        gen = current(cfg, env)
    except NotPrepared as e:
        return f"{env.name}: warm on, cold boots: {e}"
    with open(os.path.join(gen.path, "meta.json"), encoding="utf-8") as f:
        meta = json.load(f)
    return (f"{env.name}: warm on, prepared {time.strftime('%Y-%m-%d %H:%M', time.localtime(meta['created']))} "
            f"({meta['ram_bytes'] >> 20} MiB memory, {meta['state_bytes'] >> 10} KiB state, "
            f"{meta['disk_bytes'] >> 20} MiB disk, "
            f"{gen.vcpus} vCPU, {gen.memory_mib} MiB; made in {meta['prepare_seconds']} s)")
