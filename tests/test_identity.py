"""Failure paths of the job's identity, accounting and network policy, injected.

No guest is booted here: these are the checks that must refuse, or report,
before or instead of one.
"""

import dataclasses
import os
import shutil
import stat
import subprocess
import time

import pytest

from vmwn.spec import JobSpec
from vmwn import disk, lifecycle, netpolicy, state, virt
from vmwn.torque import pbs
from vmwn.errors import SiteError

from conftest import user_python_path
from vmwn_testlib import site  # noqa: F401  (fixture)


@pytest.fixture
def base(tmp_path):
    """An environment's base files: root's, 0644."""
    paths = {}
    for role, name in (("image", "disk.qcow2"), ("kernel", "vmlinuz"), ("initrd", "initrd.img")):
        p = tmp_path / name
        p.write_bytes(b"x")
        os.chmod(p, 0o644)
        paths[role] = str(p)
    return paths


def _env(site, base):
    return dataclasses.replace(site.env("tiny"), image=base["image"], kernel=base["kernel"],
                               initrd=base["initrd"])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own files as others")
@pytest.mark.parametrize("how, says", [("chown", "owned by uid 4242"),
                                       ("g+w", "writable by its group"),
                                       ("o+w", "writable by others")])
def test_a_base_file_a_job_could_change_is_refused_before_anything_is_made(
        site, base, how, says):
    victim = base["kernel"]
    if how == "chown":
        os.chown(victim, 4242, 4343)
    else:
        os.chmod(victim, 0o664 if how == "g+w" else 0o646)
    env = _env(site, base)
    spec = JobSpec(job_id="61.identity.test", user="alice", uid=4242, gid=4343,
                   group="lab", job_name="t", env=env, vcpus=1, memory_mib=256,
                   workdir="/home/alice/w", host_workdir="/nonexistent")
    with pytest.raises(SiteError) as e:
        lifecycle.create(site, spec, time.monotonic() + 60)
    assert victim in e.value.problem and says in e.value.problem
    assert "vmwn image build tiny" in e.value.fix
    assert not os.path.exists(os.path.join(site.site["state_dir"], "61.identity.test"))
    assert disk.seal_base(env) == [victim]
    assert disk.unsealed_base(env) is None
    s = os.stat(victim)
    assert (s.st_uid, s.st_gid, stat.S_IMODE(s.st_mode)) == (0, 0, 0o644)
    assert disk.seal_base(env) == []  # nothing more to do


def test_libvirts_domain_directory_gets_search_permission_for_others_only(tmp_path):
    d = tmp_path / "qemu"
    d.mkdir(mode=0o750)
    os.chmod(d, 0o750)
    assert virt.open_domain_dirs(str(d)) is True
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o751
    assert virt.open_domain_dirs(str(d)) is False
    assert virt.open_domain_dirs(str(tmp_path / "missing")) is False


def test_cgroup2_mount_is_found_in_mountinfo(tmp_path):
    mi = tmp_path / "mountinfo"
    mi.write_text(
        "24 30 0:22 / /sys rw,nosuid - sysfs sysfs rw\n"
        "35 24 0:30 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n")
    assert netpolicy.cgroup2_root(str(mi)) == "/sys/fs/cgroup/unified"
    mi.write_text("24 30 0:22 / /sys rw - sysfs sysfs rw\n")
    assert netpolicy.cgroup2_root(str(mi)) is None


def test_no_loopback_without_a_qemu_process_refuses_rather_than_moves_anything(site):
    env = dataclasses.replace(site.env("tiny"), network="no-loopback")
    with pytest.raises(SiteError, match="cannot find the QEMU process"):
        netpolicy.confine(env, "62.identity.test", [0])  # 0 would be the caller itself
    netpolicy.confine(dataclasses.replace(env, network="open"), "62.identity.test", [0])


