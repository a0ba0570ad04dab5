"""``vmwn ps`` and ``vmwn reap``: what counts as ended, what is removed, what is left alone."""

import dataclasses
import fcntl
import json
import logging
import os
import time

import pytest

from vmwn import cli, reap as reapmod, state
from vmwn.commands import operators
from vmwn.torque import pbs
from vmwn.errors import SiteError

from vmwn_testlib import IMAGE_DIR, leftovers, qemu_reachable_dir, write_config

HAVE_TINY = all(os.path.exists(os.path.join(IMAGE_DIR, "tiny", f))
                for f in ("disk.qcow2", "vmlinuz", "initrd.img"))
OLD = time.time() - 3600



@pytest.fixture
def site(request):
    """A configuration with its own state, overlays and PBS_HOME (mom_priv/jobs exists);
    unit tests get libvirt's test driver, integration tests the real libvirtd."""
    from vmwn import config
    import shutil
    base = qemu_reachable_dir("vmwn-ops-")
    uri = "" if request.node.get_closest_marker("integration") else \
        "\nlibvirt_uri = test:///default"
    path = write_config(base, site_extra=f"pbs_home = {base}/torque{uri}",
                        ports="43500-43599")
    os.makedirs(f"{base}/torque/mom_priv/jobs")
    cfg = config.load(path)
    yield cfg
    shutil.rmtree(base, ignore_errors=True)


def jobs_dir(cfg):
    return os.path.join(cfg.site["pbs_home"], "mom_priv", "jobs")


def fake_job(cfg, job_id, created=OLD, overlay=True, batch=""):
    """State record, key-like file and overlay of a job, without a domain."""
    d = state.make_job_dir(cfg, job_id)
    ov = ""
    if overlay:
        os.makedirs(cfg.site["overlay_dir"], exist_ok=True)
        ov = os.path.join(cfg.site["overlay_dir"], state.safe_name(job_id) + ".qcow2")
        open(ov, "w").close()
        os.utime(ov, (created, created))
    st = state.JobState(job_id=job_id, domain="vmwn-" + state.safe_name(job_id), env="tiny",
                        user="alice", uid=4242, gid=4242, group="lab", bind_address="127.0.0.1",
                        port=43555, host_key_public="", key_path=os.path.join(d, "id_ed25519"),
                        workdir="/w", host_workdir="/w", output_dir="/w", overlay=ov,
                        seed=os.path.join(d, "seed.iso"), console_log="", created=created,
                        batch=batch)
    state.save(cfg, st)
    open(st.key_path, "w").close()
    return st


def mom_record(cfg, job_id, kind=".JB", body=None):
    with open(os.path.join(jobs_dir(cfg), job_id + kind), "w") as f:
        f.write(body if body is not None else f"<job><jobid>{job_id}</jobid></job>")


def reap(cfg, *argv):
    return cli.main(["--config", cfg.files[0], "reap", "--pbs-home", cfg.site["pbs_home"], *argv])


# ------------------------------------------------------------------ judging jobs

def test_mom_records_decide_which_jobs_are_here(site):
    mom_record(site, "1.srv", ".JB")
    mom_record(site, "2.srv", ".SC", body="#!/bin/sh\n")
    mom_record(site, "3.short", ".JB", body="<job><jobid>3.very.long.server.name</jobid></job>")
    mom = pbs.MomJobs(site.site["pbs_home"])
    assert mom.present("1.srv") and mom.present("2.srv")
    assert mom.present("3.very.long.server.name")  # prefix shortened, id in the record
    assert not mom.present("4.srv")


def test_without_mom_priv_reap_refuses_to_judge(site, tmp_path):
    with pytest.raises(SiteError, match="cannot tell which jobs are still on this node"):
        pbs.MomJobs(str(tmp_path / "nothing")).read()


