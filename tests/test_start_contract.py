"""How a VM job starts under pbs_mom's rules, without a VM: refusals, bounded
requeues, the boot slots, what the prologue reads from a real mom's environment,
and the job starter's decision between VM, refusal and the host."""

import os
import subprocess
import sys
import threading

import pytest

from vmwn import config, errors, state, warden, wardenclient
from vmwn.torque import pbs, request
from vmwn.domain import guest_hostname
from vmwn.torque.hooks import prologue

from conftest import write_site_config


@pytest.fixture
def site(tmp_path):
    path = str(tmp_path / "vmwn.conf")
    write_site_config(path, str(tmp_path), extra_site="start_attempts = 3\n"
                      "max_parallel_boots = 1\nlibvirt_uri = test:///default")
    with open(path, "a") as f:
        f.write("\n[env ghost]\nimage = ghost/disk.qcow2\naccel = qemu\nmemory = 256M\n")
    os.makedirs(tmp_path / "torque" / "mom_priv" / "jobs")
    return config.load(path), path, str(tmp_path / "torque")


def _prologue(site, res, job_id="5.srv", environ=None):
    cfg, path, home = site
    user = "nobody"
    argv = ["prologue", job_id, user, "nogroup", "job", res, "batch", "", ""]
    return prologue.main(argv, config_path=path, pbs_home=home,
                         environ=environ or {"PBS_O_WORKDIR": "/tmp/w"})


def test_a_failing_start_is_requeued_a_bounded_number_of_times_then_refused(site, capsys):
    cfg = site[0]
    # pbs_server restarts a requeued job at once and without limit: vmwn counts.
    assert [_prologue(site, "other=vmwn=ghost") for _ in range(3)] == [2, 2, 0]
    err = capsys.readouterr().err
    assert err.count("is not installed on this node") == 2  # the two requeues said why
    refusal = state.read_refusal(cfg.site["state_dir"], "5.srv")
    line = wardenclient.answer_error(refusal).line()
    assert "could not be prepared in 3 starts" in line and "vmwn image build ghost" in line
    assert isinstance(wardenclient.answer_error(refusal), errors.SiteError)
    assert not os.path.exists(os.path.join(cfg.site["state_dir"], ".starts", "5.srv"))


def test_start_counts_are_per_job_and_expire(site):
    cfg = site[0]
    assert [state.count_start(cfg, "1.a") for _ in range(2)] == [1, 2]
    assert state.count_start(cfg, "2.a") == 1
    assert state.stale_starts(cfg, 3600) == []
    assert len(state.stale_starts(cfg, -1)) == 2
    state.clear_starts(cfg, "1.a")
    assert state.count_start(cfg, "1.a") == 1


def test_a_user_mistake_is_refused_at_once_with_nothing_but_the_record(site):
    cfg = site[0]
    assert _prologue(site, "other=vmwn=nosuch") == 0
    d = state.job_dir(cfg, "5.srv")
    assert os.listdir(d) == ["refused"]
    assert oct(os.stat(d).st_mode & 0o777) == "0o711"
    assert oct(os.stat(os.path.join(d, "refused")).st_mode & 0o777) == "0o644"


def test_the_prologue_sets_its_modes_whatever_umask_pbs_mom_gave_it(site):
    cfg = site[0]
    old = os.umask(0o077)
    try:
        _prologue(site, "other=vmwn=nosuch")
    finally:
        os.umask(old)
    assert oct(os.stat(cfg.site["state_dir"]).st_mode & 0o777) == "0o711"
    assert oct(os.stat(state.job_dir(cfg, "5.srv")).st_mode & 0o777) == "0o711"


def test_cores_follow_the_node_file_not_the_request(tmp_path):
    nodefile = tmp_path / "nodes"
    nodefile.write_text("n1\nn1\n")
    env = {"PBS_NODEFILE": str(nodefile), "PBS_MSHOST": "n1"}
    assert request.allocated_cores(env) == 2
    nodefile.write_text("n1\n")
    assert request.allocated_cores(env) == 1  # -l ncpus=4 gets one slot from pbs_sched
    assert request.allocated_cores({"PBS_NUM_PPN": "3", **env}) == 3
    assert request.allocated_cores({}) is None
    assert request.allocated_cores({"PBS_NODEFILE": str(tmp_path / "none")}) is None


@pytest.mark.parametrize("job_id", ["9024[1].server", "9024[].server", "1.a.b.c", "x" * 300,
                                    "[[]]", "UPPER.Case", "a_b-c"])
def test_guest_host_names_are_valid_and_distinct(job_id):
    import re
    name = guest_hostname(job_id)
    assert re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", name), name
    assert guest_hostname(job_id + "x") != name


def test_server_variable_lists_undo_pbs_servers_escapes():
    text = r"A=1,B=a\,b,Q=it\'s,BS=a\\b,E="
    assert pbs.split_server_variable_list(text) == \
        {"A": "1", "B": "a,b", "Q": "it's", "BS": "a\\b", "E": ""}


