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


class FakePbs:
    LOG_ERROR = 3

    def __init__(self):
        self.logged = []

    @staticmethod
    def duration(n):
        return ("duration", n)

    @staticmethod
    def size(s):
        return ("size", s)

    def logmsg(self, level, msg):
        self.logged.append(msg)


class _Resources(dict):
    """As pbs's resource lists: an unset resource reads as None."""

    def __getitem__(self, key):
        return self.get(key)


def _job(resources, used=None, session_id=4242):
    return types.SimpleNamespace(Resource_List=_Resources(resources), session_id=session_id,
                                 resources_used=_Resources(used or {}))


def test_charge_sets_the_vms_usage_on_vmwn_jobs_only_and_never_lowers_it(monkeypatch):
    calls = []

    def runtime(action, payload):
        calls.append((action, payload))
        return 0, '{"1.vm": {"cput": 31, "mem_kb": 300000}, "2.vm": {"cput": 5, "mem_kb": 9}}'
    monkeypatch.setattr(hook, "runtime", runtime)
    vm, native = _job({"vmwn": "tiny"}), _job({}, {"cput": 12})
    later = _job({"vmwn": "tiny"}, {"cput": 40}, session_id=None)
    hook.charge(FakePbs(), {"1.vm": vm, "3.vm": native, "2.vm": later})
    assert calls == [("usage", {"jobs": {"1.vm": 4242, "2.vm": 0}})]
    assert vm.resources_used == {"cput": ("duration", 31), "mem": ("size", "300000kb")}
    assert native.resources_used == {"cput": 12}  # the mom's own count stays
    assert later.resources_used["cput"] == ("duration", 40)  # a count never goes back


def test_charge_without_vmwn_jobs_runs_nothing_and_a_bad_answer_is_logged(monkeypatch):
    monkeypatch.setattr(hook, "runtime", lambda *a: pytest.fail("runtime ran"))
    hook.charge(FakePbs(), {"3.vm": _job({})})
    monkeypatch.setattr(hook, "runtime", lambda *a: (1, "vmwn: config broken"))
    p, vm = FakePbs(), _job({"vmwn": "tiny"})
    hook.charge(p, {"1.vm": vm})
    assert vm.resources_used == {} and p.logged == ["vmwn: usage not read: vmwn: config broken"]


def test_usage_counts_the_vm_and_the_jobs_own_session(monkeypatch, capsys):
    """The VM's launcher tree and the job's session on the host, from /proc."""
    import json
    from vmwn import state, usage
    from vmwn.openpbs import runtime
    burner = subprocess.Popen([sys.executable, "-c",
                               "import time\nt = time.process_time()\n"
                               "while time.process_time() - t < 0.5: pass\n"
                               "print('burnt', flush=True)\ntime.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert burner.stdout.readline() == "burnt\n"
        # The burner leads a session of its own, as a job's top process does (pytest's
        # may be session 0 where a service started it, which counts for nothing).
        rec = types.SimpleNamespace(vm_pid=burner.pid, vm_start=usage.start_time(burner.pid))
        monkeypatch.setattr(state, "exists", lambda cfg, job_id: job_id == "1.vm")
        monkeypatch.setattr(state, "load", lambda cfg, job_id: rec)
        assert runtime.usage_of(None, {"jobs": {"1.vm": burner.pid, "9.vm": 0}}) == 0
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert list(out) == ["1.vm"]  # a job without a VM is left out
        # the burner counts twice (it is the 'VM' and in this session): 2 x 0.5 s
        assert out["1.vm"]["cput"] >= 1 and out["1.vm"]["mem_kb"] > 1000, out
    finally:
        burner.kill()
        burner.wait()


def test_begin_requeues_a_start_that_may_pass_a_bounded_number_of_times(world_tmp,
                                                                         monkeypatch):
    """The site's failure: the hook rejects (the server requeues) until [site]
    start_attempts, then the job is refused with the count and the last reason; the
    owner's mistake is refused at once; a job that got through begin counts afresh."""
    from vmwn import errors, state
    from vmwn.openpbs import runtime
    path = os.path.join(world_tmp, "vmwn.conf")
    write_site_config(path, world_tmp, "start_attempts = 2\nlibvirt_uri = test:///default\n")
    cfg = config.load(path)
    where = cfg.site["state_dir"]
    monkeypatch.setattr(netns, "enter_libvirts", lambda uri: None)
    failure = [errors.SiteError("libvirt is down", "the site should check libvirtd")]

    def build(cfg, job):
        raise failure[0]
    monkeypatch.setattr(request, "build", build)
    job = {"job_id": "5.vm"}
    with pytest.raises(errors.SiteError):
        runtime.begin(cfg, job)  # start 1: rejected, requeued
    assert runtime.end(cfg, job) == 0  # the mom may end the rejected start: count kept
    assert state.read_refusal(where, "5.vm") is None
    assert runtime.begin(cfg, job) == 0  # start 2: refused, told why
    said = state.read_refusal(where, "5.vm")
    assert said["problem"] == ("the job's virtual machine could not be prepared in 2 starts; "
                               "last: libvirt is down"), said
    assert runtime.end(cfg, job) == 0
    assert not os.listdir(os.path.join(where, ".starts"))
    # A start that failed once, then got through begin and ended: a rerun counts afresh.
    job = {"job_id": "7.vm"}
    with pytest.raises(errors.SiteError):
        runtime.begin(cfg, job)
    state.make_job_dir(cfg, "7.vm")  # what a begin that got through leaves
    assert runtime.end(cfg, job) == 0
    with pytest.raises(errors.SiteError):
        runtime.begin(cfg, job)
    failure[0] = UserError("unknown vmwn environment 'x'", "request one of: tiny")
    assert runtime.begin(cfg, {"job_id": "6.vm"}) == 0  # the owner's: at once
    assert "unknown vmwn environment" in state.read_refusal(where, "6.vm")["problem"]
