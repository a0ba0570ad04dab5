"""``vmwn submit-filter``: Torque's SUBMITFILTER contract (stdin script, qsub argv, exit)."""

import os
import subprocess
import sys

import pytest

from vmwn.errors import UserError
from vmwn.grid import submitfilter

from test_grid_advertise import make_config

VMWN = os.path.join(os.path.dirname(sys.executable), "vmwn")
ENVS = {"tiny", "debian12"}


def run_filter(conf, script, *qsub_args, module=False, env=None):
    """Run the filter as qsub does: script on stdin, qsub's argv, bytes out."""
    if module:
        argv = [sys.executable, "-m", "vmwn.grid.submitfilter", *qsub_args]
        env = {**os.environ, "VMWN_CONFIG": str(conf), **(env or {})}
    else:
        argv = [VMWN, "--config", str(conf), "submit-filter", *qsub_args]
        env = {**os.environ, **(env or {})}
    return subprocess.run(argv, input=script, capture_output=True, timeout=60, env=env)


@pytest.fixture
def conf(tmp_path):
    # The submit host needs no images: only the configured names matter.
    return make_config(tmp_path, present=())


def filt(script, *argv, envs=ENVS):
    return submitfilter.filter_script(script, list(argv), envs)


def rejected(script, *argv, envs=ENVS):
    with pytest.raises(submitfilter.UserError) as e:
        filt(script, *argv, envs=envs)
    return str(e.value)


def test_acceptance_unknown_vmwn_line_is_rejected_naming_the_environments(conf):
    cp = run_filter(conf, b"#!/bin/sh\n#VMWN env=nosuch\necho hi\n")
    assert cp.returncode != 0
    assert cp.stdout == b""
    err = cp.stderr.decode()
    assert "nosuch" in err and "available environments: debian12, tiny" in err
    assert len(err.strip().splitlines()) == 1


def test_vmwn_line_becomes_a_pbs_directive_in_place(conf):
    script = b"#!/bin/bash\r\n#PBS -N job\r\n  #VMWN env=tiny\r\n\r\necho \xff\xfe done\r\n"
    cp = run_filter(conf, script)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout == (b"#!/bin/bash\r\n#PBS -N job\r\n#PBS -l other=vmwn=tiny\r\n\r\n"
                         b"echo \xff\xfe done\r\n")


def test_other_scripts_pass_through_byte_for_byte(conf):
    script = b"#!/bin/sh\n#PBS -l walltime=1:00:00\n\x00\x01binary\xc3\x28\r\nno newline"
    cp = run_filter(conf, script)
    assert (cp.returncode, cp.stdout) == (0, script)
    for script in (b"", b"\n", b"echo hi", b"\xef\xbb\xbf#!/bin/sh\n"):
        assert filt(script) == script


@pytest.mark.parametrize("argv", [
    ["-l", "other=vmwn=tiny"],
    ["-l", "other=vmwn=tiny,walltime=1:00:00"],
    ["-l", "walltime=1:00:00,other=vmwn=tiny"],
    ["-lother=vmwn=tiny"],
    ["-I", "-V", "-l", "other=vmwn=tiny", "job.sh"],
    ["-IVlother=vmwn=tiny"],
    ["-N", "-l", "-l", "other=vmwn=tiny"],
])
def test_known_environment_in_argv_is_accepted(conf, argv):
    cp = run_filter(conf, b"#!/bin/sh\necho\n", *argv)
    assert (cp.returncode, cp.stdout) == (0, b"#!/bin/sh\necho\n"), cp.stderr


@pytest.mark.parametrize("argv", [
    ["-l", "other=vmwn=nosuch"],
    ["-l", "other=vmwn=nosuch,walltime=1:00:00"],
    ["-l", "nodes=1:ppn=2,other=vmwn=nosuch"],
    ["-lother=vmwn=nosuch"],
    ["-q", "batch", "-lother=vmwn=nosuch", "job.sh"],
])
def test_unknown_environment_in_argv_is_rejected(conf, argv):
    cp = run_filter(conf, b"#!/bin/sh\necho\n", *argv)
    assert cp.returncode != 0 and cp.stdout == b""
    assert b"'nosuch'" in cp.stderr and b"debian12, tiny" in cp.stderr


