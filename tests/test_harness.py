"""``vmwn run`` through the installed hooks, with a real unprivileged job user."""

import os
import signal
import socket
import sys
import subprocess
import time

import pytest

from vmwn import privs
from vmwn.torque import harness
from vmwn.errors import UserError

from conftest import VENV_PY

VMWN = os.path.join(os.path.dirname(VENV_PY), "vmwn")


def write_script(node, name, body):
    p = os.path.join(node.submit, name)
    with open(p, "w") as f:
        f.write("#!/bin/sh\n" + body + "\n")
    return p


def vmwn_run(node, *args, **kw):
    return subprocess.run([VMWN, "--config", node.config, "run", "--pbs-home", node.pbs_home,
                           "-u", node.user.pw_name, *args], cwd=node.submit,
                          capture_output=True, text=True, timeout=120, **kw)


def add_step(node, family, name, body):
    p = os.path.join(node.mom_priv, f"{family}.d", name)
    with open(p, "w") as f:
        f.write("#!/bin/sh\n" + body + "\n")
    os.chmod(p, 0o755)


def read(path):
    with open(path) as f:
        return f.read()


def test_host_job_outputs_owner_and_exit_status(node):
    write_script(node, "job.sh", 'echo "user=$(id -un) pwd=$(pwd) id=$PBS_JOBID"\n'
                 'echo "env=$PBS_ENVIRONMENT wd=$PBS_O_WORKDIR q=$PBS_QUEUE v=$MYVAR"\n'
                 'echo "to stderr" >&2\nexit 3')
    r = vmwn_run(node, "-v", "MYVAR=a\\,b", "-q", "short", "job.sh")
    assert r.returncode == 3, r.stderr
    job_id = r.stdout.splitlines()[0]
    seq = job_id.split(".")[0]
    assert r.stdout.splitlines()[-1] == f"{job_id} Exit_status=3"
    out, err = (os.path.join(node.submit, f"job.sh.{k}{seq}") for k in "oe")
    for p in (out, err):
        st = os.stat(p)
        assert (st.st_uid, st.st_gid) == (node.user.pw_uid, node.user.pw_gid)
        assert st.st_mode & 0o077 == 0
    assert read(out).splitlines() == [
        f"user={node.user.pw_name} pwd={node.user.pw_dir} id={job_id}",
        f"env=PBS_BATCH wd={node.submit} q=short v=a,b"]
    assert read(err) == "to stderr\n"
    # the mom's per-job files and spool files are gone
    assert os.listdir(os.path.join(node.mom_priv, "jobs")) == []
    assert os.listdir(os.path.join(node.pbs_home, "spool")) == []


def test_join_oe_merges_into_one_file(node):
    write_script(node, "j", "echo one\necho two >&2\necho three")
    r = vmwn_run(node, "-j", "oe", "-N", "merged", "j")
    assert r.returncode == 0, r.stderr
    seq = r.stdout.split(".")[0]
    assert read(os.path.join(node.submit, f"merged.o{seq}")) == "one\ntwo\nthree\n"
    assert not os.path.exists(os.path.join(node.submit, f"merged.e{seq}"))


