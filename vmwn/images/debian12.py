"""The ``debian12`` environment: a Debian 12 root filesystem with cloud-init.

A guest that behaves like any cloud image (cloud-init reads the job's NoCloud
seed, OpenSSH, Python 3), built from Debian's archive alone: ``mmdebstrap``
makes the root filesystem from the host's own bookworm apt sources (so a site
mirror is honoured), ``mkfs.ext4 -d`` packs it into a partitionless ext4 disk
(``root=/dev/vda``), ``qemu-img`` turns that into a compressed qcow2 base, and
the kernel and initramfs inside it are copied out for direct kernel boot.

Boot time matters more than anything else here (every job boots a fresh
guest, often without KVM), so the image masks what a short-lived worker never
needs and makes no unit wait for the network.  sshd starts only after
cloud-init has installed the job's host key, and a last unit writes
``vmwn-guest: ready`` to the console once both are done.
"""

import glob
import logging
import os
import re
import shutil
import tempfile
import time

from ..errors import SiteError
from ..subp import run

log = logging.getLogger(__name__)

SUITE = "bookworm"
SUITES = (SUITE, f"{SUITE}-updates", f"{SUITE}-security")
# The cloud flavour boots faster under TCG than the generic one (fewer drivers
# to probe, smaller initramfs) and has every virtio driver a guest needs.
KERNEL_META = "linux-image-cloud-amd64"
KERNEL_GLOB = "vmlinuz-*-cloud-amd64"
# OpenMPI's runtime (mpirun, orted, the libraries): a job on several nodes runs
# its MPI programs across its guests, built on a Debian 12 host with mpicc.
PACKAGES = [KERNEL_META, "systemd-sysv", "udev", "dbus", "openssh-server", "python3",
            "cloud-init", "iproute2", "openssh-client", "openmpi-bin"]
DISK_BYTES = 4 << 30
DISK_LABEL = "vmwn-root"
APT_SOURCES = "/etc/apt/sources.list"
# Program -> Debian package that provides it on the building host.
TOOLS = {"mmdebstrap": "mmdebstrap", "mkfs.ext4": "e2fsprogs", "qemu-img": "qemu-utils",
         "systemctl": "systemd", "chroot": "coreutils", "mount": "mount"}

# Units a one-job worker never needs; masked so no preset or dependency can
# start them.  getty@tty1 has no screen to serve: the console is ttyS0.
MASKED_UNITS = [
    "apt-daily.timer", "apt-daily.service", "apt-daily-upgrade.timer",
    "apt-daily-upgrade.service", "dpkg-db-backup.timer", "dpkg-db-backup.service",
    "e2scrub_all.timer", "e2scrub_all.service", "e2scrub_reap.service",
    "fstrim.timer", "fstrim.service", "man-db.timer", "logrotate.timer",
    "systemd-tmpfiles-clean.timer", "getty@tty1.service",
    "systemd-networkd-wait-online.service", "systemd-pstore.service",
    "cloud-init-hotplugd.socket", "cloud-init-hotplugd.service", "remote-fs.target",
    # The seed is read by cloud-init.service alone (as NoCloudNet; the seed says
    # dsmode net anyway): one Python start less, about 8 s under TCG.
    "cloud-init-local.service",
]
ENABLED_UNITS = ["systemd-networkd.service", "ssh.service", "vmwn-ready.service"]

FSTAB = "/dev/vda / ext4 defaults 0 1\n"
# OpenSSH's client set for the job's guests on several nodes (tiny's too).
SSH_CONFIG_SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                 "guest", "ssh_config")
RECIPE_FILES = (SSH_CONFIG_SOURCE,)


def _text(path):
    with open(path, encoding="utf-8") as f:
        return f.read()