def test_no_loopback_on_a_node_without_cgroup2_is_the_sites_problem(site, monkeypatch):
    env = dataclasses.replace(site.env("tiny"), network="no-loopback")
    monkeypatch.setattr(netpolicy, "MOUNTINFO", "/nonexistent/mountinfo")
    with pytest.raises(SiteError, match="no cgroup v2") as e:
        netpolicy.confine(env, "63.identity.test", [os.getpid()])
    assert "'none' or 'open'" in e.value.fix


def test_adoption_without_a_reachable_mom_is_a_site_error_naming_tm_adopt(monkeypatch):
    pytest.importorskip("pbs")
    monkeypatch.setenv("PBS_MOMPORT", "9")  # discard: nothing listens
    monkeypatch.setenv("PBS_JOBCOOKIE", "0123")
    with pytest.raises(pbs.AdoptFailed) as e:
        pbs.adopt("64.identity.test", os.getpid())
    assert "did not adopt" in e.value.problem and "TM_" in e.value.problem


def test_adoption_of_a_session_that_is_not_the_callers_is_refused_by_libtorque(test_user):
    """What a job starter would get for another user's QEMU: libtorque refuses it."""
    pytest.importorskip("pbs")
    python, path = user_python_path()
    code = ("import os\nfrom vmwn.torque import pbs\ntry:\n    pbs.adopt('65.identity.test', 1)\n"
            "except pbs.AdoptFailed as e:\n    print(e.problem)\n")
    r = subprocess.run(["setpriv", f"--reuid={test_user.pw_uid}", f"--regid={test_user.pw_gid}",
                        "--clear-groups", python, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=path, PBS_JOBCOOKIE="0123"), cwd="/",
                       timeout=30)
    assert "TM_EPERM" in r.stdout, (r.stdout, r.stderr)


def test_adoption_outside_a_pbs_mom_job_fails_at_once(monkeypatch):
    """Without the job's cookie libtorque would retry a mom for 5 s and fail anyway."""
    monkeypatch.delenv("PBS_JOBCOOKIE", raising=False)
    with pytest.raises(pbs.AdoptFailed, match="no PBS_JOBCOOKIE"):
        pbs.adopt("66.identity.test", os.getpid())


# ---------------------------------------------------------------- no-loopback's rules
#
# Unit tests never change the host's firewall: netpolicy.SBIN points at fake
# iptables/ip6tables that keep their rules in files and record each call, and
# whether the node-wide lock was held during it.  The integration test below
# runs the real commands in a network namespace of its own.

FAKE_IPTABLES = r"""#!/bin/bash
name=$(basename "$0")
op=$2
shift 2
rule="$*"
if flock -n "$VMWN_TEST_LOCK" true; then held=unlocked; else held=locked; fi
echo "$0 $op $held $rule" >> "$VMWN_TEST_DIR/calls"
db="$VMWN_TEST_DIR/$name.rules"
touch "$db"
if [ -e "$VMWN_TEST_DIR/fail$op" ]; then
    echo "iptables v1.8.9 (nf_tables): RULE_INSERT failed (Invalid argument): rule in chain OUTPUT" >&2
    exit 4
fi
case "$op" in
-C) grep -qxF -- "$rule" "$db" ;;
-I) sleep 0.2; echo "$rule" >> "$db" ;;
-D) grep -qxF -- "$rule" "$db" || exit 1
    awk -v r="$rule" '!done && $0 == r { done = 1; next } 1' "$db" > "$db.new"
    mv "$db.new" "$db" ;;
esac
"""