class _SlotLog:
    """The log boot_slot writes to; sets ``busy`` when it says it waits for a slot."""

    def __init__(self):
        self.busy = threading.Event()

    def info(self, msg, *args):
        if "boot slots busy" in msg % args:
            self.busy.set()


def test_boot_slots_make_boots_wait_their_turn(site):
    cfg = site[0]
    order = []
    a_in, a_release = threading.Event(), threading.Event()
    b_log = _SlotLog()

    def hold_a():
        with warden.boot_slot(cfg, _SlotLog()):
            order.append(("in", "a"))
            a_in.set()
            a_release.wait(10)  # a keeps its slot until b waits for one (or b is done)
            order.append(("out", "a"))
    a = threading.Thread(target=hold_a)
    a.start()
    assert a_in.wait(10), "the first boot never got its slot"
    threading.Thread(target=lambda: b_log.busy.wait(10) and a_release.set(),
                     daemon=True).start()
    try:
        with warden.boot_slot(cfg, b_log):
            order.append(("in", "b"))
            order.append(("out", "b"))
    finally:
        a_release.set()
        a.join(10)
    assert not a.is_alive()
    assert b_log.busy.is_set(), "the second boot did not wait for the slot"
    assert order == [("in", "a"), ("out", "a"), ("in", "b"), ("out", "b")]


STARTER = ("import sys; from vmwn.torque.hooks import starter; "
           "sys.exit(starter.main(['starter', '/bin/sh'], config_path=sys.argv[1], "
           "state_dir=sys.argv[2], pbs_home=sys.argv[3]))")


def _starter(site, env, stdin=b"echo ran-on-the-host\n", config_path=None):
    cfg, path, home = site
    e = {"PATH": "/usr/bin:/bin", "PBS_JOBID": "5.srv", "PYTHONPATH": os.pathsep.join(sys.path),
         **env}
    return subprocess.run([sys.executable, "-c", STARTER, config_path or path,
                           cfg.site["state_dir"], home], input=stdin, env=e,
                          capture_output=True, timeout=60)


def test_the_starter_prints_a_refusal_and_runs_nothing(site):
    cfg = site[0]
    state.write_refusal(cfg, "5.srv", errors.UserError("unknown vmwn environment 'x'",
                                                       "request one of: tiny"))
    p = _starter(site, {})
    assert (p.returncode, p.stdout) == (1, b"")
    assert p.stderr == b"vmwn: unknown vmwn environment 'x': request one of: tiny\n"


def test_vmwn_env_the_prologue_did_not_see_is_refused_never_run_on_the_host(site):
    p = _starter(site, {"VMWN_ENV": "tiny"})
    assert p.returncode == 1 and p.stdout == b""
    assert p.stderr.count(b"\n") == 1 and b"-l other=vmwn=tiny" in p.stderr


def test_a_job_without_a_vm_runs_when_vmwn_conf_is_missing(site, tmp_path):
    p = _starter(site, {}, config_path=str(tmp_path / "missing.conf"))
    assert (p.returncode, p.stdout, p.stderr) == (0, b"ran-on-the-host\n", b"")


def _warden_of(cfg, job_id):
    """A warden for a job recorded as this process's user's, not yet serving."""
    st = state.JobState(job_id=job_id, domain="d", env="tiny", user="nobody", uid=os.getuid(),
                        gid=os.getgid(), group="g", bind_address="127.0.0.1", port=1,
                        host_key_public="", key_path="", workdir="/w", host_workdir="/w",
                        output_dir="/w", overlay="", seed="", console_log="")
    state.save(cfg, st)
    return warden.Warden(cfg, job_id, warden.listen(cfg, st))


def test_a_failed_boot_reaches_the_starter_as_one_line(site):
    cfg = site[0]
    w = _warden_of(cfg, "5.srv")
    w.answer = warden._failure(errors.TransientError(
        "the job's virtual machine did not start in 3 attempts; last: no SSH", "ask the site"))
    t = threading.Thread(target=w._serve, daemon=True)
    t.start()
    p = _starter(site, {})
    assert (p.returncode, p.stdout) == (2, b"")
    assert p.stderr == (b"vmwn: the job's virtual machine did not start in 3 attempts; "
                        b"last: no SSH: ask the site\n")
    t.join(5)
    assert not t.is_alive()  # the warden ends with its job starter



def test_only_the_jobs_own_starter_hands_the_warden_over(site):
    """'running' from another process of the user's (a task, or one that connected
    later) is ignored: the hand-over would end the warden's cgroups move."""
    import socket
    cfg = site[0]
    w = _warden_of(cfg, "6.srv")
    pairs = [socket.socketpair() for _ in range(3)]
    try:
        starter, later, task = (p[0] for p in pairs)
        w.conns = {starter: b"", later: b"", task: b""}
        w.primary = starter
        w._command("task", task)
        for conn in (task, later):
            w._command("running", conn)
            assert not w.hand_over
        w._command("running", starter)
        assert w.hand_over
    finally:
        for a, b in pairs:
            a.close()
            b.close()
        w.listener.close()