def test_sigterm_is_forwarded_like_qdel(node):
    write_script(node, "long", "echo started\nsleep 60\necho not-reached")
    p = subprocess.Popen([VMWN, "--config", node.config, "run", "--pbs-home", node.pbs_home,
                          "-u", node.user.pw_name, "long"], cwd=node.submit,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job_id = p.stdout.readline().strip()
    spool = os.path.join(node.pbs_home, "spool", job_id + ".OU")
    for _ in range(300):
        if os.path.exists(spool) and "started" in read(spool):
            break
        time.sleep(0.05)
    else:
        p.kill()
        pytest.fail(f"the job never printed 'started' into {spool}")
    p.send_signal(signal.SIGTERM)
    rest, _ = p.communicate(timeout=30)
    # 271 = 256 + SIGTERM: the job died of the forwarded signal, not after its sleep
    assert rest.splitlines()[-1] == f"{job_id} Exit_status=271"
    assert p.returncode == 128 + signal.SIGTERM
    seq = job_id.split(".")[0]
    assert read(os.path.join(node.submit, f"long.o{seq}")) == "started\n"


def test_unknown_environment_is_refused_with_the_message_in_the_e_file(node):
    # The prologue records the refusal and exits 0; the job starter prints it and
    # exits 1, so pbs_mom delivers the .e file (a prologue exit 1 would not).
    marker = os.path.join(node.submit, "ran")
    write_script(node, "job", f"touch {marker}")
    r = vmwn_run(node, "-l", "other=vmwn=nosuch", "job")
    job_id = r.stdout.splitlines()[0]
    assert f"{job_id} Exit_status=1" in r.stdout
    assert not os.path.exists(marker)
    seq = job_id.split(".")[0]
    er = os.path.join(node.submit, f"job.e{seq}")
    assert read(er) == "vmwn: unknown vmwn environment 'nosuch': request one of: tiny\n"
    assert os.stat(er).st_uid == node.user.pw_uid
    assert not os.path.exists(os.path.join(node.pbs_home, "spool", job_id + ".ER"))


def test_hooks_see_pbs_moms_argv_and_minimal_environment(node):
    probe = os.path.join(node.root, "probe")
    add_step(node, "prologue", "10-probe",
             f'{{ echo "argc=$#"; for a in "$@"; do echo "arg=$a"; done; env; }} > {probe}.pro; '
             f'pwd >> {probe}.pro')
    add_step(node, "epilogue", "10-probe",
             f'{{ echo "argc=$#"; for a in "$@"; do echo "arg=$a"; done; }} > {probe}.epi')
    write_script(node, "job", "exit 5")
    r = vmwn_run(node, "-l", "nodes=1:ppn=1,walltime=00:05:00", "-v", "SECRET=1", "-A", "acct",
                 "job")
    assert r.returncode == 5, r.stderr
    job_id = r.stdout.splitlines()[0]
    lines = read(probe + ".pro").splitlines()
    assert lines[0] == "argc=8"
    args = [ln[4:] for ln in lines if ln.startswith("arg=")]
    assert args[0] == job_id and args[1] == node.user.pw_name and args[3] == "job"
    assert args[4] == "nodes=1:ppn=1,walltime=00:05:00,neednodes=1:ppn=1"
    assert args[5] == "batch" and args[6] == "acct"
    assert args[7] == os.path.join(node.mom_priv, "jobs", job_id + ".SC")
    env = dict(ln.split("=", 1) for ln in lines[9:-1] if "=" in ln)
    allowed = {"PATH", "PBS_NODENUM", "PBS_MSHOST", "PBS_NODEFILE", "PBS_RESOURCE_NODES",
               "PBS_NUM_NODES", "PBS_NUM_PPN", "PBS_NP", "PBS_O_WORKDIR",
               "VMWN_HOOK", "PWD"}   # VMWN_HOOK: the dispatcher; PWD: the probe's shell
    assert set(env) <= allowed, set(env) - allowed
    assert env["PATH"] == "/bin:/usr/bin" and env["PBS_NODENUM"] == "0"
    assert env["PBS_O_WORKDIR"] == node.submit and env["VMWN_HOOK"] == "prologue"
    assert lines[-1] == node.mom_priv   # cwd
    epi = read(probe + ".epi").splitlines()
    assert epi[0] == "argc=11"
    eargs = [ln[4:] for ln in epi[1:]]
    assert eargs[0] == job_id and int(eargs[4]) > 0 and eargs[6].startswith("cput=")
    assert eargs[9] == "5" and eargs[10].endswith(".SC")


def test_prologue_exit_2_requeues(node):
    add_step(node, "prologue", "10-transient", "echo busy >&2; exit 2")
    write_script(node, "job", "exit 0")
    r = vmwn_run(node, "job")
    assert r.returncode == harness.EXIT_REQUEUED
    assert "requeued: prologue exited 2" in r.stdout


def test_prologue_killed_at_the_alarm(node):
    pidfile = os.path.join(node.root, "sleeper")
    add_step(node, "prologue", "10-hang", f"sleep 60 & echo $! > {pidfile}; wait")
    write_script(node, "job", "exit 0")
    r = vmwn_run(node, "--prologalarm", "12", "job")
    # -4 is the alarm's verdict: the hook did not end by itself (its sleep is 60 s)
    assert r.returncode == harness.EXIT_REQUEUED and "prologue exited -4" in r.stdout
    pid = int(read(pidfile))
    for _ in range(100):   # the killed sleeper is reaped by init shortly after
        if not os.path.exists(f"/proc/{pid}") or "Z" in read(f"/proc/{pid}/stat").split()[2]:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the hook's background process survived the alarm")


def test_must_run_as_root(node):
    parser_args = type("A", (), {"config": node.config})()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            privs.drop_to(node.user.pw_name, node.user.pw_uid, node.user.pw_gid)
            harness.command(parser_args)
            msg = b"no error"
        except UserError as e:
            msg = e.line().encode()
        except BaseException as e:  # noqa: BLE001
            msg = repr(e).encode()
        os.write(w, msg)
        os._exit(0)
    os.close(w)
    msg = os.read(r, 4096).decode()
    os.waitpid(pid, 0)
    assert msg == "vmwn run must run as root, because it plays pbs_mom: run it with sudo"


def test_variable_and_resource_names_are_checked():
    with pytest.raises(UserError):
        harness.parse_resource_args(["<bad>=1"])
    with pytest.raises(UserError):
        harness.parse_variable_args(["1X=2"], {})
    assert harness.parse_variable_args(["A=1,B", r"C=x\,y"], {"B": "b"}) == \
        {"A": "1", "B": "b", "C": "x,y"}


def test_vmwn_run_refuses_a_pbs_home_whose_pbs_mom_runs(node):
    """pbs_mom holds an fcntl write lock on mom_priv/mom.lock while it runs."""
    lock = os.path.join(node.mom_priv, "mom.lock")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({lock!r}, os.O_RDWR | os.O_CREAT, 0o644)\n"
         "fcntl.lockf(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        write_script(node, "job", "true")
        r = vmwn_run(node, "job")
        assert r.returncode != 0
        assert f"pbs_mom (pid {holder.pid}) runs on {node.pbs_home}" in r.stderr
        jobs = os.path.join(node.mom_priv, "jobs")
        assert not os.path.isdir(jobs) or not os.listdir(jobs)
    finally:
        holder.kill()
        holder.wait()
    r = vmwn_run(node, "job")  # the lock is gone: it runs
    assert r.returncode == 0, r.stderr


def test_leftover_spool_files_of_an_earlier_run_are_skipped_not_clobbered(node):
    """A counter younger than the spool (a fresh mom_priv beside an old spool)
    must not hand out a job id whose .OU/.ER an earlier run left behind."""
    spool = os.path.join(node.pbs_home, "spool")
    if not os.path.isdir(spool):
        os.makedirs(spool)
        os.chmod(spool, 0o1777)  # as pbs_mom (and vmwn run) make it
    host = socket.gethostname()
    left = os.path.join(spool, f"1.{host}.OU")
    with open(left, "w") as f:
        f.write("an earlier run's output\n")
    write_script(node, "job", "echo fresh")
    r = vmwn_run(node, "job")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == f"2.{host}"
    assert read(os.path.join(node.submit, "job.o2")) == "fresh\n"
    assert read(left) == "an earlier run's output\n"