def test_value_of_another_option_is_not_a_request():
    # '-N' takes the next word as the job name, so '-l' here is a name.
    assert filt(b"x\n", "-N", "-l", "other=vmwn=nosuch") == b"x\n"
    # After '--' qsub reads no more options.
    assert filt(b"x\n", "--", "-l", "other=vmwn=nosuch") == b"x\n"
    # Other 'other=' values are none of our business.
    assert filt(b"x\n", "-l", "other=fastio") == b"x\n"


def test_pbs_directives_in_the_script_are_checked():
    assert filt(b"#!/bin/sh\n#PBS -l other=vmwn=debian12\necho\n") \
        == b"#!/bin/sh\n#PBS -l other=vmwn=debian12\necho\n"
    assert filt(b"#PBS -N a -lwalltime=1:00,other=vmwn=tiny\n") \
        == b"#PBS -N a -lwalltime=1:00,other=vmwn=tiny\n"
    err = rejected(b"#!/bin/sh\n# comment\n\n   #PBS -l other=vmwn=nosuch\necho\n")
    assert "line 4" in err and "nosuch" in err and "debian12, tiny" in err


def test_directives_after_the_first_command_are_ignored_like_qsub_does():
    script = b"#!/bin/sh\necho\n#PBS -l other=vmwn=nosuch\n"
    assert filt(script) == script
    # ':' lines do not end the directive block for qsub.
    assert "nosuch" in rejected(b"#!/bin/sh\n: note\n#PBS -l other=vmwn=nosuch\n")


def test_vmwn_line_after_the_first_command_is_rejected():
    err = rejected(b"#!/bin/sh\ncd /tmp\n#VMWN env=tiny\n")
    assert "line 3" in err and "first command" in err


def test_two_environments_are_rejected():
    err = rejected(b"#!/bin/sh\n#VMWN env=tiny\n", "-l", "other=vmwn=debian12")
    assert "more than one" in err and "tiny (line 2)" in err and "debian12 (qsub)" in err
    assert "more than one" in rejected(b"#PBS -l other=vmwn=tiny\n#PBS -l other=vmwn=debian12\n")
    # The same environment twice is one request.
    assert filt(b"#VMWN env=tiny\n", "-l", "other=vmwn=tiny") == b"#PBS -l other=vmwn=tiny\n"


@pytest.mark.parametrize("line", [b"#VMWN", b"#VMWN env=", b"#VMWN env=a env=b",
                                  b"#VMWN environment=tiny", b"#VMWN env=tiny extra"])
def test_malformed_vmwn_lines(line):
    with pytest.raises(submitfilter.UserError):
        filt(line + b"\n")


def test_empty_environment_name():
    assert "names no environment" in rejected(b"x\n", "-l", "other=vmwn=")


def test_directive_prefix_follows_qsub_C_and_PBS_DPREFIX(conf, monkeypatch):
    # With -C '#XX', '#PBS' lines are comments and '#XX' lines are directives.
    assert filt(b"#PBS -l other=vmwn=nosuch\n", "-C", "#XX") == b"#PBS -l other=vmwn=nosuch\n"
    assert "nosuch" in rejected(b"#XX -l other=vmwn=nosuch\n", "-C", "#XX")
    assert filt(b"#VMWN env=tiny\n", "-C", "#XX") == b"#XX -l other=vmwn=tiny\n"
    monkeypatch.setenv("PBS_DPREFIX", "#QQ")
    assert filt(b"#VMWN env=tiny\n") == b"#QQ -l other=vmwn=tiny\n"
    assert "-C ''" in rejected(b"#VMWN env=tiny\n", "-C", "")


