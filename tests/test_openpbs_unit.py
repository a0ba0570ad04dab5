"""vmwn.openpbs without OpenPBS: the hook's decisions on stand-in events, the job
description to JobSpec, the mom's files, the installer's rendering, and the
OpenPBS job starter end to end against the in-process SSH guest, over a
connection the warden opens (a starter outside libvirt's network namespace)."""

import os
import subprocess
import sys
import threading
import types

import pytest

from vmwn import config, netns, warden
from vmwn.errors import UserError
from vmwn.openpbs import hook, install, mom, request

from conftest import write_site_config


class FakeEvent:
    def __init__(self, resources=None, variables=None, progname="/bin/bash", argv=()):
        self.job = types.SimpleNamespace(Resource_List=dict(resources or {}),
                                         Variable_List=dict(variables or {}), id="7.vm")
        self.progname, self.argv = progname, list(argv)
        self.accepted = self.rejected = None

    def accept(self):
        self.accepted = True

    def reject(self, msg):
        self.rejected = msg


def test_launch_leaves_a_job_without_vmwn_alone():
    e = FakeEvent(progname="/bin/bash")
    hook.on_launch(None, e)
    assert e.accepted and e.progname == "/bin/bash" and e.argv == []


def test_launch_sends_a_script_job_to_the_starter_with_its_shell():
    e = FakeEvent({"vmwn": "tiny"}, progname="/bin/bash", argv=[])
    hook.on_launch(None, e)
    assert e.progname == hook.STARTER
    assert e.argv == [hook.STARTER, "batch", "/bin/bash"]


def test_launch_sends_a_program_job_to_the_starter_with_its_arguments():
    e = FakeEvent({"vmwn": "tiny"}, progname="/usr/bin/env", argv=["/usr/bin/env", "a b", "-0"])
    hook.on_launch(None, e)
    assert e.argv == [hook.STARTER, "exec", "/usr/bin/env", "a b", "-0"]


def test_queuejob_turns_vmwn_env_into_the_resource_and_refuses_what_check_refuses(
        monkeypatch):
    calls = []
    monkeypatch.setattr(hook, "runtime", lambda action, payload: (
        calls.append((action, payload)) or (1, "vmwn: unknown vmwn environment 'x': "
                                               "request one of: tiny")))
    e = FakeEvent(variables={"VMWN_ENV": " x "})
    hook.on_queuejob(None, e)
    assert e.job.Resource_List["vmwn"] == "x"
    assert calls == [("check", {"env": "x"})]
    assert e.rejected == "vmwn: unknown vmwn environment 'x': request one of: tiny"


def test_queuejob_accepts_a_job_without_vmwn_without_running_anything(monkeypatch):
    monkeypatch.setattr(hook, "runtime", lambda *a: pytest.fail("runtime ran"))
    e = FakeEvent(variables={"PBS_O_WORKDIR": "/home/u"})
    hook.on_queuejob(None, e)
    assert e.accepted and not e.rejected and "vmwn" not in e.job.Resource_List


def test_the_runtime_call_is_bounded(tmp_path, monkeypatch):
    slow = tmp_path / "python"
    slow.write_text("#!/bin/sh\nexec sleep 30\n")
    slow.chmod(0o755)
    monkeypatch.setattr(hook, "PYTHON", str(slow))
    rc, line = hook.runtime("check", {"env": "tiny"}, timeout=0.5)
    assert rc == 124 and "did not finish within 0.5 s" in line


def test_sizes_in_openpbs_units():
    assert request.size_bytes("512mb") == 512 << 20
    assert request.size_bytes("2gb") == 2 << 30
    assert request.size_bytes("100kb") == 100 << 10
    assert request.size_bytes("1024") == 1024
    with pytest.raises(UserError, match="is not a size"):
        request.size_bytes("lots")


def test_a_job_description_becomes_a_checked_jobspec(world_tmp, test_user):
    path = os.path.join(world_tmp, "vmwn.conf")
    write_site_config(path, world_tmp)
    cfg = config.load(path)
    job = {"job_id": "7.vm", "env": "tiny", "user": test_user.pw_name, "group": "",
           "job_name": "job.sh", "queue": "workq", "ncpus": "2", "mem": "512mb",
           "workdir": test_user.pw_dir + "/sub/../w"}
    s = request.build(cfg, job)
    assert (s.vcpus, s.memory_mib, s.workdir, s.uid) == (2, 512, test_user.pw_dir + "/w",
                                                         test_user.pw_uid)
    with pytest.raises(UserError, match="unknown vmwn environment 'nosuch'"):
        request.build(cfg, dict(job, env="nosuch"))
    with pytest.raises(UserError, match="asks for 3 cores"):
        request.build(cfg, dict(job, ncpus="3"))


def test_the_moms_job_files(tmp_path):
    jobs = tmp_path / "mom_priv" / "jobs"
    jobs.mkdir(parents=True)
    (jobs / "12.vm.JB").write_text("")
    (jobs / "12.vm.SC").write_text("echo\n")
    (jobs / "30[].vm.JB").write_text("")
    held = mom.MomJobs(str(tmp_path)).present
    assert held("12.vm") and held("30[2].vm") and not held("13.vm")
    assert mom.is_job_script(str(tmp_path), str(jobs / "12.vm.SC"))
    assert not mom.is_job_script(str(tmp_path), str(jobs / "12.vm.JB"))
    assert not mom.is_job_script(str(tmp_path), "/etc/passwd")
    assert mom.unescape_script_line(b"/x/30\\[2\\].vm.SC\n") == b"/x/30[2].vm.SC\n"