def test_reap_removes_state_key_and_overlay_of_ended_jobs_only(site, capsys, caplog):
    gone = fake_job(site, "10.srv")
    here = fake_job(site, "11.srv")
    young = fake_job(site, "12.srv", created=time.time())
    mom_record(site, "11.srv")
    caplog.set_level(logging.INFO, logger="vmwn.reap")
    assert reap(site) == 0
    out = capsys.readouterr().out
    assert "removed overlay" in out and "of job 10.srv" in out
    assert "11.srv" not in out and "12.srv" not in out
    assert not os.path.exists(state.job_dir(site, "10.srv")) and not os.path.exists(gone.overlay)
    for st in (here, young):
        assert os.path.exists(st.key_path) and os.path.exists(st.overlay)
    # Every removal is also a log line (syslog for operators).
    assert sum("reap: removed" in r.getMessage() for r in caplog.records) == out.count("removed")


def test_dry_run_removes_nothing(site, capsys):
    st = fake_job(site, "20.srv")
    assert reap(site, "--dry-run") == 0
    assert "would remove domain, overlay and state of job 20.srv" in capsys.readouterr().out
    assert os.path.exists(st.key_path) and os.path.exists(st.overlay)


def test_orphan_directory_and_overlay_are_removed_after_the_grace_period(site, capsys):
    orphan = os.path.join(site.site["state_dir"], "30.srv-deadbeef")
    os.makedirs(orphan)
    open(os.path.join(orphan, "id_ed25519"), "w").close()
    os.makedirs(site.site["overlay_dir"], exist_ok=True)
    lone = os.path.join(site.site["overlay_dir"], "31.srv-cafecafe.qcow2")
    fresh = os.path.join(site.site["overlay_dir"], "32.srv-abababab.qcow2")
    open(lone, "w").close()
    open(fresh, "w").close()
    os.utime(orphan, (OLD, OLD))
    os.utime(lone, (OLD, OLD))
    assert reap(site) == 0
    out = capsys.readouterr().out
    assert f"removed state directory {orphan}" in out and f"removed overlay {lone}" in out
    assert not os.path.exists(orphan) and not os.path.exists(lone)
    assert os.path.exists(fresh)  # a prologue may be creating it right now


def test_grace_option(site):
    st = fake_job(site, "40.srv", created=time.time() - 30)
    assert reap(site) == 0 and os.path.exists(st.key_path)
    assert reap(site, "--grace", "10") == 0 and not os.path.exists(st.key_path)


def test_bounded_reap_skips_while_another_process_reaps(site, caplog):
    import threading
    st = fake_job(site, "50.srv")
    fd = os.open(state.ensure_root(site), os.O_RDONLY | os.O_DIRECTORY)
    got = []
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        # A reap that waited for the lock would wait until the lock is released
        # below: the thread would still be running when join's hang guard expires.
        caplog.set_level(logging.INFO, logger="vmwn.reap")
        t = threading.Thread(target=lambda: got.append(
            reapmod.bounded_reap(site, pbs.MomJobs(site.site["pbs_home"]).present)), daemon=True)
        t.start()
        t.join(60)
        assert not t.is_alive(), "bounded_reap waited for the other reaper's lock"
        assert got == [[]] and os.path.exists(st.key_path)
        assert "reap skipped: another process is reaping" in caplog.messages
    finally:
        os.close(fd)
    lines = reapmod.bounded_reap(site, pbs.MomJobs(site.site["pbs_home"]).present)
    assert any("50.srv" in line for line in lines) and not os.path.exists(st.key_path)


def test_bounded_reap_stops_at_its_deadline(site):
    for i in range(5):
        fake_job(site, f"6{i}.srv")
    r = reapmod.Reaper(site, pbs.MomJobs(site.pbs_home).present, grace=0,
                       deadline=time.monotonic() - 1)
    assert r.run() == []
    assert len(state.all_jobs(site)) == 5


def test_a_batch_systems_reap_leaves_another_batch_systems_jobs_alone(site):
    """A node moving from Torque to Slurm runs both: Torque's prologue must not
    take a live Slurm job for one of its own that ended."""
    fake_job(site, "80.srv", batch="torque")
    slurms = fake_job(site, "81", batch="slurm")
    fake_job(site, "82.srv")  # recorded before jobs named their batch system
    lines = reapmod.bounded_reap(site, pbs.MomJobs(site.pbs_home).present, grace=0,
                                 batch="torque")
    assert sorted(st.job_id for st in state.all_jobs(site)) == ["81"], lines
    assert os.path.exists(slurms.overlay) and os.path.exists(slurms.key_path)
    # without a batch system named (vmwn reap), every job is judged
    reapmod.Reaper(site, pbs.MomJobs(site.pbs_home).present, grace=0).run()
    assert state.all_jobs(site) == []


