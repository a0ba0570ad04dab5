"""vmwn.slurm without Slurm: the runtime's arguments and actions, the job
description to JobSpec, the starter's refusals, the installer's output, and the
SPANK plugin compiled against this node's spank.h (when it has one)."""

import os
import shutil
import subprocess
import sys

import pytest

from vmwn import config, netns, state
from vmwn.errors import SiteError, UserError
from vmwn.slurm import install, request, runtime

from conftest import write_site_config


@pytest.fixture
def cfg(world_tmp):
    path = os.path.join(world_tmp, "vmwn.conf")
    write_site_config(path, world_tmp, "start_attempts = 2\nlibvirt_uri = test:///default\n")
    return config.load(path)


def test_the_plugins_arguments_become_the_job_and_nothing_else():
    assert runtime.parse(["job_id=7", "workdir=/home/a=b c", "env="]) == {
        "job_id": "7", "workdir": "/home/a=b c", "env": ""}
    for bad in (["novalue"], ["a-b=1"], ["=x"]):
        with pytest.raises(SiteError, match="not KEY=VALUE"):
            runtime.parse(bad)


def test_check_refuses_an_unknown_environment_in_one_line(cfg, world_tmp, capsys):
    conf = os.path.join(world_tmp, "vmwn.conf")
    assert runtime.main(["check", conf, "env=tiny"]) == 0
    assert capsys.readouterr().out == ""
    assert runtime.main(["check", conf, "env=nosuch"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("vmwn: unknown vmwn environment 'nosuch': request one of: "), out
    assert out.count("\n") == 1
    assert runtime.main(["bogus", conf]) == 1
    assert "reinstall vmwn's SPANK plugin" in capsys.readouterr().out


def test_a_job_description_becomes_a_checked_jobspec(cfg, test_user, world_tmp):
    job = {"job_id": "12", "env": "tiny", "uid": str(test_user.pw_uid),
           "gid": str(test_user.pw_gid), "ncpus": "1", "mem_mb": "", "workdir": world_tmp,
           "job_name": "x"}
    spec = request.build(cfg, job)
    assert (spec.user, spec.uid, spec.vcpus, spec.workdir) == (
        test_user.pw_name, test_user.pw_uid, 1, world_tmp)
    # No --mem: the environment's default, never the node's memory.
    assert spec.memory_mib == cfg.env("tiny").memory_mib
    assert request.build(cfg, dict(job, mem_mb="512")).memory_mib == 512
    # SLURM_MEM_PER_NODE is the job's own variable: never above what Slurm allocated
    assert request.build(cfg, dict(job, mem_mb="1500", alloc_mb="600")).memory_mib == 600
    with pytest.raises(UserError, match="max_memory"):
        request.build(cfg, dict(job, mem_mb="999999"))
    with pytest.raises(UserError, match="not an absolute path"):
        request.build(cfg, dict(job, workdir="rel"))
    with pytest.raises(SiteError, match="unknown on this node"):
        request.build(cfg, dict(job, uid="4000000000"))


def test_begin_turns_every_failure_into_the_jobs_refusal(cfg, monkeypatch):
    """Under Slurm a failing SPANK call would fail the step: the job is told instead."""
    monkeypatch.setattr(netns, "enter_libvirts", lambda uri: None)
    failure = SiteError("libvirt is down", "the site should check libvirtd")

    def build(cfg, job):
        raise failure
    monkeypatch.setattr(request, "build", build)
    assert runtime.begin(cfg, {"job_id": "5"}) == 0
    said = state.read_refusal(cfg.site["state_dir"], "5")
    assert said["problem"] == "libvirt is down", said
    assert not os.listdir(os.path.join(cfg.site["state_dir"], ".starts"))
    assert runtime.end(cfg, {"job_id": "5"}) == 0
    assert not os.path.exists(state.job_dir(cfg, "5"))
    with pytest.raises(SiteError, match="not a number"):
        runtime.begin(cfg, {"job_id": "5; rm -rf /"})


def test_a_batch_job_whose_start_may_pass_is_requeued_a_bounded_number_of_times(
        cfg, monkeypatch):
    """A failure that may pass (the site's, a busy node's) requeues a batch job through
    slurmctld, with slurmd's config, until [site] start_attempts (2) starts have failed;
    then the job fails with the count.  The requeued start's task says why."""
    from vmwn import subp
    monkeypatch.setattr(netns, "enter_libvirts", lambda uri: None)

    def build(cfg, job):
        raise SiteError("the image of tiny is missing", "run vmwn image build tiny")
    monkeypatch.setattr(request, "build", build)
    asked = []

    def scontrol(argv, env=None, timeout=None, **kw):
        asked.append((argv, env))
        return subprocess.CompletedProcess(argv, 0, "", "")
    monkeypatch.setattr(subp, "run", scontrol)
    job = {"job_id": "6", "batch": "1", "slurm_conf": "/etc/site slurm/slurm.conf"}
    assert runtime.begin(cfg, job) == 0
    assert asked == [(["scontrol", "requeue", "6"],
                      {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
                       "SLURM_CONF": "/etc/site slurm/slurm.conf"})]
    said = state.read_refusal(cfg.site["state_dir"], "6")
    assert said["problem"] == "the image of tiny is missing; Slurm starts the job again"
    assert runtime.end(cfg, {"job_id": "6"}) == 0  # the requeued start's step ends
    assert not os.path.exists(state.job_dir(cfg, "6"))
    assert runtime.begin(cfg, job) == 0  # the job's second start
    assert len(asked) == 1  # not requeued again
    said = state.read_refusal(cfg.site["state_dir"], "6")
    assert said["problem"].startswith("the job's virtual machine could not be prepared in 2 "
                                      "starts; last: the image of tiny is missing"), said
    assert not os.listdir(os.path.join(cfg.site["state_dir"], ".starts"))


@pytest.mark.parametrize("job", [{"job_id": "7", "batch": "0"},  # srun's: no requeue
                                 {"job_id": "7", "batch": "1"}])  # scontrol fails
def test_a_start_that_may_pass_fails_the_job_when_it_cannot_be_requeued(cfg, monkeypatch,
                                                                       job):
    from vmwn import subp
    monkeypatch.setattr(netns, "enter_libvirts", lambda uri: None)

    def build(cfg, job):
        raise SiteError("libvirt is down", "the site should check libvirtd")
    monkeypatch.setattr(request, "build", build)
    asked = []

    def scontrol(argv, **kw):
        asked.append(argv)
        raise subp.ProcessFailed(argv, 1, "slurm_requeue error: Access/permission denied",
                                 "see the operator log")
    monkeypatch.setattr(subp, "run", scontrol)
    assert runtime.begin(cfg, job) == 0
    assert len(asked) == int(job["batch"])
    assert state.read_refusal(cfg.site["state_dir"], "7")["problem"] == "libvirt is down"
    assert not os.listdir(os.path.join(cfg.site["state_dir"], ".starts"))


def _failing(monkeypatch, failure):
    from vmwn import subp
    monkeypatch.setattr(netns, "enter_libvirts", lambda uri: None)

    def build(cfg, job):
        raise failure
    monkeypatch.setattr(request, "build", build)
    asked = []

    def scontrol(argv, **kw):
        asked.append(argv)
        return subprocess.CompletedProcess(argv, 0, "", "")
    monkeypatch.setattr(subp, "run", scontrol)
    return asked


def test_a_start_whose_count_cannot_be_kept_is_never_requeued(cfg, monkeypatch):
    """NodeBroken: without a count a requeue could come back without end."""
    from vmwn.errors import NodeBroken
    asked = _failing(monkeypatch, NodeBroken("the state directory is read-only",
                                             "the site should check /var/lib/vmwn"))
    assert runtime.begin(cfg, {"job_id": "9", "batch": "1"}) == 0
    assert asked == []
    said = state.read_refusal(cfg.site["state_dir"], "9")
    assert said["problem"] == "the state directory is read-only", said


def test_a_helper_programs_failure_is_requeued_with_its_own_line(cfg, monkeypatch):
    """A failure with a constructor of its own (subp.ProcessFailed) is restated whole."""
    from vmwn import subp
    failure = subp.ProcessFailed(["qemu-img", "create"], 1, "No space left on device",
                                 "the site should free /var/lib/vmwn/overlays")
    asked = _failing(monkeypatch, failure)
    assert runtime.begin(cfg, {"job_id": "10", "batch": "1"}) == 0
    assert asked == [["scontrol", "requeue", "10"]]
    said = state.read_refusal(cfg.site["state_dir"], "10")
    assert said == {"kind": "ProcessFailed", "problem": "qemu-img exited 1: No space left "
                    "on device; Slurm starts the job again",
                    "fix": "the site should free /var/lib/vmwn/overlays"}, said


def test_a_further_step_of_a_job_with_a_vm_joins_it_and_makes_none(cfg, capsys):
    state.make_job_dir(cfg, "8")  # the job's VM, made by its first step
    assert runtime.begin(cfg, {"job_id": "8"}) == runtime.JOINS
    assert capsys.readouterr().out == ""  # no line: the step's task runs in the guest
    assert os.listdir(state.job_dir(cfg, "8")) == []  # untouched: nothing made


def _starter(tmp_path, *argv, env=None):
    conf = tmp_path / "vmwn.conf"
    conf.write_text(f"[site]\nstate_dir = {tmp_path}/state\nsyslog = no\n")
    runner = ("import sys; from vmwn.slurm.starter import main; "
              "sys.exit(main(sys.argv[2:], config_path=sys.argv[1]))")
    return subprocess.run([sys.executable, "-c", runner, str(conf), "starter", *argv],
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": os.pathsep.join(sys.path),
                               **(env or {})}, capture_output=True, timeout=60)


def test_the_slurm_starter_never_runs_a_vm_job_on_the_host(tmp_path):
    script = tmp_path / "job00009" / "slurm_script"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\necho ran-on-host\n")
    script.chmod(0o755)
    p = _starter(tmp_path, "batch", str(script), env={"SLURM_JOB_ID": "9"})
    assert p.returncode == 2, p.stderr
    assert b"ran-on-host" not in p.stdout
    lines = p.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmwn: the job asks for a vmwn "
                                                   "environment, but this node prepared no"), lines
    for mode in ("exec", "step"):
        p = _starter(tmp_path, mode, "/bin/echo", "ran-on-host", env={"SLURM_JOB_ID": "9"})
        assert p.returncode == 2 and b"ran-on-host" not in p.stdout, (mode, p.stderr)
    p = _starter(tmp_path, str(script))  # no mode: an old plugin
    assert p.returncode == 2 and b"without a mode" in p.stderr, p.stderr
    p = _starter(tmp_path, "batch", str(script))  # not from slurmstepd
    assert p.returncode == 2 and b"SLURM_JOB_ID" in p.stderr, p.stderr


