"""What a guest may reach on the network: an environment's ``network`` setting.

Guests use QEMU's user networking: every connection a guest makes leaves
the host as a connection of its QEMU, which runs as the job's user, so the
host sees the job's identity on it (firewall owner rules and per-user
accounting apply as to the job's own processes).  User networking also maps
the guest's gateway (10.0.2.2) to the host's loopback, so by default a guest
reaches every service listening on 127.0.0.1, as the job's user could.

- ``open``: as described.
- ``none``: QEMU's ``restrict=on`` (in the domain template): the guest
  reaches nothing, host and loopback included; vmwn's SSH forward into the
  guest still works.
- ``no-loopback``: everything but the host's loopback.  QEMU 7.2 has no
  switch for that, so the host's firewall does it: the job's QEMU is moved
  into the cgroup (v2) ``vmwn-no-loopback`` before its guest runs, and OUTPUT
  rules (iptables and ip6tables) reject new connections (TCP SYN, UDP) from
  that cgroup to the loopback interface.  The rules match that cgroup only and
  are added once.  Unix sockets are not network: a QEMU the job took over can
  reach those the job's user can.
  Connections into the guest through vmwn's forward are answers, not new
  connections, and pass.
"""

import os
import shutil

from . import subp
from .errors import SiteError
from .logsetup import job_logger

CGROUP = "vmwn-no-loopback"
MOUNTINFO = "/proc/self/mountinfo"
# (command, rule) pairs; each rule is checked with -C and added with -I.
# IPv6 too: the guest's user network has no IPv6, but a QEMU the job took over could
# try ::1 itself.
RULES = [(cmd, rule) for cmd in ("iptables", "ip6tables") for rule in (
    ["OUTPUT", "-o", "lo", "-p", "tcp", "--syn", "-m", "cgroup", "--path", CGROUP,
     "-j", "REJECT", "--reject-with", "tcp-reset"],
    ["OUTPUT", "-o", "lo", "-p", "udp", "-m", "cgroup", "--path", CGROUP, "-j", "REJECT"],
)]
_FIX = ("network = no-loopback needs cgroup v2 and iptables with the cgroup match; "
        "use 'none' or 'open' on this node")


def needs_paused_start(env):
    """True when the guest must not run before :func:`confine` has placed its QEMU."""
    return env.network == "no-loopback"


def cgroup2_root(mountinfo=None):
    """Where the cgroup v2 hierarchy is mounted, or None."""
    try:
        with open(mountinfo or MOUNTINFO, encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if " - cgroup2 " in line and len(fields) > 4:
                    return fields[4].replace("\\040", " ")
    except OSError:
        pass
    return None


def confine(env, job_id, pids):
    """Apply ``env``'s network policy to the job's QEMU processes ``pids``.

    Only ``no-loopback`` has anything to do here; raises SiteError if this
    node cannot enforce it (the job must not run with less than it asked for).
    """
    if env.network != "no-loopback":
        return
    log = job_logger(__name__, job_id)
    pids = [p for p in pids if p > 0]
    if not pids:
        raise SiteError("cannot find the QEMU process of the job's domain", "see libvirt's log")
    root = cgroup2_root()
    if root is None:
        raise SiteError("this node has no cgroup v2 hierarchy for network = no-loopback",
                        _FIX)
    group = os.path.join(root, CGROUP)
    try:
        os.makedirs(group, exist_ok=True)
    except OSError as e:
        raise SiteError(f"cannot create cgroup {group}: {e.strerror}", _FIX) from None
    _ensure_rules()
    for pid in pids:
        try:
            with open(os.path.join(group, "cgroup.procs"), "w", encoding="ascii") as f:
                f.write(str(pid))
        except OSError as e:
            raise SiteError(f"cannot move QEMU process {pid} into {group}: {e.strerror}",
                            _FIX) from None
    log.info("guest traffic to the host's loopback is refused (cgroup %s)", CGROUP)


# pbs_mom runs its prologue with PATH=/bin:/usr/bin: look where iptables lives.
SBIN = "/usr/sbin:/sbin:/usr/bin:/bin"


def _ensure_rules():
    for cmd, rule in RULES:
        path = shutil.which(cmd, path=SBIN)
        if path is None:
            raise SiteError(f"{cmd} is not installed, which network = no-loopback needs",
                            "install Debian package iptables, or use 'none' or 'open'")
        if subp.run([path, "-w", "-C", *rule], check=False, timeout=30).returncode == 0:
            continue
        subp.run([path, "-w", "-I", *rule], timeout=30, fix=_FIX)
