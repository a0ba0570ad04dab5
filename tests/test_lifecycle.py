"""The per-job VM lifecycle on the real libvirtd with real QEMU guests and real SSH."""

import concurrent.futures
import os
import stat
import time

import pytest

from vmwn.domain import guest_hostname

from vmwn import keys, lifecycle, state
from vmwn.spec import JobSpec
from vmwn.errors import SiteError, TransientError, UserError
from vmwn.ssh import Guest

from vmwn_testlib import leftovers, needs_image, site  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration
# Domain names are node-wide: job ids carry this run's pid so parallel runs never collide.
RUN = os.getpid()


def spec(cfg, job_id, env="tiny", user="alice", uid=4242, gid=4343, workdir="/home/alice/w"):
    e = cfg.env(env)
    return JobSpec(job_id=job_id, user=user, uid=uid, gid=gid, group="lab",
                   job_name="t", env=e, vcpus=1, memory_mib=e.memory_mib,
                   workdir=workdir, host_workdir="/nonexistent")


@needs_image("tiny")
def test_boot_exec_copy_destroy_leaves_nothing(site, tmp_path):
    job = f"101.{RUN}.lifecycle.test"
    st = lifecycle.create(site, spec(site, job), time.monotonic() + 180)
    try:
        assert st.phase == "running" and state.load(site, job).port == st.port
        key = os.stat(st.key_path)
        assert stat.S_IMODE(key.st_mode) == 0o600 and key.st_uid == 4242
        assert os.stat(state.state_path(site, job)).st_uid == 0
        with Guest.connect(st) as g:
            status, out, err = g.run("id -u; id -g; id -un; pwd; cd /home/alice/w && pwd; "
                                     "uname -r; hostname; echo oops >&2; exit 7")
            lines = out.decode().split()
            assert status == 7 and err == b"oops\n"
            assert lines[:3] == ["4242", "4343", "alice"]
            assert lines[4] == "/home/alice/w"
            assert lines[5] != os.uname().release  # the guest's kernel, not ours
            assert lines[6] == guest_hostname(job)
            sftp = g.sftp()
            payload = os.urandom(300_000)
            with sftp.open("/home/alice/w/in.bin", "wb") as f:
                f.write(payload)
            status, out, _ = g.run("sha256sum /home/alice/w/in.bin; "
                                   "cp /home/alice/w/in.bin /home/alice/w/out.bin")
            import hashlib
            assert out.split()[0].decode() == hashlib.sha256(payload).hexdigest()
            sftp.get("/home/alice/w/out.bin", str(tmp_path / "out.bin"))
            assert (tmp_path / "out.bin").read_bytes() == payload
            sftp.close()
            t = time.monotonic()
            with pytest.raises(TransientError, match="did not finish in 1 s"):
                g.run("sleep 30", timeout=1)
            assert time.monotonic() - t < 25  # gave up, did not wait for the command
    finally:
        removed = lifecycle.destroy(site, job)
    assert any(r.startswith("domain") for r in removed)
    assert leftovers(site, job) == []
    assert lifecycle.destroy(site, job) == []  # idempotent: a second teardown finds nothing


@needs_image("tiny")
def test_three_concurrent_jobs_get_distinct_names_and_ports(site):
    jobs = [f"{200 + i}.{RUN}.lifecycle.test" for i in range(3)]

    def one(job):
        st = lifecycle.create(site, spec(site, job), time.monotonic() + 240)
        with Guest.connect(st) as g:
            status, out, err = g.run("hostname")
        return st.domain, st.port, status, out.decode().strip(), err

    try:
        with concurrent.futures.ThreadPoolExecutor(3) as ex:
            results = list(ex.map(one, jobs))
    finally:
        for job in jobs:
            lifecycle.destroy(site, job)
    names = {r[0] for r in results}
    ports = {r[1] for r in results}
    assert len(names) == 3 and len(ports) == 3
    assert [r[2:4] for r in results] == [(0, guest_hostname(job)) for job in jobs], results
    for job in jobs:
        assert leftovers(site, job) == []