# Files written into the root filesystem, relative path -> content.
GUEST_FILES = {
    # Only NoCloud (the job's seed) or nothing: no probing of metadata services.
    # Networking is systemd-networkd's below, not cloud-init's fallback.
    "etc/cloud/cloud.cfg.d/90-vmwn.cfg": """\
# vmwn: the job's seed arrives as a NoCloud disk labelled cidata.
datasource_list: [ NoCloud, None ]
network:
  config: disabled
# Only the modules a job's seed uses: each one costs boot time under emulation,
# and growpart/resizefs, locale, apt and the key printers have nothing to do here.
cloud_init_modules:
  - seed_random
  - bootcmd
  - write-files
  - set_hostname
  - update_hostname
  - update_etc_hosts
  - users-groups
  - ssh
cloud_config_modules:
  - set-passwords
  - runcmd
cloud_final_modules:
  - write-files-deferred
  - scripts-per-once
  - scripts-per-boot
  - scripts-per-instance
  - scripts-user
  - final-message
  - power-state-change
""",
    # A job on several nodes: its guest's second card, on the job's own network,
    # is in the last PCI slot (the domain template's).  It keeps the kernel's
    # name eth1, which the seed's lines name, and networkd leaves it to them.
    "etc/systemd/network/10-vmwn-job.link": """\
[Match]
Path=pci-0000:00:1f.0

[Link]
Name=eth1
""",
    "etc/systemd/network/10-vmwn-job.network": """\
[Match]
Name=eth1

[Link]
Unmanaged=yes
""",
    # DHCP on the user network's NIC, whatever name udev gives it
    # (ens30 for virtio-net in slot 0x1e of the pc machine; eth0 with net.ifnames=0).
    "etc/systemd/network/20-vmwn-dhcp.network": """\
[Match]
Type=ether
Name=en* eth*

[Network]
DHCP=ipv4
LinkLocalAddressing=no
IPv6AcceptRA=no

[DHCPv4]
UseDomains=yes
""",
    # sshd must never start without the job's host key: cloud-init's ssh module
    # writes it (the package's own keys are deleted at build time).
    "etc/systemd/system/ssh.service.d/10-vmwn.conf": """\
[Unit]
After=cloud-init.service
""",
    # What cloud-init-local.service (masked above) ordered for it.
    "etc/systemd/system/cloud-init.service.d/10-vmwn.conf": """\
[Unit]
After=systemd-remount-fs.service
RequiresMountsFor=/var/lib/cloud
""",
    # The job's key, copied there by the seed's runcmd: a home mounted from the
    # host hides the guest's ~/.ssh.  (cloud-init reads only sshd_config itself,
    # so it still writes the key into the guest's home first.)
    "etc/ssh/sshd_config.d/10-vmwn.conf": """\
AuthorizedKeysFile /etc/ssh/authorized_keys/%u
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
UseDNS no
PrintMotd no
""",
    # MPI between guests goes over the job's network, never the user network
    # (10.0.2.0/24: every guest has the same address there).
    "etc/openmpi/openmpi-mca-params.conf": """\
btl_tcp_if_exclude = 127.0.0.1/8,10.0.2.0/24
oob_tcp_if_exclude = 10.0.2.0/24
""",
    # The host may watch the serial console for this one line.
    "etc/systemd/system/vmwn-ready.service": """\
[Unit]
Description=Tell the vmwn host that SSH and cloud-init are done
Requires=ssh.service
After=ssh.service cloud-final.service

[Service]
Type=oneshot
ExecStart=/bin/echo vmwn-guest: ready
StandardOutput=tty
TTYPath=/dev/console
TTYReset=no
TTYVHangup=no

# cloud-final runs after multi-user.target, so this cannot be part of it.
[Install]
WantedBy=cloud-init.target
""",
    "etc/fstab": FSTAB,
    "etc/ssh/ssh_config.d/10-vmwn.conf": _text(SSH_CONFIG_SOURCE),
    "etc/hostname": "localhost\n",
    # Only the drivers a virtio guest boots from: a small initramfs unpacks
    # faster under software emulation.
    "etc/initramfs-tools/conf.d/vmwn.conf": "MODULES=list\n",
    "etc/initramfs-tools/modules": "virtio_pci\nvirtio_blk\next4\n",
}


def build(cfg, env, force=False):
    """Make ``env.image``, ``env.kernel`` and ``env.initrd``; quick if they exist."""
    targets = [env.image, env.kernel, env.initrd]
    if not all(targets):
        raise SiteError(f"environment {env.name!r} needs image, kernel and initrd paths",
                        f"set image, kernel and initrd in [env {env.name}]")
    if not force and all(os.path.isfile(p) for p in targets):
        log.info("%s: image, kernel and initrd exist; nothing to do", env.name)
        return
    check_tools()
    out_dir = os.path.dirname(env.image)
    for p in targets:
        os.makedirs(os.path.dirname(p), exist_ok=True)
    work = tempfile.mkdtemp(dir=out_dir, prefix=".build-")
    staged = []
    try:
        t0 = time.monotonic()
        root = os.path.join(work, "root")
        sources = os.path.join(work, "debian.sources")
        with open(sources, "w", encoding="utf-8") as f:
            f.write(render_sources(debian_sources()))
        bootstrap(root, sources)
        log.info("%s: root filesystem in %.0f s", env.name, time.monotonic() - t0)
        configure(root)
        kernel, initrd = boot_files(root)
        for src, dst in ((kernel, env.kernel), (initrd, env.initrd)):
            staged.append((_stage_copy(src, dst), dst))
        qcow = _temp_name(env.image)
        staged.append((qcow, env.image))
        make_disk(root, os.path.join(work, "root.raw"), qcow)
        for tmp, dst in staged:
            os.replace(tmp, dst)
        staged = []
        log.info("%s: built in %.0f s", env.name, time.monotonic() - t0)
    finally:
        for tmp, _ in staged:
            _unlink(tmp)
        remove_tree(work)


