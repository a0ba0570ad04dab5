"""Exit codes and messages of the operator commands for failures vmwn did not anticipate."""

import os
import subprocess
import sys

import pytest

from vmwn import cli, errors
from vmwn.torque import install

# A command module with a bug in it, registered like any other command module.
BUGGY = '''
def register(sub):
    p = sub.add_parser("buggy")
    p.set_defaults(func=lambda args: len(5))
'''

RUN = ("import sys; from vmwn import cli; cli.COMMAND_MODULES.append('vmwn_buggy_cmd'); "
       "sys.exit(cli.main(sys.argv[1:]))")


@pytest.fixture
def buggy(tmp_path, monkeypatch):
    (tmp_path / "vmwn_buggy_cmd.py").write_text(BUGGY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "COMMAND_MODULES", cli.COMMAND_MODULES + ["vmwn_buggy_cmd"])
    return tmp_path


LINE = ("vmwn buggy: internal error (TypeError: object of type 'int' has no len()); "
        "run with -v for details\n")


def test_unexpected_exception_is_one_line_and_exit_70(buggy, capsys):
    assert cli.main(["buggy"]) == errors.exit_code("cli", TypeError()) == 70
    err = capsys.readouterr().err
    assert err == LINE


def run(tmp_path, *argv):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path)] + sys.path))
    return subprocess.run([sys.executable, "-c", RUN, *argv], env=env, capture_output=True,
                          text=True, timeout=60)


def test_traceback_only_with_verbose(buggy):
    quiet = run(buggy, "buggy")
    assert (quiet.returncode, quiet.stderr) == (70, LINE)
    loud = run(buggy, "-v", "buggy")
    assert loud.returncode == 70
    assert loud.stderr.startswith(LINE)
    assert "Traceback (most recent call last)" in loud.stderr
    assert "vmwn_buggy_cmd.py" in loud.stderr and "TypeError" in loud.stderr.split(LINE, 1)[1]


def test_anticipated_errors_keep_their_codes(tmp_path, capsys):
    conf = tmp_path / "vmwn.conf"
    conf.write_text("[site]\nbogus = 1\n")
    rc = cli.main(["--config", str(conf), "envs"])
    err = capsys.readouterr().err
    assert rc == errors.exit_code("cli", errors.SiteError("x")) == 3
    assert err.startswith("vmwn envs: ") and "unknown key" in err and err.count("\n") == 1


# -- python -m vmwn.torque.install --------------------------------------------------------------

def test_install_site_error_exit_code(tmp_path, capsys):
    rc = install.main(["install", "--pbs-home", "relative/path", "--destdir", str(tmp_path)])
    assert rc == 3
    err = capsys.readouterr().err
    assert err.startswith("vmwn install: --pbs-home 'relative/path' must be an absolute path")
    assert err.count("\n") == 1


def test_install_os_error_is_a_site_error_naming_the_path(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    rc = install.main(["install", "--destdir", str(blocker), "--pbs-home", "/var/spool/torque"])
    assert rc == 3
    err = capsys.readouterr().err
    assert err.startswith(f"vmwn install: cannot install: {blocker}/")
    assert "Not a directory" in err and err.count("\n") == 1


def test_install_unexpected_exception_is_exit_70(tmp_path, capsys, monkeypatch):
    def broken(opts):
        raise KeyError("surprise")
    monkeypatch.setattr(install, "uninstall", broken)
    rc = install.main(["uninstall", "--destdir", str(tmp_path)])
    assert rc == 70
    assert capsys.readouterr().err == ("vmwn uninstall: internal error (KeyError: 'surprise'); "
                                       "run with -v for details\n")
