"""Failure paths of the job's identity, accounting and network policy, injected.

No guest is booted here: these are the checks that must refuse, or report,
before or instead of one.
"""

import dataclasses
import os
import stat
import subprocess
import time

import pytest

from vmwn.spec import JobSpec
from vmwn import disk, lifecycle, netpolicy, virt
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


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for iptables")
def test_no_loopback_rules_are_found_with_pbs_moms_path(monkeypatch):
    """pbs_mom runs the prologue with PATH=/bin:/usr/bin; iptables lives in /usr/sbin."""
    monkeypatch.setenv("PATH", "/bin:/usr/bin")
    netpolicy._ensure_rules()  # adds them once, or finds them there
    for cmd, rule in netpolicy.RULES:
        assert subprocess.run([f"/usr/sbin/{cmd}", "-w", "-C", *rule]).returncode == 0


def test_no_loopback_without_iptables_is_the_sites_problem(monkeypatch, tmp_path):
    monkeypatch.setattr(netpolicy, "SBIN", str(tmp_path))
    with pytest.raises(SiteError, match="iptables is not installed") as e:
        netpolicy._ensure_rules()
    assert "install Debian package iptables" in e.value.fix