def test_libvirt_sockets_of_a_uri():
    assert netns.libvirt_sockets("qemu:///system") == netns._SYSTEM_SOCKETS
    assert netns.libvirt_sockets("qemu:///system?socket=/s") == ("/s",)
    assert netns.libvirt_sockets("qemu+ssh://h/system") == ()
    assert netns.libvirt_sockets("test:///default") == ()
    assert not netns.is_other("") and not netns.is_other(netns.current())
    assert netns.is_other("net:[1]")


def test_the_installer_writes_the_nodes_values_into_the_hook():
    src = install.render_hook("/opt/rt/bin/python", "/etc/x/vmwn.conf", "/p/openpbs-starter")
    ns = {"__name__": "vmwn.openpbs.hook"}
    exec(compile(src, "vmwn_hook.py", "exec"), ns)
    assert (ns["PYTHON"], ns["CONFIG"], ns["STARTER"]) == (
        "/opt/rt/bin/python", "/etc/x/vmwn.conf", "/p/openpbs-starter")
    text = install.render_starter("/opt/rt/bin/python", "/etc/vmwn/it's.conf", "/s", "/h")
    assert "'/etc/vmwn/it'\"'\"'s.conf'" in text


def _broker_warden(cfg, st):
    """The job's warden as vmwn.warden serves it, telling the starter that the guest's
    forward is in another network namespace: the starter must ask for a connection.
    The port it is told is one nothing listens on, so a direct connection would fail;
    the warden connects to the record's real one."""
    w = warden.Warden(cfg, st.job_id, warden.listen(cfg, st))
    record = dict(warden.starter_record(st), netns="net:[1]", port=1)
    w.answer = warden._line({"ready": True, "record": record})
    t = threading.Thread(target=w._serve, daemon=True)
    t.start()
    return t


def test_the_openpbs_starter_runs_a_script_job_over_the_wardens_connection(tmp_path):
    from test_starter import Job
    job = Job(tmp_path)
    pbs_home = tmp_path / "pbs"
    jobs = pbs_home / "mom_priv" / "jobs"
    jobs.mkdir(parents=True)
    sc = jobs / f"{job.job_id}.SC"
    sc.write_text("#!/bin/sh\necho \"args:$# out\"\necho err >&2\nexit 5\n")
    sc.chmod(0o700)
    job.gwork.mkdir(parents=True, exist_ok=True)
    _broker_warden(job.cfg, job.st)  # takes the socket's path over from Job's warden
    runner = ("import sys; from vmwn.openpbs.starter import main; "
              "sys.exit(main(sys.argv[3:], config_path=sys.argv[1], pbs_home=sys.argv[2]))")
    p = subprocess.run([sys.executable, "-c", runner, str(job.conf), str(pbs_home),
                        "starter", "batch", "/bin/sh"], env=job.env,
                       input=f"{sc}\n".encode(), capture_output=True, timeout=60,
                       cwd=str(job.gwork))
    assert p.returncode == 5, p.stderr
    assert p.stdout == b"args:0 out\n"
    assert b"err\n" in p.stderr


def test_the_openpbs_starter_never_runs_a_vm_job_on_the_host(tmp_path):
    conf = tmp_path / "vmwn.conf"
    conf.write_text(f"[site]\nstate_dir = {tmp_path}/state\nsyslog = no\n")
    runner = ("import sys; from vmwn.openpbs.starter import main; "
              "sys.exit(main(sys.argv[2:], config_path=sys.argv[1], pbs_home='/nonexistent'))")
    p = subprocess.run([sys.executable, "-c", runner, str(conf), "starter", "batch",
                        "/bin/sh"], env={"PATH": "/usr/bin:/bin", "PBS_JOBID": "9.vm",
                                         "PYTHONPATH": os.pathsep.join(sys.path)},
                       input=b"echo ran-on-host\n", capture_output=True, timeout=60)
    assert p.returncode == 2, p.stderr
    assert b"ran-on-host" not in p.stdout
    lines = p.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmwn: the job asks for a vmwn "
                                                   "environment, but this node prepared no"), lines


def test_the_runtimes_check_answers_in_one_line(world_tmp, monkeypatch, capsys):
    import io
    from vmwn.openpbs import runtime
    path = os.path.join(world_tmp, "vmwn.conf")
    write_site_config(path, world_tmp)
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"env": "tiny"}'))
    assert runtime.main(["check", path]) == 0
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"env": "nosuch"}'))
    assert runtime.main(["check", path]) == 1
    out = capsys.readouterr().out
    assert out.startswith("vmwn: unknown vmwn environment 'nosuch': request one of: "), out
    assert out.count("\n") == 1
    monkeypatch.setattr(sys, "stdin", io.StringIO("{}"))
    assert runtime.main(["bogus", path]) == 1
    assert "reinstall vmwn's OpenPBS hooks" in capsys.readouterr().out
