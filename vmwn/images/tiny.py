"""The ``tiny`` environment: Debian's kernel, busybox and OpenSSH in an initramfs.

A guest that boots to an SSH prompt in seconds even without KVM, made only of
Debian packages: the cloud kernel flavour (ext4 and crc32c built in, fewer
drivers to probe: under TCG it answers SSH in about 4 s where the generic
flavour takes about 7 s), ``busybox-static`` for the userland and
init, ``openssh-server``'s sshd with the host's (Debian's) shared libraries.
The per-job disk is an empty ext4 filesystem the guest mounts on /home; the
guest's /init (vmwn/guest/tiny-init) applies the job's cloud-init seed itself.
"""

import glob
import logging
import os
import re
import shutil
import struct
import tempfile
import time

from ..errors import SiteError
from ..subp import run
from . import debpkg

log = logging.getLogger(__name__)

KERNEL_META = "linux-image-cloud-amd64"
KERNEL_PATTERN = r"linux-image-[0-9][0-9.]*-[0-9]+-cloud-amd64(-unsigned)?"
# Drivers the guest needs; built-in ones are skipped, dependencies are added.
MODULES = ["virtio_pci", "virtio_blk", "virtio_net", "virtio_rng", "isofs",
           "ext4", "crc32c_generic", "virtiofs"]
DISK_BYTES = 2 << 30
DISK_LABEL = "vmwn-home"
GUEST_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "guest")
INIT_SOURCE = os.path.join(GUEST_DIR, "tiny-init")
# Run by /init after a warm restore (docs/performance.md): fresh host entropy, CRNG rekeyed.
RESTORED_SOURCE = os.path.join(GUEST_DIR, "vmwn-restored.c")
# OpenSSH's client set for the job's guests on several nodes (debian12's too).
SSH_CONFIG_SOURCE = os.path.join(GUEST_DIR, "ssh_config")
RECIPE_FILES = (INIT_SOURCE, RESTORED_SOURCE, SSH_CONFIG_SOURCE)
TOOLS = {"cpio": "cpio", "gzip": "gzip", "mkfs.ext4": "e2fsprogs", "qemu-img": "qemu-utils",
         "dpkg-deb": "dpkg", "apt-get": "apt", "ldd": "libc-bin", "gcc": "gcc"}

# Accounts of the guest before the seed adds the job's.  "*" rather than "!":
# sshd treats "!" as a locked account.  sshd's privilege-separation user gets
# an uid no cluster account is likely to have; the guest refuses a job uid
# equal to it.
PASSWD = """\
root:*:0:0:root:/root:/bin/sh
sshd:*:65533:65534:sshd privilege separation:/run/sshd:/bin/false
nobody:*:65534:65534:nobody:/nonexistent:/bin/false
"""
GROUP = """\
root:x:0:
tty:x:5:
nogroup:x:65534:
"""
NSSWITCH = """\
passwd: files
group: files
shadow: files
hosts: files dns
"""
SSHD_CONFIG = """\
# vmwn tiny guest: the job's seed provides the only host key and the only user.
HostKey /etc/ssh/ssh_host_ed25519_key
PubkeyAuthentication yes
AuthorizedKeysFile /etc/ssh/authorized_keys/%u
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
UsePAM no
UseDNS no
PrintMotd no
PrintLastLog no
X11Forwarding no
MaxSessions 32
MaxStartups 64
ClientAliveInterval 0
PidFile /run/sshd.pid
Subsystem sftp internal-sftp
"""
# Busybox udhcpc calls this with the lease in the environment.
UDHCPC_SCRIPT = """\
#!/bin/sh
case "$1" in
deconfig)
    ip addr flush dev "$interface"
    ip link set "$interface" up
    ;;
bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" ${broadcast:+broadcast "$broadcast"} dev "$interface"
    for r in $router; do ip route replace default via "$r" dev "$interface"; break; done
    : > /etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
    ;;
esac
exit 0
"""
# busybox init only reaps orphans and handles poweroff once /init has set up.
INITTAB = """\
::sysinit:/bin/true
::shutdown:/bin/sync
::shutdown:/bin/umount -a -r
"""