def test_a_state_directory_vmwn_may_not_use_aborts_instead_of_looping(site, capsys):
    # Neither a count nor a refusal can be written: a requeue could loop without
    # end, so the job is aborted (exit 1) and the reason is on its stderr.
    cfg = site[0]
    os.makedirs(cfg.site["state_dir"], mode=0o777)
    os.chmod(cfg.site["state_dir"], 0o777)  # writable by all: vmwn refuses to use it
    assert _prologue(site, "other=vmwn=ghost") == 1
    assert _prologue(site, "other=vmwn=nosuch") == 1
    err = capsys.readouterr().err
    assert "cannot be counted" in err and "cannot be recorded" in err


def _refused_in_every_step(tmp_path, conf, states, job_id, capfd, monkeypatch):
    """Prologue start_attempts times (requeued, then refused), the job starter and the
    epilogue, with the steps installed for ``states``.  Returns (refusal record,
    the prologue's stderr, the starter's status, the starter's stderr)."""
    from vmwn.torque.hooks import epilogue, starter
    home = str(tmp_path / "torque")
    argv = ["prologue", job_id, "nobody", "nogroup", "job", "other=vmwn=tiny", "batch",
            "", ""]
    limit = config.SITE_KEYS["start_attempts"].default
    codes = [prologue.main(argv, config_path=str(conf), pbs_home=home, environ={},
                           state_dir=states) for _ in range(limit)]
    assert codes == [2] * (limit - 1) + [0]
    prologue_err = capfd.readouterr().err
    refusal = state.read_refusal(states, job_id)
    monkeypatch.setenv("PBS_JOBID", job_id)
    rc = starter.main(["starter", "/bin/sh"], config_path=str(conf), state_dir=states,
                      pbs_home=home)
    err = capfd.readouterr().err
    assert rc != 0 and err.count("\n") == 1
    # The epilogue removes the refusal, and nothing is left.
    eargv = ["epilogue", job_id, "nobody", "nogroup", "job", "1", "other=vmwn=tiny",
             "cput=0", "batch", "", "0", "/x.SC"]
    assert epilogue.main(eargv, config_path=str(conf), pbs_home=home, environ={},
                         state_dir=states) == 0
    assert sorted(os.listdir(states)) == [".starts"] and os.listdir(
        os.path.join(states, ".starts")) == []
    return refusal, prologue_err, rc, err


def test_a_broken_configuration_is_requeued_a_bounded_number_of_times_then_refused(
        tmp_path, capfd, monkeypatch):
    """An unreadable vmwn.conf (here a drop-in with an unknown key) used to requeue
    every VM job at once and for ever (2580 starts measured under pbs_mom).  The job
    starter and the epilogue need no configuration to tell the owner and to clean up."""
    conf = tmp_path / "vmwn.conf"
    write_site_config(str(conf), str(tmp_path))
    (tmp_path / "vmwn.conf.d").mkdir()
    (tmp_path / "vmwn.conf.d" / "61-bad.conf").write_text("[site]\nno_such_key = 1\n")
    with pytest.raises(errors.SiteError):
        config.load(str(conf))
    states = str(tmp_path / "installed-state")  # what the steps were installed with
    refusal, prologue_err, rc, err = _refused_in_every_step(tmp_path, conf, states, "7.srv",
                                                            capfd, monkeypatch)
    limit = config.SITE_KEYS["start_attempts"].default
    assert prologue_err.count("no_such_key") == limit - 1 and "Traceback" not in prologue_err
    assert refusal["kind"] == "SiteError" and "no_such_key" in refusal["problem"]
    assert "configuration cannot be used" in err and "no_such_key" in err


def test_a_state_dir_changed_without_reinstalling_refuses_vm_jobs(tmp_path, capfd,
                                                                   monkeypatch):
    """The steps and the job starter carry the state_dir they were installed with.
    If vmwn.conf names another, the starter would find no VM for the job and run it
    on the host: the prologue refuses it instead, where the starter looks."""
    conf = tmp_path / "vmwn.conf"
    write_site_config(str(conf), str(tmp_path))  # state_dir = tmp_path/jobs
    states = str(tmp_path / "installed-state")
    assert config.load(str(conf)).site["state_dir"] != states
    refusal, _, rc, err = _refused_in_every_step(tmp_path, conf, states, "8.srv", capfd,
                                                 monkeypatch)
    assert refusal["kind"] == "SiteError" and states in refusal["problem"]
    assert "install vmwn again" in refusal["fix"]
    assert rc == 2 and "state_dir" in err
    # A job that asks for no VM is not touched by the mismatch.
    native = ["prologue", "9.srv", "nobody", "nogroup", "job", "walltime=60", "batch", "", ""]
    assert prologue.main(native, config_path=str(conf), pbs_home=str(tmp_path / "torque"),
                         environ={}, state_dir=states) == 0
    assert state.read_refusal(states, "9.srv") is None
