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
  that cgroup to the loopback interface.  The rules match that cgroup only.
  The first such job makes the cgroup and adds the rules; the teardown of a
  job that leaves the cgroup without processes removes both.  All of it
  (check, insert, move, removal) happens under one node-wide lock, so
  concurrent wardens and epilogues never add a rule twice or remove one a job
  still needs.  Unix sockets are not network: a QEMU the job took over can
  reach those the job's user can.
  Connections into the guest through vmwn's forward are answers, not new
  connections, and pass.
"""

import contextlib
import fcntl
import os
import shutil
import time

from . import subp
from .errors import SiteError
from .logsetup import job_logger

CGROUP = "vmwn-no-loopback"
MOUNTINFO = "/proc/self/mountinfo"
# Serialises every change to the cgroup and the rules on the node (root's /run).
LOCK = "/run/vmwn-no-loopback.lock"
# argv the iptables commands run under: none on a node; the tests' network
# namespace (ip netns exec NS) so that they never touch the host's firewall.
PREFIX = ()
_FIX = ("network = no-loopback needs cgroup v2 and iptables with the cgroup match; "
        "use 'none' or 'open' on this node")
# Seconds a teardown waits for the destroyed domain's last processes to leave the cgroup
# (spent only while another job's QEMU is in it).
SETTLE = 0.5
# Copies of a rule deleted at most (the check-then-insert race of older vmwn added a few).
_MAX_COPIES = 16


def rules():
    """(command, rule) pairs; each rule is checked with -C, added with -I, removed with -D.
    IPv6 too: the guest's user network has no IPv6, but a QEMU the job took over could
    try ::1 itself."""
    return [(cmd, rule) for cmd in ("iptables", "ip6tables") for rule in (
        ["OUTPUT", "-o", "lo", "-p", "tcp", "--syn", "-m", "cgroup", "--path", CGROUP,
         "-j", "REJECT", "--reject-with", "tcp-reset"],
        ["OUTPUT", "-o", "lo", "-p", "udp", "-m", "cgroup", "--path", CGROUP, "-j", "REJECT"],
    )]


def confines(env):
    """True when the job's QEMU goes into the cgroup (so its guest must not run
    before :func:`confine` has placed it there)."""
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
    with _locked():
        fresh = not os.path.isdir(group)
        try:
            os.makedirs(group, exist_ok=True)
        except OSError as e:
            raise SiteError(f"cannot create cgroup {group}: {e.strerror}", _FIX) from None
        if fresh:
            # A rule holds the cgroup it was added for: rules left from a cgroup
            # removed since would match nothing in the new one, yet -C finds them.
            _remove_rules()
        _ensure_rules()
        for pid in pids:  # under the lock: a teardown never sees the cgroup between
            try:
                with open(os.path.join(group, "cgroup.procs"), "w", encoding="ascii") as f:
                    f.write(str(pid))
            except OSError as e:
                raise SiteError(f"cannot move QEMU process {pid} into {group}: {e.strerror}",
                                _FIX) from None
    log.info("guest traffic to the host's loopback is refused (cgroup %s)", CGROUP)


def release(job_id, settle=None):
    """At a job's teardown: remove the rules and the cgroup once no process is left in
    it (the job's QEMU was the last).  True if they were removed; SiteError if they
    could not be (they then stay for the next teardown)."""
    root = cgroup2_root()
    group = os.path.join(root, CGROUP) if root else None
    if group is None or not os.path.isdir(group):
        return False  # the common case: no job of the node used no-loopback
    end = time.monotonic() + (SETTLE if settle is None else settle)
    while _procs(group) and time.monotonic() < end:
        time.sleep(0.05)  # the launcher's guard ends just after QEMU
    with _locked():
        if not os.path.isdir(group) or _procs(group):
            return False  # removed meanwhile, or another job's QEMU is confined there
        _remove_rules()
        try:
            os.rmdir(group)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise SiteError(f"cannot remove cgroup {group}: {e.strerror}",
                            "remove it by hand once it has no processes") from None
    job_logger(__name__, job_id).info("no job uses cgroup %s any more", CGROUP)
    return True


def _procs(group):
    try:
        with open(os.path.join(group, "cgroup.procs"), encoding="ascii") as f:
            return f.read().split()
    except FileNotFoundError:
        return []


@contextlib.contextmanager
def _locked():
    """Hold the node-wide lock of the cgroup and its rules (blocking; held for the
    few iptables commands, each bounded by its timeout)."""
    try:
        fd = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise SiteError(f"cannot open the lock {LOCK}: {e.strerror}",
                        "vmwn runs as root; check /run") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# pbs_mom runs its prologue with PATH=/bin:/usr/bin: look where iptables lives
# (a name of this module's own, which the unit tests point at fake programs).
SBIN = subp.SBIN


def _iptables(cmd):
    path = shutil.which(cmd, path=SBIN)
    if path is None:
        raise SiteError(f"{cmd} is not installed, which network = no-loopback needs",
                        "install Debian package iptables, or use 'none' or 'open'")
    return [*PREFIX, path, "-w"]


def _present(argv, rule):
    return subp.run([*argv, "-C", *rule], check=False, timeout=30).returncode == 0


def _ensure_rules():
    """Add each rule that is not there.  Call with the lock held: -C and -I are two
    commands, and two wardens between them would add a rule twice."""
    for cmd, rule in rules():
        argv = _iptables(cmd)
        if not _present(argv, rule):
            subp.run([*argv, "-I", *rule], timeout=30, fix=_FIX)


def _remove_rules():
    """Delete every copy of each rule.  Call with the lock held."""
    for cmd, rule in rules():
        argv = _iptables(cmd)
        for _ in range(_MAX_COPIES):
            if not _present(argv, rule):
                break
            subp.run([*argv, "-D", *rule], timeout=30, fix=_FIX)