def test_bounded_reap_never_raises(site, tmp_path):
    fake_job(site, "70.srv")
    assert reapmod.bounded_reap(site, pbs.MomJobs(str(tmp_path / "no-pbs-home")).present) == []


def test_ps_lists_state_records_without_a_domain(site, capsys):
    fake_job(site, "80.srv")
    os.makedirs(os.path.join(site.site["state_dir"], "81.srv-00000000"))
    assert cli.main(["--config", site.files[0], "ps", "--json"]) == 0
    rows = {r["job_id"] or r["state"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["80.srv"]["state"] == "no domain (phase creating)"
    assert rows["80.srv"]["user"] == "alice" and rows["80.srv"]["port"] == 43555
    assert any(k.startswith("no state record:") for k in rows)
    assert cli.main(["--config", site.files[0], "ps"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["JOB", "USER", "ENV", "STATE"]
    assert any(line.startswith("80.srv") for line in table)


# ------------------------------------------------------------- real domains

def _start_hand_made_domain(cfg, job_id, where):
    """A transient domain carrying vmwn metadata for ``job_id``, files under ``where``."""
    from vmwn import domain, virt
    os.makedirs(where, exist_ok=True)
    seed = os.path.join(where, "seed.img")
    with open(seed, "wb") as f:
        f.truncate(1 << 20)
    xml = domain.render(cfg, cfg.env("tiny"), job_id=job_id, user="nobody", port=0,
                        overlay="", seed=seed, console_log=os.path.join(where, "console.log"),
                        created=int(OLD))
    conn = virt.connect(cfg.site["libvirt_uri"])
    try:
        dom = virt.start(conn, xml)
        assert dom.isActive()
    finally:
        conn.close()


@pytest.mark.integration
@pytest.mark.skipif(not HAVE_TINY or os.geteuid() != 0, reason="needs root and the tiny image")
def test_reap_removes_a_hand_made_domain_of_a_job_that_does_not_exist(site, capsys):
    job = "90.no-such-job.example"
    _start_hand_made_domain(site, job, os.path.join(site.site["state_dir"],
                                                    state.safe_name(job)))
    try:
        assert cli.main(["--config", site.files[0], "ps", "--json"]) == 0
        assert job in [r["job_id"] for r in json.loads(capsys.readouterr().out)]
        assert reap(site) == 0
        assert f"domain vmwn-{state.safe_name(job)} of job {job}" in capsys.readouterr().out
        assert leftovers(site, job) == []
    finally:
        from vmwn import lifecycle
        lifecycle.destroy(site, job)


@pytest.mark.integration
@pytest.mark.skipif(not HAVE_TINY or os.geteuid() != 0, reason="needs root and the tiny image")
def test_reap_leaves_domains_of_another_configuration_alone(site):
    """libvirt is shared: a domain whose files live under another state_dir is not ours."""
    from vmwn import lifecycle
    other = qemu_reachable_dir("vmwn-ops-other-")
    job = "91.other-config.example"
    try:
        _start_hand_made_domain(site, job, other)
        assert reap(site) == 0
        assert leftovers(site, job) != []
        # Its own configuration does reap it.
        other_cfg = dataclasses.replace(site, site={**site.site, "state_dir": other})
        reapmod.Reaper(other_cfg, pbs.MomJobs(other_cfg.pbs_home).present, grace=0).run()
        assert leftovers(site, job) == []
    finally:
        lifecycle.destroy(site, job)
        import shutil
        shutil.rmtree(other, ignore_errors=True)


@pytest.mark.integration
@pytest.mark.skipif(not HAVE_TINY or os.geteuid() != 0, reason="needs root and the tiny image")
def test_the_prologue_heals_the_node(world_tmp, test_user):
    """Remains of an ended job (no epilogue ran) are gone after the next VM job's prologue."""
    from test_faults import Node
    node = Node(world_tmp, test_user)
    gone = fake_job(node.cfg, "99.ended-without-epilogue")
    run = node.job(script="#!/bin/sh\necho hi\n")
    assert run.run_all().status == 0
    assert not os.path.exists(gone.key_path) and not os.path.exists(gone.overlay)
    assert "removed overlay" in node.logs()
    run.assert_clean()


def test_slurm_holds_the_jobs_that_have_a_slurmstepd_here(tmp_path):
    from vmwn.slurm import stepd
    for pid, cmdline in ((10, b"slurmstepd: [42.batch]\0\0\0"), (11, b"slurmstepd: [42.extern]"),
                         (12, b"slurmstepd: [7.0]"), (13, b"/usr/sbin/slurmd\0-D"),
                         (14, b"sh\0-c\0echo slurmstepd: [9.batch]")):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cmdline").write_bytes(cmdline)
    (tmp_path / "15").mkdir()  # a process gone while the directory was read
    (tmp_path / "self").mkdir()
    held = stepd.StepDaemons(str(tmp_path)).present
    assert [j for j in ("42", "7", "9", "4", "420") if held(j)] == ["42", "7"]


def test_reap_for_slurm_judges_slurms_jobs_by_their_slurmstepd_only(site, monkeypatch, capsys):
    """`vmwn reap --batch slurm`: a Slurm job without a slurmstepd here has ended
    unseen; one with a slurmstepd, and Torque's jobs, are left alone."""
    from vmwn.slurm import stepd
    fake_job(site, "90", batch="slurm")
    fake_job(site, "91", batch="slurm")
    fake_job(site, "92.srv", batch="torque")
    monkeypatch.setattr(stepd.StepDaemons, "read",
                        lambda self: setattr(self, "jobs", {"91"}) or self)
    assert reap(site, "--batch", "slurm", "--grace", "0") == 0
    assert sorted(st.job_id for st in state.all_jobs(site)) == ["91", "92.srv"]
    assert "of job 90 (its job is no longer on this node)" in capsys.readouterr().out
    # Torque's own reap (the default) leaves the Slurm job to Slurm
    assert reap(site, "--grace", "0") == 0
    assert sorted(st.job_id for st in state.all_jobs(site)) == ["91"]


def test_reap_offers_each_batch_system_vmwn_has_an_adapter_for():
    assert operators.batch_systems() == ["openpbs", "slurm", "torque"]


def test_reap_for_openpbs_judges_by_the_moms_job_records(site, tmp_path, capsys):
    from vmwn.openpbs import node
    home = tmp_path / "pbs"
    (home / "mom_priv" / "jobs").mkdir(parents=True)
    (home / "mom_priv" / "jobs" / "94.pbs.JB").write_text("")
    fake_job(site, "93.pbs", batch="openpbs")
    fake_job(site, "94.pbs", batch="openpbs")
    args = ["--config", site.files[0], "reap", "--batch", "openpbs", "--grace", "0"]
    assert cli.main(args + ["--pbs-home", str(home)]) == 0
    assert sorted(st.job_id for st in state.all_jobs(site)) == ["94.pbs"]
    capsys.readouterr()
    assert cli.main(args + ["--pbs-home", str(tmp_path / "nowhere")]) == 3
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "pbs.conf").write_text("PBS_EXEC=/opt/pbs\nPBS_HOME = /srv/pbs \n")
    assert node.pbs_home_of(str(tmp_path / "pbs.conf")) == "/srv/pbs"
    assert node.pbs_home_of(str(tmp_path / "none.conf")) == node.DEFAULT_PBS_HOME


def test_an_overlay_a_teardown_set_aside_is_its_jobs_until_the_job_is_gone(site):
    from vmwn import disk
    live = fake_job(site, "95.srv")
    gone = fake_job(site, "96.srv")
    for st in (live, gone):
        os.rename(st.overlay, disk.aside(st.overlay))
        os.utime(disk.aside(st.overlay), (OLD, OLD))
    state.remove(site, "96.srv")  # a teardown that stopped after the state went
    mom_record(site, "95.srv")
    reapmod.Reaper(site, pbs.MomJobs(site.pbs_home).present, grace=0).run()
    assert os.path.exists(disk.aside(live.overlay))
    assert not os.path.exists(disk.aside(gone.overlay))