def check_tools():
    if os.geteuid() != 0:
        raise SiteError("building debian12 needs root (mmdebstrap --mode=root, chroot mounts)",
                        "run 'vmwn image build debian12' as root")
    missing = sorted({pkg for prog, pkg in TOOLS.items() if not shutil.which(prog)})
    if missing:
        raise SiteError(f"building debian12 needs the Debian packages {', '.join(missing)}",
                        f"apt-get install {' '.join(missing)}")


def debian_sources(paths=None, suites=SUITES):
    """The host's apt entries for ``suites``, as dicts (URIs, Suites, Components, Signed-By).

    Reading the host's own sources keeps a site's Debian mirror (or proxy
    URL) without naming any mirror here; entries for other suites and other
    vendors' repositories are left out.
    """
    if paths is None:
        paths = ([APT_SOURCES] if os.path.isfile(APT_SOURCES) else []) + sorted(
            glob.glob(APT_SOURCES + ".d/*.list") + glob.glob(APT_SOURCES + ".d/*.sources"))
    entries = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise SiteError(f"cannot read {path}: {e.strerror}", "fix the apt sources") from None
        parse = _parse_deb822 if path.endswith(".sources") else _parse_one_line
        for e in parse(text):
            if "deb" not in e["Types"] or e.get("Enabled", "yes").lower() == "no":
                continue
            wanted = [s for s in e["Suites"] if s in suites]
            if wanted and e["URIs"]:
                e["Suites"] = wanted
                entries.append(e)
    if not entries:
        raise SiteError(f"no apt source for Debian {suites[0]} in {APT_SOURCES}[.d]",
                        f"add the site's Debian mirror for {suites[0]} to the apt sources")
    return entries


def _parse_deb822(text):
    out = []
    for stanza in re.split(r"\n\s*\n", text):
        fields, key = {}, None
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0] in " \t" and key:
                fields[key] += "\n" + line.strip()
                continue
            if ":" in line:
                key, val = line.split(":", 1)
                key = key.strip()
                fields[key] = val.strip()
        if not fields:
            continue
        e = {k: v for k, v in fields.items()
             if k not in ("Types", "URIs", "Suites", "Components")}
        for k in ("Types", "URIs", "Suites", "Components"):
            e[k] = fields.get(k, "").split()
        out.append(e)
    return out


def _parse_one_line(text):
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.match(r"^(deb|deb-src)\s+(?:\[([^\]]*)\]\s+)?(\S+)\s+(\S+)\s*(.*)$", line)
        if not m:
            continue
        e = {"Types": [m.group(1)], "URIs": [m.group(3)], "Suites": [m.group(4)],
             "Components": m.group(5).split()}
        for opt in (m.group(2) or "").split():
            if "=" in opt:
                k, v = opt.split("=", 1)
                if k == "signed-by":
                    e["Signed-By"] = v
                elif k == "arch":
                    e["Architectures"] = v.replace(",", " ")
        out.append(e)
    return out


def render_sources(entries):
    """deb822 text of ``entries`` for mmdebstrap, which pastes it into the guest."""
    stanzas = []
    for e in entries:
        lines = ["Types: deb", f"URIs: {' '.join(e['URIs'])}",
                 f"Suites: {' '.join(e['Suites'])}",
                 f"Components: {' '.join(e['Components'] or ['main'])}"]
        for k in ("Signed-By", "Architectures", "Trusted"):
            if k in e:
                lines.append(f"{k}: {e[k]}")
        stanzas.append("\n".join(lines) + "\n")
    return "\n".join(stanzas)


def bootstrap(root, sources):
    """Install the guest's packages into ``root`` (a new directory) with mmdebstrap."""
    run(["mmdebstrap", "--mode=root", "--variant=apt", "--quiet",
         "--include=" + ",".join(PACKAGES), SUITE, root, sources],
        timeout=3600, fix="check the apt sources and network (the log shows apt's message)")