def test_without_configuration_only_the_syntax_is_checked(tmp_path):
    missing = tmp_path / "absent.conf"
    cp = run_filter(missing, b"#VMWN env=anything\n")
    assert (cp.returncode, cp.stdout) == (0, b"#PBS -l other=vmwn=anything\n")
    cp = run_filter(missing, b"x\n", "-l", "other=vmwn=Bad/Name")
    assert cp.returncode != 0 and b"not a vmwn environment name" in cp.stderr


def test_broken_configuration_does_not_stop_qsub(tmp_path):
    broken = tmp_path / "broken.conf"
    broken.write_text("[nonsense]\nx = 1\n")
    cp = run_filter(broken, b"#!/bin/sh\necho\n", "-l", "other=vmwn=tiny")
    assert (cp.returncode, cp.stdout) == (0, b"#!/bin/sh\necho\n")
    assert b"cannot read the vmwn configuration" in cp.stderr


def test_module_entry_point_behaves_the_same(conf):
    cp = run_filter(conf, b"#!/bin/sh\n#VMWN env=tiny\n", module=True)
    assert (cp.returncode, cp.stdout) == (0, b"#!/bin/sh\n#PBS -l other=vmwn=tiny\n")
    cp = run_filter(conf, b"#!/bin/sh\n#VMWN env=nosuch\n", "-l", "walltime=1:00", module=True)
    assert cp.returncode == 2 and b"debian12, tiny" in cp.stderr


def test_filter_imports_neither_libvirt_nor_paramiko_nor_classads(conf):
    code = ("import io, sys\n"
            "sys.stdin = io.TextIOWrapper(io.BytesIO(b'#VMWN env=tiny\\n'))\n"
            "from vmwn.cli import main\n"
            f"rc = main(['--config', {str(conf)!r}, 'submit-filter', '-l', 'other=vmwn=tiny'])\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('libvirt', 'paramiko', 'classad', 'classad2', 'htcondor', 'jinja2'))\n"
            "print(rc, heavy, file=sys.stderr)\n")
    cp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert cp.stderr.strip().splitlines()[-1] == "0 []", cp.stderr


def test_long_script_is_parsed_only_up_to_its_first_command(conf, monkeypatch):
    """qsub waits for the filter on every submission: the body of a long script is
    passed through, not parsed (and, as in qsub, '#PBS' lines there mean nothing)."""
    script = (b"#!/bin/sh\n#PBS -N x\n#VMWN env=tiny\necho\n"
              + b"#PBS -l other=vmwn=nosuch\necho line\n" * 2500)
    expected = script.replace(b"#VMWN env=tiny\n", b"#PBS -l other=vmwn=tiny\n", 1)
    parsed = []
    real = submitfilter._directive_body

    def counting(text, prefix):
        parsed.append(text)
        return real(text, prefix)
    monkeypatch.setattr(submitfilter, "_directive_body", counting)
    assert filt(script, "-l", "walltime=1:00:00") == expected
    assert parsed == ["#!/bin/sh\n", "#PBS -N x\n", "echo\n"]
    cp = run_filter(conf, script, "-l", "walltime=1:00:00")
    assert (cp.returncode, cp.stdout) == (0, expected), cp.stderr


def test_vmwn_env_variable_is_checked_like_the_resource():
    """qsub -v VMWN_ENV=NAME asks for an environment too (the prologue honours it)."""
    from vmwn.grid import submitfilter
    opts = submitfilter.qsub_options(["-v", "A=1,VMWN_ENV=tiny", "-vB=2\\,3", "job.sh"])
    assert submitfilter.env_requests(opts) == ["tiny"]
    with pytest.raises(UserError, match="nosuch"):
        submitfilter.check([("qsub -v", n) for n in submitfilter.env_requests(
            submitfilter.qsub_options(["-v", "VMWN_ENV=nosuch"]))], ["tiny", "debian12"])
