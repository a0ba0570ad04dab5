"""The prologue step's shell gate: jobs that cannot want a VM never start Python.

The installed step is run with PYTHON pointing at a program that records its
call, so each case shows whether vmwn itself was consulted.
"""

import os
import subprocess
import sys

import pytest

from vmwn.torque import install

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def step(tmp_path):
    marker = tmp_path / "python-called"
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {marker}\nexit 0\n")
    fake.chmod(0o755)
    home = tmp_path / "torque"
    (home / "mom_priv" / "jobs").mkdir(parents=True)
    conf = tmp_path / "vmwn.conf"
    conf.write_text("[site]\n")
    # A stand-in for Torque's qstat: the job's variables as the server has them.
    variables = tmp_path / "server-variables"
    qstat = tmp_path / "qstat"
    qstat.write_text(f"#!/bin/sh\n[ \"$1 $2 $3\" = \"-f -1 7.srv\" ] || exit 153\n"
                     f"echo \"Job Id: $3\"\n"
                     f"echo \"    Variable_List = $(cat {variables})\"\n")
    qstat.chmod(0o755)
    with open(os.path.join(ROOT, "prologue.d", "50-vmwn")) as f:
        text = install.render_step(f.read(), str(fake), str(conf), str(home), "/opt/a:/opt/b",
                                   str(qstat))
    path = tmp_path / "50-vmwn"
    path.write_text(text)
    path.chmod(0o755)

    def run(resources, server_vars="PBS_O_WORKDIR=/home/u", queue="batch", job="7.srv"):
        if marker.exists():
            marker.unlink()
        variables.write_text(server_vars)
        r = subprocess.run([str(path), job, "u", "g", "name", resources, queue, "", "/x.SC"],
                           env={"PATH": "/bin:/usr/bin"}, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return marker.read_text() if marker.exists() else None

    run.conf = conf
    return run


def test_plain_job_never_starts_python(step):
    assert step("walltime=01:00:00,nodes=1:ppn=2") is None


def test_vm_request_in_resources_reaches_vmwn_with_the_settings_and_argv(step, tmp_path):
    called = step("other=vmwn=tiny,walltime=01:00:00")
    assert called is not None
    words = called.split()
    assert words[0] == "-Es" and words[1] == "-c"
    assert str(tmp_path / "vmwn.conf") in words and "/opt/a:/opt/b" in words
    # the hook's argv follows the settings unchanged (the empty account included)
    assert called.rstrip("\n").endswith(
        " /opt/a:/opt/b 7.srv u g name other=vmwn=tiny,walltime=01:00:00 batch  /x.SC")


def test_variable_on_the_server_reaches_vmwn(step):
    # pbs_mom writes the .JB record only after the prologue: qsub -v is on the server.
    assert step("walltime=1:00:00", server_vars="PBS_O_WORKDIR=/w,VMWN_ENV=tiny") is not None


def test_a_job_the_server_does_not_answer_for_is_a_plain_job(step):
    assert step("walltime=1:00:00", job="8.srv") is None


def test_without_qstat_only_resources_and_queue_defaults_count(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\necho called > {tmp_path}/called\n")
    fake.chmod(0o755)
    with open(os.path.join(ROOT, "prologue.d", "50-vmwn")) as f:
        text = install.render_step(f.read(), str(fake), str(tmp_path / "none.conf"),
                                   str(tmp_path), "", "")
    path = tmp_path / "50-vmwn"
    path.write_text(text)
    path.chmod(0o755)
    args = [str(path), "7.srv", "u", "g", "n", "walltime=1:00:00", "batch", "", "/x.SC"]
    assert subprocess.run(args, env={"PATH": "/bin:/usr/bin"}).returncode == 0
    assert not (tmp_path / "called").exists()
    args[5] = "other=vmwn=tiny"
    assert subprocess.run(args, env={"PATH": "/bin:/usr/bin"}).returncode == 0
    assert (tmp_path / "called").exists()


def test_queue_default_in_configuration_lets_vmwn_decide(step):
    step.conf.write_text("[site]\nqueue_defaults = vmq:tiny\n")
    assert step("walltime=1:00:00") is not None


def test_rendered_settings_are_shell_quoted(tmp_path):
    with open(os.path.join(ROOT, "prologue.d", "50-vmwn")) as f:
        text = install.render_step(f.read(), "/opt/my python/bin/python3", "/etc/v w/vmwn.conf",
                                   "/var/spool/tor'que", None)
    assert "PYTHON='/opt/my python/bin/python3'" in text
    assert "PBS_HOME='/var/spool/tor'\"'\"'que'" in text
    r = subprocess.run(["sh", "-n", "-c", text])
    assert r.returncode == 0


def test_a_broken_install_never_fails_the_epilogue(tmp_path):
    import sys
    with open(os.path.join(ROOT, "epilogue.d", "50-vmwn")) as f:
        text = install.render_step(f.read(), sys.executable, str(tmp_path / "c.conf"),
                                   str(tmp_path), None, state_dir=str(tmp_path / "jobs"))
    from vmwn.state import safe_name
    os.makedirs(tmp_path / "jobs" / safe_name("7.srv"))  # a job vmwn made something for
    step = tmp_path / "50-vmwn"
    step.write_text(text.replace("from vmwn.torque.hooks.epilogue import main",
                                 "from vmwn.torque.hooks.no_such_module import main"))
    step.chmod(0o755)
    r = subprocess.run([str(step), "7.srv", "u", "g", "n", "0", "", "", "batch", "", "0", "/x"],
                       env={"PATH": "/bin:/usr/bin"}, capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr.startswith("vmwn: cannot load vmwn")


def test_a_broken_install_is_requeued_twice_then_aborted_never_run(tmp_path):
    """vmwn cannot be imported: pbs_server would restart the job at once for ever
    after each exit 2, and exit 0 would run it on the host (the job starter cannot
    load vmwn either), so the step counts, requeues twice and aborts (exit 1)."""
    home = tmp_path / "torque"
    (home / "mom_priv" / "jobs").mkdir(parents=True)
    states = tmp_path / "state"
    with open(os.path.join(ROOT, "prologue.d", "50-vmwn")) as f:
        text = install.render_step(f.read(), sys.executable, str(tmp_path / "vmwn.conf"),
                                   str(home), str(tmp_path / "empty"), state_dir=str(states))
    path = tmp_path / "50-vmwn"
    path.write_text(text.replace("from vmwn.torque.hooks.prologue import main",
                                 "from vmwn.torque.hooks.no_such_module import main"))
    path.chmod(0o755)
    codes, errs = [], []
    for _ in range(4):
        r = subprocess.run([str(path), "7.srv", "u", "g", "name", "other=vmwn=tiny", "batch",
                            "", "/x.SC"], env={"PATH": "/bin:/usr/bin"},
                           capture_output=True, text=True)
        codes.append(r.returncode)
        errs.append(r.stderr)
    assert codes == [2, 2, 1, 2]  # the count starts again for a new submission
    assert all(e.count("\n") == 1 and "cannot load vmwn" in e and "reinstall" in e
               for e in errs), errs
    assert "requeued" in errs[0] and "aborted after 3 starts" in errs[2]