@pytest.fixture
def fake_firewall(tmp_path, monkeypatch):
    """Fake iptables and ip6tables in netpolicy.SBIN, a fake cgroup v2 mount, and the
    lock in tmp_path.  Yields a namespace with the calls and the rules so far."""
    import types
    sbin = tmp_path / "sbin"
    sbin.mkdir()
    for name in ("iptables", "ip6tables"):
        (sbin / name).write_text(FAKE_IPTABLES)
        (sbin / name).chmod(0o755)
    cgroot = tmp_path / "cgroup2"
    cgroot.mkdir()
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"35 24 0:30 / {cgroot} rw,nosuid - cgroup2 cgroup2 rw\n")
    lock = tmp_path / "netpolicy.lock"
    monkeypatch.setattr(netpolicy, "SBIN", str(sbin))
    monkeypatch.setattr(netpolicy, "MOUNTINFO", str(mountinfo))
    monkeypatch.setattr(netpolicy, "LOCK", str(lock))
    monkeypatch.setattr(netpolicy, "SETTLE", 0.0)
    monkeypatch.setenv("PATH", "/bin:/usr/bin")  # pbs_mom's, where iptables is not
    monkeypatch.setenv("VMWN_TEST_DIR", str(tmp_path))
    monkeypatch.setenv("VMWN_TEST_LOCK", str(lock))

    def calls():
        p = tmp_path / "calls"
        return [ln.split(" ", 3) for ln in p.read_text().splitlines()] if p.exists() else []

    def table(name):
        p = tmp_path / f"{name}.rules"
        return p.read_text().splitlines() if p.exists() else []

    def forget_calls():
        (tmp_path / "calls").unlink(missing_ok=True)

    return types.SimpleNamespace(sbin=str(sbin), group=str(cgroot / netpolicy.CGROUP),
                                 calls=calls, table=table, forget_calls=forget_calls,
                                 dir=tmp_path)


def _no_loopback(site):
    return dataclasses.replace(site.env("tiny"), network="no-loopback")


def _rule_lines(cmd):
    return [" ".join(rule) for c, rule in netpolicy.rules() if c == cmd]


def test_no_loopback_rules_are_checked_then_added_under_the_lock_with_pbs_moms_path(
        site, fake_firewall):
    """pbs_mom runs the prologue with PATH=/bin:/usr/bin; iptables lives in sbin."""
    f = fake_firewall
    netpolicy.confine(_no_loopback(site), "67.identity.test", [4321])
    with open(os.path.join(f.group, "cgroup.procs")) as procs:
        assert procs.read() == "4321"
    added = [c for c in f.calls() if c[1] == "-I"]
    assert [(c[0], c[3]) for c in added] == [
        (os.path.join(f.sbin, cmd), " ".join(rule)) for cmd, rule in netpolicy.rules()]
    for cmd, rule in netpolicy.rules():  # each -I right after its own -C
        line = " ".join(rule)
        ops = [c[1] for c in f.calls() if c[0].endswith("/" + cmd) and c[3] == line]
        assert ops[-2:] == ["-C", "-I"], ops
    assert {c[2] for c in f.calls()} == {"locked"}
    assert f.table("iptables") == _rule_lines("iptables")
    assert f.table("ip6tables") == _rule_lines("ip6tables")

    f.forget_calls()  # a second job finds the rules there and adds none
    netpolicy.confine(_no_loopback(site), "68.identity.test", [4322])
    assert [c[1] for c in f.calls()] == ["-C"] * 4
    assert f.table("iptables") == _rule_lines("iptables")


def test_no_loopback_rules_are_added_once_by_concurrent_jobs(site, fake_firewall):
    """-C and -I are two commands: two wardens between them would add a rule twice
    (the fake -I takes 0.2 s, so without the lock they would)."""
    f = fake_firewall
    children = []
    for i in range(2):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                netpolicy.confine(_no_loopback(site), f"69{i}.identity.test", [5000 + i])
                code = 0
            finally:
                os._exit(code)
        children.append(pid)
    assert [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in children] == [0, 0]
    assert f.table("iptables") == _rule_lines("iptables")
    assert f.table("ip6tables") == _rule_lines("ip6tables")