def test_the_starter_reads_only_a_script_slurm_wrote(tmp_path):
    from vmwn.slurm import starter
    with pytest.raises(UserError, match="not a job script Slurm wrote"):
        starter.read_script("/bin/sh")
    d = tmp_path / "job00001"
    d.mkdir()
    (d / "slurm_script").symlink_to("/etc/passwd")
    with pytest.raises(UserError, match="cannot read the job script"):
        starter.read_script(str(d / "slurm_script"))
    (d / "slurm_script").unlink()
    (d / "slurm_script").write_bytes(b"#!/bin/bash\n\xff\xfe name\n")
    assert starter.read_script(str(d / "slurm_script")) == b"#!/bin/bash\n\xff\xfe name\n"


def test_the_scripts_interpreter_is_its_shebangs_program():
    from vmwn.slurm.starter import interpreter
    assert interpreter(b"#!/bin/bash\necho\n") == "/bin/bash"
    assert interpreter(b"#! /usr/bin/env  python3 -u\n") == "/usr/bin/env"
    assert interpreter(b"#!/opt/\xff/sh\n") == os.fsdecode(b"/opt/\xff/sh")
    assert interpreter(b"echo no shebang\n") == interpreter(b"#!\n") == "/bin/sh"


def test_the_installer_writes_the_starter_and_the_plugstack_line():
    text = install.render_starter("/opt/my python/bin/python", "/etc/vmwn/vmwn.conf",
                                  "/var/lib/vmwn/jobs")
    assert "exec '/opt/my python/bin/python' -I -c" in text
    assert "from vmwn.slurm.starter import main" in text
    line = install.plugstack_line("/usr/local/lib/vmwn/slurm/vmwn_spank.so", "/p/python",
                                  "/etc/vmwn/vmwn.conf", "/s/starter")
    assert line == ("required /usr/local/lib/vmwn/slurm/vmwn_spank.so python=/p/python "
                    "config=/etc/vmwn/vmwn.conf starter=/s/starter\n")
    with pytest.raises(SiteError, match="white space"):
        install.plugstack_line("/a b/vmwn_spank.so", "/p", "/c", "/s")


