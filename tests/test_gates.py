"""The shell gates that keep jobs without a VM free of Python: the job starter and
the epilogue step decide from the job's directory in state_dir alone."""

import os
import pathlib
import subprocess

import pytest

from vmwn import state
from vmwn.torque import install

GATE = install.JOB_DIR_SH
IDS = ["123.server", "123.server.example.org", "9024[1].srv", "77@host", "...5.x",
       "1" * 60 + ".long.server.name.example.org", "45.srv-with_under.score",
       ".", "a-b_c.d"]


def gate(state_dir, job_id):
    return subprocess.run(["sh", "-c", f'. "{GATE}"; vmwn_job_dir "$1" "$2"', "sh",
                           str(state_dir), job_id]).returncode == 0


@pytest.mark.parametrize("job_id", IDS)
def test_gate_finds_the_directory_safe_name_names(tmp_path, job_id):
    assert not gate(tmp_path, job_id)  # nothing made: Python is skipped
    d = tmp_path / state.safe_name(job_id)
    d.mkdir()
    assert gate(tmp_path, job_id)
    d.rmdir()
    d.symlink_to("/nonexistent")  # a dangling link is still something vmwn made
    assert gate(tmp_path, job_id)


@pytest.mark.parametrize("job_id", ["12 3.srv", "ü.srv", "1;rm -rf /.srv", "*", ""])
def test_ids_the_gate_cannot_name_are_left_to_python(tmp_path, job_id):
    assert gate(tmp_path, job_id)


def test_another_job_with_the_same_head_is_not_this_one(tmp_path):
    a, b = "1" * 45 + ".a", "1" * 45 + ".b"
    assert state.safe_name(a).rsplit("-", 1)[0] == state.safe_name(b).rsplit("-", 1)[0]
    (tmp_path / state.safe_name(a)).mkdir()
    assert gate(tmp_path, a) and not gate(tmp_path, b)


def test_without_sha256sum_python_decides(tmp_path):
    r = subprocess.run(["/bin/sh", "-c", f'. "{GATE}"; vmwn_job_dir "$1" "$2"', "sh",
                        str(tmp_path), "5.srv"], env={"PATH": str(tmp_path)})
    assert r.returncode == 0


def test_job_users_can_search_but_not_list_the_state_dir(world_tmp, test_user):
    jobs = pathlib.Path(world_tmp) / "jobs"
    jobs.mkdir()
    os.chmod(jobs, 0o711)  # as vmwn makes it
    (jobs / state.safe_name("6.srv")).mkdir(mode=0o711)
    code = f'. "{GATE}"; vmwn_job_dir "$1" "$2"'
    def as_user(job_id):
        return subprocess.run(["setpriv", f"--reuid={test_user.pw_uid}",
                               f"--regid={test_user.pw_gid}", "--clear-groups", "sh", "-c",
                               code, "sh", str(jobs), job_id]).returncode == 0
    assert as_user("6.srv") and not as_user("7.srv")


def _starter(tmp_path, python):
    p = tmp_path / "job-starter"
    p.write_text(install.render_starter(python, "/nonexistent.conf",
                                        state_dir=str(tmp_path / "jobs"), pbs_home="/x"))
    p.chmod(0o755)
    (tmp_path / "jobs").mkdir(exist_ok=True)
    return str(p)


def test_starter_runs_a_job_without_a_vm_without_python(tmp_path):
    starter = _starter(tmp_path, "/nonexistent/python3")
    env = dict(os.environ, PBS_JOBID="31.gate.test")
    env.pop("VMWN_ENV", None)
    r = subprocess.run([starter, "/bin/sh", "-c", 'echo "$0 $1" ok', "x", "y"], env=env,
                       capture_output=True, text=True)
    assert (r.returncode, r.stdout) == (0, "x y ok\n")
    # A job vmwn made something for, or one that names an environment, is Python's.
    (tmp_path / "jobs" / state.safe_name("31.gate.test")).mkdir()
    r = subprocess.run([starter, "/bin/sh", "-c", "echo ran"], env=env, capture_output=True,
                       text=True)
    assert r.returncode == 127 and "ran" not in r.stdout
    env.update(PBS_JOBID="32.gate.test", VMWN_ENV="tiny")
    r = subprocess.run([starter, "/bin/sh", "-c", "echo ran"], env=env, capture_output=True,
                       text=True)
    assert r.returncode == 127 and "ran" not in r.stdout


def _epilogue_step(tmp_path, python):
    with open(os.path.join(install.SOURCE_DIR, "epilogue.d", "50-vmwn")) as f:
        text = install.render_step(f.read(), python, "/nonexistent.conf", "/x",
                                   state_dir=str(tmp_path / "jobs"))
    p = tmp_path / "50-vmwn"
    p.write_text(text)
    p.chmod(0o755)
    (tmp_path / "jobs").mkdir(exist_ok=True)
    return str(p)


def test_epilogue_step_skips_python_for_a_job_without_a_vm(tmp_path):
    step = _epilogue_step(tmp_path, "/nonexistent/python3")
    args = ["41.gate.test", "u", "g", "name", "1234", "walltime=1", "cput=0", "batch", "",
            "0"]
    r = subprocess.run([step] + args, capture_output=True, text=True)
    assert (r.returncode, r.stderr) == (0, "")
    (tmp_path / "jobs" / state.safe_name("41.gate.test")).mkdir()
    r = subprocess.run([step] + args, capture_output=True, text=True)
    assert r.returncode == 127  # went on to the (missing) interpreter