def test_no_loopback_rules_and_cgroup_go_with_the_last_job(site, fake_firewall):
    f = fake_firewall
    netpolicy.confine(_no_loopback(site), "70.identity.test", [4321])
    with open(f.dir / "iptables.rules", "a") as db:  # a copy an older vmwn's race added
        db.write(_rule_lines("iptables")[0] + "\n")
    assert netpolicy.release("70.identity.test") is False  # a QEMU is still in the cgroup
    assert len(f.table("iptables")) == 3 and os.path.isdir(f.group)

    # The fake cgroup file system: an empty cgroup is an empty directory.
    os.unlink(os.path.join(f.group, "cgroup.procs"))
    f.forget_calls()
    assert netpolicy.release("70.identity.test") is True
    assert f.table("iptables") == [] and f.table("ip6tables") == []
    assert not os.path.exists(f.group)
    deleted = [c for c in f.calls() if c[1] == "-D"]
    assert len(deleted) == 5 and {c[2] for c in f.calls()} == {"locked"}
    assert netpolicy.release("70.identity.test") is False  # nothing left to remove


def test_a_fresh_cgroup_replaces_rules_left_for_a_removed_one(site, fake_firewall):
    """A rule holds the cgroup it was added for: one left from a cgroup removed since
    would match nothing in the new one, though -C finds it."""
    f = fake_firewall
    for cmd in ("iptables", "ip6tables"):
        (f.dir / f"{cmd}.rules").write_text("\n".join(_rule_lines(cmd)) + "\n")
    netpolicy.confine(_no_loopback(site), "71.identity.test", [4321])
    ops = [c[1] for c in f.calls()]
    assert ops.count("-D") == 4 and ops.count("-I") == 4
    assert f.table("iptables") == _rule_lines("iptables")


def _recorded(cfg, job_id):
    """A state record of a job of the tiny environment, without a domain."""
    d = state.make_job_dir(cfg, job_id)
    state.save(cfg, state.JobState(
        job_id=job_id, domain="vmwn-" + state.safe_name(job_id), env="tiny", user="alice",
        uid=4242, gid=4242, group="lab", bind_address="127.0.0.1", port=43555,
        host_key_public="", key_path=os.path.join(d, "id_ed25519"), workdir="/w",
        host_workdir="/w", output_dir="/w", overlay="", seed=os.path.join(d, "seed.iso"),
        console_log="", created=time.time()))


@pytest.mark.parametrize("network, counted", [("no-loopback", True), ("open", False)])
def test_the_last_teardown_removes_the_rules_and_only_a_confined_job_counts_them(
        site, fake_firewall, network, counted):
    """The cgroup is the node's: any teardown that finds it empty removes it (so one
    that could not is retried by the next), but a job whose guest was never confined
    there does not list it among what it removed (nor does a second teardown)."""
    import vmwn_testlib
    cfg = dataclasses.replace(
        site, site={**site.site, "libvirt_uri": "test:///default"},
        environments={**site.environments,
                      "tiny": dataclasses.replace(site.env("tiny"), network=network)})
    f = fake_firewall
    netpolicy.confine(_no_loopback(site), "72.identity.test", [4321])
    _recorded(cfg, "73.identity.test")
    os.unlink(os.path.join(f.group, "cgroup.procs"))  # the last QEMU ended with its domain
    removed = lifecycle.destroy(cfg, "73.identity.test")
    assert (f"cgroup {netpolicy.CGROUP} and its firewall rules" in removed) is counted
    assert f.table("iptables") == [] and not os.path.exists(f.group)
    assert vmwn_testlib.leftovers(cfg, "73.identity.test") == []
    assert lifecycle.destroy(cfg, "73.identity.test") == []


def test_a_second_teardown_cleans_what_the_node_left_and_lists_nothing(site, fake_firewall):
    import vmwn_testlib
    cfg = dataclasses.replace(site, site={**site.site, "libvirt_uri": "test:///default"})
    f = fake_firewall
    netpolicy.confine(_no_loopback(site), "76.identity.test", [4321])
    os.unlink(os.path.join(f.group, "cgroup.procs"))
    assert lifecycle.destroy(cfg, "77.identity.test") == []  # no record: not its cgroup
    assert f.table("iptables") == [] and not os.path.exists(f.group)
    assert vmwn_testlib.leftovers(cfg, "77.identity.test") == []