@needs_image("tiny")
def test_a_guest_presenting_another_host_key_is_refused(site):
    job = f"301.{RUN}.lifecycle.test"
    st = lifecycle.create(site, spec(site, job), time.monotonic() + 180)
    try:
        forged = state.JobState(**{**st.__dict__,
                                   "host_key_public": keys.generate("x").public_line})
        with pytest.raises(SiteError, match="presented a host key that is not job"):
            Guest.connect(forged)
        Guest.connect(st).close()  # the real key still works
    finally:
        lifecycle.destroy(site, job)
    assert leftovers(site, job) == []


@needs_image("tiny")
def test_a_guest_that_never_answers_fails_cleanly(site, tmp_path):
    """A kernel command line that panics: the prologue's error names the fix, nothing is left."""
    import dataclasses
    job = f"401.{RUN}.lifecycle.test"
    env = dataclasses.replace(site.env("tiny"), cmdline="console=ttyS0 no_timer_check panic=-1 rdinit=/nonexistent",
                              boot_timeout=20)
    s = dataclasses.replace(spec(site, job), env=env)
    t = time.monotonic()
    with pytest.raises(TransientError) as e:
        lifecycle.create(site, s, time.monotonic() + 60)
    assert time.monotonic() - t < 60
    assert "vmwn check --boot tiny" in str(e.value) and "\n" not in str(e.value)
    assert leftovers(site, job) == []


def test_missing_image_fails_before_anything_is_made(site):
    import dataclasses
    job = f"501.{RUN}.lifecycle.test"
    env = dataclasses.replace(site.env("tiny"), image="/nonexistent/base.qcow2")
    with pytest.raises(SiteError, match="not installed on this node.*vmwn image build tiny"):
        lifecycle.create(site, dataclasses.replace(spec(site, job), env=env), time.monotonic() + 5)
    assert not os.path.exists(state.job_dir(site, job))


def test_account_names_a_guest_cannot_take_are_the_sites_concern(site):
    job = "602.lifecycle.test"
    with pytest.raises(SiteError, match="cannot be used in a guest"):
        lifecycle.create(site, spec(site, job, user="Bad User"), time.monotonic() + 5)
    assert not os.path.exists(state.job_dir(site, job))


@pytest.mark.parametrize("kw, needle", [
    (dict(uid=0), "root"),
    (dict(workdir="relative/dir"), "not a plain absolute path"),
    (dict(workdir="/tmp/a\nb"), "not a plain absolute path"),
    (dict(workdir="/etc"), "system directory"),
    (dict(workdir="/proc/self"), "system directory"),
    (dict(workdir="/tmp/../etc"), "not a plain absolute path"),
])
def test_unsafe_specs_are_refused_before_anything_is_made(site, kw, needle):
    job = f"601.{RUN}.lifecycle.test"
    with pytest.raises(UserError, match=needle):
        lifecycle.create(site, spec(site, job, **kw), time.monotonic() + 5)
    assert not os.path.exists(state.job_dir(site, job))


@needs_image("tiny")
def test_libvirt_unreachable_leaves_nothing(site):
    import dataclasses
    job = f"701.{RUN}.lifecycle.test"
    cfg = dataclasses.replace(site, site={**site.site,
                                          "libvirt_uri": "qemu+unix:///system?socket=/nonexistent"})
    with pytest.raises(SiteError, match="cannot reach libvirt"):
        lifecycle.create(cfg, spec(cfg, job), time.monotonic() + 30)
    assert not os.path.exists(state.job_dir(cfg, job))
    assert not os.path.exists(os.path.join(cfg.site["overlay_dir"], state.safe_name(job) + ".qcow2"))


# debian12 through the whole stack: test_torque.py runs two of its jobs side by side.