def build(cfg, env, force=False):
    """Write ``env.kernel``, ``env.initrd`` and ``env.image``; each appears whole or not at all."""
    del cfg, force  # the caller decides whether to rebuild; nothing here depends on site keys
    for role in ("kernel", "initrd", "image"):
        if not getattr(env, role):
            raise SiteError(f"environment {env.name!r} has no {role} path",
                            f"set {role} in [env {env.name}]")
    require_tools()
    outdir = os.path.dirname(env.image)
    os.makedirs(outdir, exist_ok=True)
    for stale in glob.glob(os.path.join(outdir, ".build-*")):
        shutil.rmtree(stale, ignore_errors=True)
    scratch = tempfile.mkdtemp(prefix=".build-", dir=outdir)
    try:
        t0 = time.monotonic()
        kpkg = debpkg.depends(KERNEL_META, KERNEL_PATTERN)
        debs = {p: debpkg.fetch(p) for p in (kpkg, "busybox-static", "openssh-server",
                                             "openssh-client")}
        t1 = time.monotonic()
        trees = {p: debpkg.extract(d, os.path.join(scratch, "pkg", p)) for p, d in debs.items()}
        root = os.path.join(scratch, "root")
        release, vmlinuz = assemble(root, trees[kpkg], trees["busybox-static"],
                                    trees["openssh-server"], trees["openssh-client"])
        initrd = pack_initramfs(root, os.path.join(scratch, "initrd.img"))
        disk = make_disk(os.path.join(scratch, "disk"))
        t2 = time.monotonic()
        # The kernel goes last: a build cut short leaves it missing, never a
        # kernel beside modules of another release.
        if os.path.exists(env.kernel):
            os.unlink(env.kernel)
        publish(disk, env.image)
        publish(initrd, env.initrd)
        publish(vmlinuz, env.kernel)
        log.info("tiny: kernel %s, initrd %d bytes; fetch %.1f s, assemble %.1f s",
                 release, os.path.getsize(env.initrd), t1 - t0, t2 - t1)
        return release
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def require_tools():
    for tool, package in TOOLS.items():
        if not shutil.which(tool):
            raise SiteError(f"{tool} is not installed", f"run make deps (Debian package {package})")


def publish(src, dest):
    """Move ``src`` to ``dest`` atomically (via a temporary name beside ``dest``)."""
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = f"{dest}.tmp-{os.getpid()}"
    shutil.move(src, tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, dest)


def assemble(root, ktree, bbtree, sshtree, clienttree):
    """Lay out the initramfs tree under ``root``; return (kernel release, vmlinuz path)."""
    mods = glob.glob(os.path.join(ktree, "lib", "modules", "*"))
    kernels = glob.glob(os.path.join(ktree, "boot", "vmlinuz-*"))
    if len(mods) != 1 or len(kernels) != 1:
        raise SiteError(f"unexpected kernel package layout in {ktree}", "report a vmwn bug")
    release = os.path.basename(mods[0])
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc/ssh", "etc/udhcpc", "dev", "proc",
              "sys", "run", "tmp", "home", "root", "var/empty", "lib64",
              f"lib/modules/{release}"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    os.chmod(os.path.join(root, "root"), 0o700)
    install_busybox(root, os.path.join(bbtree, "bin", "busybox"))
    install_binary(root, os.path.join(sshtree, "usr", "sbin", "sshd"), "usr/sbin/sshd")
    install_binary(root, os.path.join(clienttree, "usr", "bin", "ssh"), "usr/bin/ssh")
    order = install_modules(root, mods[0], release)
    compile_static(RESTORED_SOURCE, os.path.join(root, "sbin", "vmwn-restored"))
    files = {
        "init": (read_init(), 0o755),
        "etc/passwd": (PASSWD, 0o644),
        "etc/group": (GROUP, 0o644),
        "etc/nsswitch.conf": (NSSWITCH, 0o644),
        "etc/inittab": (INITTAB, 0o644),
        "etc/hosts": ("127.0.0.1 localhost\n", 0o644),
        "etc/ssh/sshd_config": (SSHD_CONFIG, 0o644),
        "etc/ssh/ssh_config": (_read(SSH_CONFIG_SOURCE), 0o644),
        "etc/udhcpc/default.script": (UDHCPC_SCRIPT, 0o755),
        f"lib/modules/{release}/load-order": ("".join(m + "\n" for m in order), 0o644),
    }
    for rel, (text, mode) in files.items():
        path = os.path.join(root, rel)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(path, mode)
    return release, kernels[0]


def compile_static(source, out):
    """A static binary of one C file (the guest has no C library of its own to link)."""
    run(["gcc", "-static", "-Os", "-Wall", "-o", out, source],
        fix="install gcc and libc6-dev (make deps)")
    os.chmod(out, 0o755)


def read_init():
    return _read(INIT_SOURCE)


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def install_busybox(root, busybox):
    """busybox at /bin/busybox plus a symlink for every applet at its usual path."""
    shutil.copy2(busybox, os.path.join(root, "bin", "busybox"))
    cp = run([busybox, "--list-full"], fix="the busybox-static package looks damaged")
    for rel in cp.stdout.split():
        if rel in ("bin/busybox", "linuxrc") or ".." in rel.split("/"):
            continue
        link = os.path.join(root, rel)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if not os.path.lexists(link):
            os.symlink("/bin/busybox", link)