def configure(root):
    """Make the installed system a fast-booting, seed-driven worker."""
    for rel, text in GUEST_FILES.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    # Every guest gets its host key from its job's seed, never from the image.
    for key in glob.glob(os.path.join(root, "etc/ssh/ssh_host_*")):
        os.unlink(key)
    _sshd_no_passwords(os.path.join(root, "etc/ssh/sshd_config"))
    # Each boot makes its own machine id.
    with open(os.path.join(root, "etc/machine-id"), "w", encoding="utf-8"):
        pass
    _unlink(os.path.join(root, "var/lib/dbus/machine-id"))
    systemctl = ["systemctl", f"--root={root}"]
    run(systemctl + ["mask"] + MASKED_UNITS, timeout=120, fix="see the build log")
    run(systemctl + ["enable"] + ENABLED_UNITS, timeout=120, fix="see the build log")
    # Rebuild the initramfs with the module list written above.
    _chroot(root, ["update-initramfs", "-u", "-k", "all"], timeout=900)
    for d in ("var/lib/apt/lists", "var/cache/apt"):
        for p in glob.glob(os.path.join(root, d, "*")):
            if os.path.isfile(p):
                os.unlink(p)


def _sshd_no_passwords(path):
    """Say it in sshd_config itself: cloud-init's ``ssh_pwauth: false`` looks only
    there and restarts sshd (dropping connections) when it has to add it."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not re.search(r"^\s*PasswordAuthentication\s+no\s*$", text, re.M | re.I):
        with open(path, "a", encoding="utf-8") as f:
            f.write("\n# vmwn: keys only\nPasswordAuthentication no\n")


def _chroot(root, argv, timeout):
    """Run ``argv`` inside ``root`` with /proc, /sys and /dev mounted, then unmount."""
    mounts = []
    try:
        for fstype, src, rel, opts in (("proc", "proc", "proc", []),
                                       ("sysfs", "sysfs", "sys", []),
                                       (None, "/dev", "dev", ["--bind"])):
            target = os.path.join(root, rel)
            argv_m = ["mount"] + (opts or ["-t", fstype]) + [src, target]
            run(argv_m, timeout=30, fix="the build needs to mount inside its work directory")
            mounts.append(target)
        return run(["chroot", root] + argv, timeout=timeout, fix="see the build log")
    finally:
        for target in reversed(mounts):
            run(["umount", target], timeout=30, check=False)


def boot_files(root):
    """Paths of the installed kernel and its initramfs inside ``root``."""
    kernels = sorted(glob.glob(os.path.join(root, "boot", KERNEL_GLOB)))
    if len(kernels) != 1:
        raise SiteError(f"expected one {KERNEL_META} kernel in the root filesystem, "
                        f"found {len(kernels)}", "check the mmdebstrap package list")
    initrd = kernels[0].replace("/vmlinuz-", "/initrd.img-")
    if not os.path.isfile(initrd):
        raise SiteError(f"{os.path.basename(initrd)} was not generated",
                        "check that initramfs-tools is installed in the root filesystem")
    return kernels[0], initrd


def make_disk(root, raw, qcow):
    """Pack ``root`` into a sparse partitionless ext4 file, then a compressed qcow2."""
    with open(raw, "wb") as f:
        f.truncate(DISK_BYTES)
    # Initialise inode tables and journal now, so guests do not write them
    # into every job's overlay; qemu-img drops the zero blocks again.
    run(["mkfs.ext4", "-q", "-F", "-L", DISK_LABEL, "-m", "1",
         "-E", "lazy_itable_init=0,lazy_journal_init=0", "-d", root, raw],
        timeout=1800, fix="check free space in the image directory")
    run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", raw, qcow],
        timeout=1800, fix="check free space in the image directory")
    os.chmod(qcow, 0o644)
    os.unlink(raw)


def _temp_name(dst):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dst), prefix="." + os.path.basename(dst) + ".")
    os.close(fd)
    return tmp


def _stage_copy(src, dst):
    tmp = _temp_name(dst)
    shutil.copyfile(src, tmp)
    os.chmod(tmp, 0o644)
    return tmp


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _mounts_under(path):
    prefix = os.path.realpath(path).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if (point + "/").startswith(prefix):
                found.append(point)
    return found


def remove_tree(path):
    """Delete the work directory, but never through a mount left inside it."""
    if not os.path.isdir(path):
        return
    left = _mounts_under(path)
    for point in sorted(left, reverse=True):
        run(["umount", "--lazy", point], timeout=30, check=False)
    left = _mounts_under(path)
    if left:
        raise SiteError(f"{left[0]} is still mounted inside the build directory {path}",
                        f"unmount it, then remove {path}")
    shutil.rmtree(path)
