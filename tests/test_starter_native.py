"""The job starter for jobs without a VM: exec the job exactly as pbs_mom would have."""

import os
import subprocess
import sys

import pytest

RUNNER = ("import sys; from vmwn.torque.hooks.starter import main; "
          "sys.exit(main(['starter'] + sys.argv[2:], config_path=sys.argv[1]))")


@pytest.fixture
def env(tmp_path):
    conf = tmp_path / "vmwn.conf"
    conf.write_text(f"[site]\nstate_dir = {tmp_path}/state\nsyslog = no\n")
    # The job's own VMWN_CONFIG names something else; the starter ignores it.
    return {"PATH": "/usr/bin:/bin", "VMWN_CONFIG": str(tmp_path / "nonexistent.conf"),
            "PBS_JOBID": "5.srv", "PYTHONPATH": os.pathsep.join(sys.path),
            "CONF": str(conf)}


def run(argv, env, stdin=b"", pyflags=()):
    p = subprocess.Popen([sys.executable, *pyflags, "-c", RUNNER, env["CONF"], *argv], env=env,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate(stdin, timeout=30)
    return p.pid, p.returncode, out, err


@pytest.mark.parametrize("jobid", [None, "5.srv"])
def test_exec_replaces_the_starter_and_leaves_stdin_to_the_shell(env, jobid):
    if jobid is None:
        del env["PBS_JOBID"]
    pid, rc, out, err = run(["/bin/sh"], env, b"echo pid=$$; exit 4\n")
    assert (rc, err) == (4, b"")
    assert out == f"pid={pid}\n".encode()  # same process: exec'd, not forked


def test_interactive_command_form(env):
    pid, rc, out, err = run(["/bin/sh", "-c", "echo \"$0:$1\"", "zero", "one"], env)
    assert (rc, out) == (0, b"zero:one\n")


def test_tm_task_argv_is_searched_in_path(env):
    pid, rc, out, err = run(["echo", "task", "$HOME"], env)
    assert (rc, out) == (0, b"task $HOME\n")


def test_no_heavy_imports_on_the_native_path(env):
    pid, rc, out, err = run(["/bin/true"], env, pyflags=("-X", "importtime"))
    assert rc == 0
    mods = {line.split("|")[-1].strip() for line in err.decode().splitlines()
            if line.startswith("import time:")}
    assert "vmwn.state" in mods and "vmwn.config" in mods
    for heavy in ("paramiko", "libvirt", "jinja2", "cryptography", "vmwn.ssh",
                  "vmwn.transfer", "logging"):
        assert heavy not in mods


def test_missing_shell_fails_as_pbs_mom_fails_it(env):
    """A job without a VM whose shell cannot be run gets pbs_mom's own line and status
    (start_exec.c), as on a node without vmwn: nothing of vmwn shows."""
    pid, rc, out, err = run(["/bin/no-such-shell"], env)
    assert (rc, err) == (254, b"PBS: exec of shell '/bin/no-such-shell' failed\n")
    pid, rc, out, err = run(["no-such-shell-\udcff"], env)
    assert (rc, err) == (254, b"PBS: exec of shell 'no-such-shell-\xff' failed\n")


def test_no_arguments(env):
    pid, rc, out, err = run([], env)
    assert rc == 2 and err.startswith(b"vmwn: the job starter was called without")
    assert err.count(b"\n") == 1


def test_broken_configuration_fails_closed_without_traceback(env, tmp_path):
    (tmp_path / "vmwn.conf").write_text("[site]\nbogus = 1\n")
    pid, rc, out, err = run(["/bin/sh"], env, b"echo ran\n")
    assert rc == 2 and out == b""
    assert err.startswith(b"vmwn: ") and b"unknown key" in err and err.count(b"\n") == 1