_LDD_RE = re.compile(r"^\s*(?:\S+\s+=>\s+)?(/\S+)\s+\(0x[0-9a-f]+\)\s*$")


def install_binary(root, binary, dest):
    """Copy a dynamically linked binary and the libraries the host's ld.so resolves.

    The host is Debian 12, so the libraries are the files of Debian's library
    packages of the same release the binary was built for.
    """
    target = os.path.join(root, dest)
    shutil.copy2(binary, target)
    cp = run(["ldd", binary], fix=f"{binary} is not a binary for this host")
    for line in cp.stdout.splitlines():
        if "=> not found" in line:
            raise SiteError(f"{os.path.basename(binary)} needs a missing library: "
                            f"{line.strip()}", "install the library package on this host")
        m = _LDD_RE.match(line)
        if not m:
            continue
        lib = m.group(1)
        out = os.path.join(root, lib.lstrip("/"))
        if not os.path.exists(out):
            os.makedirs(os.path.dirname(out), exist_ok=True)
            shutil.copyfile(os.path.realpath(lib), out)
            os.chmod(out, 0o755)


def modinfo_depends(path):
    """Module names listed in the ``depends=`` field of a .ko's .modinfo section."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise SiteError(f"{path} is not a 64-bit little-endian module", "report a vmwn bug")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i):
        name, _typ, _flags, _addr, off, size = struct.unpack_from(
            "<IIQQQQ", data, shoff + i * shentsize)
        return name, data[off:off + size]

    _, names = section(shstrndx)
    for i in range(shnum):
        name_off, body = section(i)
        if names[name_off:names.index(b"\0", name_off)] == b".modinfo":
            for field in body.split(b"\0"):
                if field.startswith(b"depends="):
                    return [d for d in field[8:].decode().split(",") if d]
            return []
    return []


def _modname(path):
    return os.path.basename(path).split(".ko")[0].replace("-", "_")


def install_modules(root, moddir, release):
    """Copy MODULES and their dependencies; return their paths in load order."""
    index = {}
    for dirpath, _dirs, files in os.walk(os.path.join(moddir, "kernel")):
        for fn in files:
            if fn.endswith(".ko"):
                index[_modname(fn)] = os.path.join(dirpath, fn)
    builtin = set()
    with open(os.path.join(moddir, "modules.builtin"), encoding="utf-8") as f:
        for line in f:
            builtin.add(_modname(line.strip()))
    order, seen = [], set()

    def visit(name):
        if name in seen or name in builtin:
            return
        seen.add(name)
        if name not in index:
            raise SiteError(f"kernel {release} has no module {name}",
                            "use a kernel flavour with virtio drivers")
        for dep in modinfo_depends(index[name]):
            visit(dep.replace("-", "_"))
        order.append(index[name])

    for name in MODULES:
        visit(name)
    rels = []
    for path in order:
        rel = os.path.relpath(path, moddir)
        out = os.path.join(root, "lib", "modules", release, rel)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        shutil.copyfile(path, out)
        rels.append(rel)
    return rels


def pack_initramfs(root, out):
    """newc cpio of ``root``, owned by root, uncompressed: under TCG the guest takes
    0.5 s of CPU to inflate a gzip one, and every job is charged its VM's boot."""
    names = []
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        rel = os.path.relpath(dirpath, root)
        if rel != ".":
            names.append(rel)
        names.extend(os.path.normpath(os.path.join(rel, f)) for f in sorted(files))
        # os.walk lists symlinks to directories under dirs; they are entries too.
        names.extend(os.path.normpath(os.path.join(rel, d)) for d in dirs
                     if os.path.islink(os.path.join(dirpath, d)))
    raw = out[:-len(".img")] + ".cpio" if out.endswith(".img") else out + ".cpio"
    run(["cpio", "-o", "-H", "newc", "-R", "0:0", "--reproducible", "--quiet", "-O", raw],
        input="".join(n + "\n" for n in names), cwd=root)
    shutil.move(raw, out)
    return out


def make_disk(workdir):
    """An empty 2 GiB ext4 (label vmwn-home) as qcow2, fully initialised.

    Inode tables and journal are written now so the guest's ext4lazyinit does not
    grow every job's overlay and burn emulated CPU after boot.
    """
    os.makedirs(workdir, exist_ok=True)
    raw = os.path.join(workdir, "disk.raw")
    with open(raw, "wb") as f:
        f.truncate(DISK_BYTES)
    run(["mkfs.ext4", "-q", "-F", "-L", DISK_LABEL, "-m", "0",
         "-E", "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0", raw],
        fix=f"check free space in {workdir}")
    out = os.path.join(workdir, "disk.qcow2")
    run(["qemu-img", "convert", "-O", "qcow2", raw, out], fix=f"check free space in {workdir}")
    os.unlink(raw)
    return out