@pytest.mark.skipif(not os.path.exists(install.SPANK_H) or shutil.which("cc") is None,
                    reason="no slurm/spank.h (libslurm-dev) or no C compiler on this node")
def test_the_spank_plugin_compiles_without_warnings_and_exports_its_entry_points(tmp_path):
    out = str(tmp_path / "vmwn_spank.so")
    cp = subprocess.run(["cc", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-o",
                         out, install.SOURCE], capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr
    syms = subprocess.run(["nm", "-D", "--defined-only", out], capture_output=True,
                          text=True, check=True).stdout
    for name in ("slurm_spank_init", "slurm_spank_init_post_opt", "slurm_spank_task_init",
                 "slurm_spank_task_exit", "slurm_spank_exit", "plugin_name", "plugin_type",
                 "plugin_version"):
        assert f" {name}\n" in syms, name
    install.compile_plugin(out)  # the installer's own build
    assert os.access(out, os.X_OK)


def test_begin_reaps_the_slurm_jobs_that_have_no_slurmstepd_here(cfg, monkeypatch):
    """A Slurm job whose `end` never ran (its slurmstepd killed) is removed by the next
    VM job's begin on the node; a Slurm job with a slurmstepd, and another batch
    system's job, are left alone."""
    from test_operators import OLD, fake_job
    from vmwn.slurm import stepd
    monkeypatch.setattr(netns, "enter_libvirts", lambda uri: None)
    fake_job(cfg, "10", created=OLD, batch="slurm")
    fake_job(cfg, "11", created=OLD, batch="slurm")
    fake_job(cfg, "12.srv", created=OLD, batch="torque")
    monkeypatch.setattr(stepd.StepDaemons, "read",
                        lambda self: setattr(self, "jobs", {"11", "13"}) or self)

    def build(cfg, job):
        raise UserError("no such environment", "ask for one of tiny")
    monkeypatch.setattr(request, "build", build)
    assert runtime.begin(cfg, {"job_id": "13"}) == 0
    assert sorted(st.job_id for st in state.all_jobs(cfg)) == ["11", "12.srv"]
    assert runtime.end(cfg, {"job_id": "13"}) == 0