def test_an_iptables_failure_is_the_sites_problem_with_the_fix(site, fake_firewall):
    f = fake_firewall
    (f.dir / "fail-I").touch()
    with pytest.raises(SiteError) as e:
        netpolicy.confine(_no_loopback(site), "73.identity.test", [4321])
    assert "RULE_INSERT failed" in e.value.problem
    assert e.value.fix == ("network = no-loopback needs cgroup v2 and iptables with the "
                           "cgroup match; use 'none' or 'open' on this node")
    import fcntl
    with open(netpolicy.LOCK) as lock:  # not left held
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _netns_iptables(ns, cmd, *args):
    ip = shutil.which("ip", path=netpolicy.SBIN)
    return subprocess.run([ip, "netns", "exec", ns, shutil.which(cmd, path=netpolicy.SBIN),
                           "-w", *args], capture_output=True, text=True, timeout=30)


def _host_rules(cmd):
    return subprocess.run([shutil.which(cmd, path=netpolicy.SBIN), "-w", "-S", "OUTPUT"],
                          capture_output=True, text=True, timeout=30).stdout


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip", path=netpolicy.SBIN)
                    or not shutil.which("iptables", path=netpolicy.SBIN),
                    reason="needs root, ip and iptables")
def test_no_loopback_is_enforced_or_refused_in_a_throwaway_network_namespace(
        site, tmp_path, monkeypatch):
    """The node's own answer, probed where the host's firewall is never touched: the
    rules go into a network namespace made for the test, the cgroup is the test's."""
    tag = f"vmwn-test-{os.getpid()}"
    ip = shutil.which("ip", path=netpolicy.SBIN)
    subprocess.run([ip, "netns", "add", tag], check=True, timeout=30)
    monkeypatch.setattr(netpolicy, "PREFIX", (ip, "netns", "exec", tag))
    monkeypatch.setattr(netpolicy, "CGROUP", tag)
    monkeypatch.setattr(netpolicy, "LOCK", str(tmp_path / "netpolicy.lock"))
    root = netpolicy.cgroup2_root()
    group = os.path.join(root, tag) if root else None
    host_before = {cmd: _host_rules(cmd) for cmd in ("iptables", "ip6tables")}
    qemu = subprocess.Popen(["sleep", "300"])  # stands for the job's QEMU
    try:
        try:
            netpolicy.confine(_no_loopback(site), "74.identity.test", [qemu.pid])
        except SiteError as e:  # this node cannot enforce it: jobs asking are refused
            assert "needs cgroup v2 and iptables with the cgroup match" in e.value.fix
            assert root is None or "iptables" in e.value.problem, e.value.line()
            return
        with open(f"/proc/{qemu.pid}/cgroup") as f:
            assert f"0::/{tag}\n" in f.read()
        for cmd in ("iptables", "ip6tables"):
            listed = _netns_iptables(tag, cmd, "-S", "OUTPUT").stdout
            assert listed.count(f"--path {tag} ") == 2, listed
        assert netpolicy.release("74.identity.test") is False  # its QEMU still runs
        qemu.kill()
        qemu.wait()
        assert netpolicy.release("74.identity.test") is True
        for cmd in ("iptables", "ip6tables"):
            assert tag not in _netns_iptables(tag, cmd, "-S", "OUTPUT").stdout
        assert not os.path.exists(group)
    finally:
        qemu.kill()
        qemu.wait()
        if group and os.path.isdir(group):
            os.rmdir(group)
        subprocess.run([ip, "netns", "delete", tag], check=True, timeout=30)
        assert {cmd: _host_rules(cmd) for cmd in ("iptables", "ip6tables")} == host_before


def test_no_loopback_without_iptables_is_the_sites_problem(monkeypatch, tmp_path):
    monkeypatch.setattr(netpolicy, "SBIN", str(tmp_path))
    with pytest.raises(SiteError, match="iptables is not installed") as e:
        netpolicy._ensure_rules()
    assert "install Debian package iptables" in e.value.fix
