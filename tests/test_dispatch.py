"""The dispatchers pbs_mom runs, and vmwn's prologue/epilogue steps behind them."""

import json
import os
import subprocess
import sys

import pytest

from vmwn.errors import SiteError
from vmwn.torque.hooks import dispatch
from vmwn.torque.hooks import prologue as prologue_step

from conftest import REPO, VENV_PY, write_site_config

HEAVY = ("libvirt", "paramiko", "jinja2")
PRO_ARGV = ["9.testhost", "root", "root", "job", "walltime=00:01:00", "batch", "",
            "/nonexistent/9.testhost.SC"]
MINIMAL_ENV = {"PATH": "/bin:/usr/bin", "PBS_NODENUM": "0", "PBS_O_WORKDIR": "/srv/w"}


def make_hooks(mom_priv):
    for hook, (steps, _) in dispatch.HOOKS.items():
        d = os.path.join(mom_priv, steps)
        os.makedirs(d, exist_ok=True)
        p = os.path.join(mom_priv, hook)
        with open(p, "w") as f:
            f.write(dispatch.render(hook, d))
        os.chmod(p, 0o755)


def step(mom_priv, family, name, body, mode=0o755):
    p = os.path.join(mom_priv, f"{family}.d", name)
    with open(p, "w") as f:
        f.write("#!/bin/sh\n" + body + "\n")
    os.chmod(p, mode)
    return p


def run_hook(mom_priv, hook, argv, env=None):
    return subprocess.run([os.path.join(mom_priv, hook), *argv], cwd=mom_priv,
                          env=env or MINIMAL_ENV, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, start_new_session=True)


@pytest.fixture
def mom_priv(tmp_path):
    mp = str(tmp_path / "mom_priv")
    os.mkdir(mp)
    make_hooks(mp)
    return mp


def test_steps_run_in_name_order_with_argv_and_environment(mom_priv, tmp_path):
    log = tmp_path / "log"
    for name in ("20-b", "10-a", "30-c"):
        step(mom_priv, "prologue", name,
             f'echo "{name} $# $1 $8 $VMWN_HOOK $PBS_NODENUM" >> {log}')
    r = run_hook(mom_priv, "prologue", PRO_ARGV)
    assert r.returncode == 0, r.stderr
    assert log.read_text().splitlines() == [
        f"{n} 8 9.testhost /nonexistent/9.testhost.SC prologue 0"
        for n in ("10-a", "20-b", "30-c")]


def test_arguments_with_spaces_and_metacharacters_pass_through(mom_priv, tmp_path):
    out = tmp_path / "argv"
    step(mom_priv, "prologue", "10-argv", f'for a in "$@"; do printf "%s\\n" "$a"; done > {out}')
    argv = ["1.h", "u", "g", "a b; $(touch /tmp/pwned-vmwn) `x`", "other=vmwn=x", "q", "", "s"]
    assert run_hook(mom_priv, "prologue", argv).returncode == 0
    assert out.read_text().splitlines() == argv
    assert not os.path.exists("/tmp/pwned-vmwn")


def test_prologue_stops_at_the_first_failure_with_its_code(mom_priv, tmp_path):
    log = tmp_path / "log"
    step(mom_priv, "prologue", "10-ok", f"echo ok >> {log}")
    step(mom_priv, "prologue", "20-fail", f"echo fail >> {log}; exit 7")
    step(mom_priv, "prologue", "30-never", f"echo never >> {log}")
    assert run_hook(mom_priv, "prologue", PRO_ARGV).returncode == 7
    assert log.read_text().split() == ["ok", "fail"]


def test_epilogue_runs_every_step_and_returns_the_first_failure(mom_priv, tmp_path):
    log = tmp_path / "log"
    step(mom_priv, "epilogue", "10-fail", f"echo a $# >> {log}; exit 3")
    step(mom_priv, "epilogue", "20-fail", f"echo b >> {log}; exit 4")
    step(mom_priv, "epilogue", "30-ok", f"echo c >> {log}")
    argv = ["9.h", "u", "g", "n", "0", "", "", "q", "", "0", "/x.SC"]
    assert run_hook(mom_priv, "epilogue", argv).returncode == 3
    assert log.read_text().split() == ["a", "11", "b", "c"]


def test_parallel_hooks_tell_the_step(mom_priv, tmp_path):
    log = tmp_path / "log"
    step(mom_priv, "prologue", "10-x", f"echo $VMWN_HOOK >> {log}")
    step(mom_priv, "epilogue", "10-x", f"echo $VMWN_HOOK >> {log}")
    assert run_hook(mom_priv, "prologue.parallel", PRO_ARGV).returncode == 0
    assert run_hook(mom_priv, "epilogue.parallel", ["1"] * 10).returncode == 0
    assert log.read_text().split() == ["prologue.parallel", "epilogue.parallel"]


def test_non_steps_are_skipped(mom_priv, tmp_path):
    log = tmp_path / "log"
    step(mom_priv, "prologue", "10-notexec", f"echo notexec >> {log}; exit 9", mode=0o644)
    step(mom_priv, "prologue", "20-backup~", f"echo backup >> {log}; exit 9")
    step(mom_priv, "prologue", "30-x.dpkg-old", f"echo dpkg >> {log}; exit 9")
    os.mkdir(os.path.join(mom_priv, "prologue.d", "40-dir"))
    target = step(mom_priv, "prologue", "real", f"echo via-link >> {log}; exit 9")
    os.rename(target, str(tmp_path / "real"))
    os.symlink(str(tmp_path / "real"), os.path.join(mom_priv, "prologue.d", "50-link"))
    step(mom_priv, "prologue", "60-ok", f"echo ok >> {log}")
    assert run_hook(mom_priv, "prologue", PRO_ARGV).returncode == 0
    assert log.read_text().split() == ["ok"]


@pytest.mark.parametrize("mode", [0o775, 0o757])
def test_group_or_other_writable_step_counts_as_failed(mom_priv, tmp_path, mode):
    log = tmp_path / "log"
    step(mom_priv, "prologue", "10-unsafe", f"echo unsafe >> {log}", mode=mode)
    step(mom_priv, "prologue", "20-after", f"echo after >> {log}")
    r = run_hook(mom_priv, "prologue", PRO_ARGV)
    assert r.returncode == 2 and "10-unsafe refused" in r.stderr
    assert not log.exists()


def test_step_not_owned_by_root_counts_as_failed(mom_priv, tmp_path, test_user):
    log = tmp_path / "log"
    p = step(mom_priv, "epilogue", "10-users", f"echo users >> {log}")
    os.chown(p, test_user.pw_uid, test_user.pw_gid)
    step(mom_priv, "epilogue", "20-ok", f"echo ok >> {log}")
    r = run_hook(mom_priv, "epilogue", ["1"] * 10)
    assert r.returncode == 2 and "refused" in r.stderr
    assert log.read_text().split() == ["ok"]


def test_writable_steps_directory_runs_nothing(mom_priv, tmp_path):
    log = tmp_path / "log"
    step(mom_priv, "prologue", "10-x", f"echo x >> {log}")
    os.chmod(os.path.join(mom_priv, "prologue.d"), 0o777)
    r = run_hook(mom_priv, "prologue", PRO_ARGV)
    assert r.returncode == 2 and not log.exists()


def test_missing_steps_directory_is_success(mom_priv):
    os.rmdir(os.path.join(mom_priv, "epilogue.d"))
    assert run_hook(mom_priv, "epilogue", ["1"] * 10).returncode == 0


def test_dispatcher_starts_only_sh_find_and_the_step(mom_priv, tmp_path):
    """What keeps the dispatcher cheap: no interpreter, one find per check, then the step."""
    import shutil
    strace = shutil.which("strace")
    if not strace:
        pytest.skip("needs strace")
    s = step(mom_priv, "prologue", "10-true", "exit 0")
    trace = tmp_path / "trace"
    r = subprocess.run([strace, "-f", "-qq", "-e", "trace=execve", "-e", "signal=none",
                        "-o", str(trace), os.path.join(mom_priv, "prologue"), *PRO_ARGV],
                       cwd=mom_priv, env=MINIMAL_ENV, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    execs = [line.split('execve("', 1)[1].split('"', 1)[0]
             for line in trace.read_text().splitlines()
             if 'execve("' in line and "= 0" in line.rsplit(")", 1)[-1]]
    found = [os.path.basename(p) for p in execs]
    assert execs[0] == os.path.join(mom_priv, "prologue")
    assert execs[-1] == s
    # the steps directory and the step are each checked by one find
    assert found[1:-1] == ["find", "find"], execs


# -- vmwn's own steps ---------------------------------------------------------------

# As the installed steps call them: with the state directory installed with them
# (beside PBS_HOME here, as write_site_config puts it).
PROBE = """
import json, sys
from vmwn.torque.hooks import {module} as m
rc = m.main(sys.argv[1:], config_path={config!r}, pbs_home={pbs_home!r},
            state_dir={state_dir!r})
print(json.dumps({{"rc": rc, "heavy": sorted(x for x in {heavy!r} if x in sys.modules)}}))
"""


def run_step(module, argv, config, pbs_home, env=None, preexec=None):
    code = PROBE.format(module=module, config=config, pbs_home=pbs_home, heavy=HEAVY,
                        state_dir=os.path.join(os.path.dirname(pbs_home), "state"))
    r = subprocess.run([VENV_PY, "-Es", "-c", code, module, *argv], cwd=REPO,
                       env=env or MINIMAL_ENV, stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, preexec_fn=preexec)
    return r


@pytest.fixture
def site(tmp_path):
    path = str(tmp_path / "vmwn.conf")
    write_site_config(path, str(tmp_path), extra_site="queue_defaults = vmq:tiny")
    os.makedirs(tmp_path / "torque" / "mom_priv" / "jobs")
    return path, str(tmp_path / "torque")


def result(r):
    assert r.stdout.strip(), r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_prologue_without_request_exits_at_once_without_heavy_imports(site):
    config, home = site
    r = run_step("prologue", PRO_ARGV, config, home)
    assert result(r) == {"rc": 0, "heavy": []}
    assert r.stderr == ""


def test_prologue_reads_vmwn_env_from_the_job_record(site, tmp_path):
    config, home = site
    jb = os.path.join(home, "mom_priv", "jobs", "9.testhost.JB")
    with open(jb, "w") as f:
        f.write("<job><attributes><Variable_List>PBS_O_HOME=/root,VMWN_ENV=nosuch"
                "</Variable_List></attributes></job>")
    r = run_step("prologue", PRO_ARGV[:7], config, home)
    assert result(r)["rc"] == 0 and r.stderr == ""
    assert "unknown vmwn environment 'nosuch'" in refusal_line(config, "9.testhost")


@pytest.mark.parametrize("res,text", [
    ("other=vmwn=nosuch", "unknown vmwn environment 'nosuch': request one of: tiny"),
    ("mem=64gb,other=vmwn=tiny", "max_memory of environment tiny"),
    ("nodes=1:ppn=3,other=vmwn=tiny", "max_vcpus of environment tiny"),
])
def test_prologue_refuses_users_mistakes_with_one_line_for_the_starter(site, res, text):
    # Exit 1 would abort the job with the reason stuck in the mom's spool; the
    # refusal lets the job start so that its starter prints the line on its .e.
    config, home = site
    argv = list(PRO_ARGV)
    argv[4] = res
    r = run_step("prologue", argv, config, home)
    assert result(r) == {"rc": 0, "heavy": []}
    assert r.stderr == ""
    line = refusal_line(config, "9.testhost")
    assert text in line and "\n" not in line


def refusal_line(config_path, job_id):
    from vmwn import config, state
    from vmwn.wardenclient import answer_error
    refusal = state.read_refusal(config.load(config_path).site["state_dir"], job_id)
    assert refusal is not None, "no refusal recorded"
    return answer_error(refusal).line()


def test_a_sisters_prologue_never_fails_the_jobs_start(site, tmp_path):
    """A non-zero prologue.parallel requeues the job and marks the node down: a
    sister refuses (the mother superior's starter then finds its guest missing)."""
    config, home = site
    argv = list(PRO_ARGV)
    argv[4] = "nodes=2,other=vmwn=nosuch"
    for env in (dict(MINIMAL_ENV, VMWN_HOOK="prologue.parallel"),
                dict(MINIMAL_ENV, PBS_NODENUM="1")):
        assert result(run_step("prologue", argv, config, home, env=env))["rc"] == 0
        assert "unknown vmwn environment 'nosuch'" in refusal_line(config, "9.testhost")
    bad = tmp_path / "bad.conf"
    bad.write_text("[site]\nno_such_key = 1\n")
    env = dict(MINIMAL_ENV, VMWN_HOOK="prologue.parallel")
    r = run_step("prologue", PRO_ARGV, str(bad), home, env=env)
    assert result(r)["rc"] == 0 and "no_such_key" in r.stderr
    assert result(run_step("prologue", PRO_ARGV, str(bad), home))["rc"] == 2  # the MS's


def test_prologue_site_problems_exit_2(site, tmp_path):
    _, home = site
    bad = tmp_path / "bad.conf"
    bad.write_text("[site]\nno_such_key = 1\n")
    r = run_step("prologue", PRO_ARGV, str(bad), home)
    assert result(r)["rc"] == 2 and "no_such_key" in r.stderr
    r = run_step("prologue", PRO_ARGV[:2], str(bad), home)
    assert result(r)["rc"] == 2
    # Counted where the step was installed to count (tests/test_start_contract.py
    # follows such a job to its refusal), never in the node's own state directory.
    assert os.listdir(os.path.join(os.path.dirname(home), "state", ".starts"))


def test_prologue_unexpected_exception_exits_2_not_1(site, monkeypatch, capsys):
    config, home = site

    def boom(*a, **k):
        raise KeyError("surprise")
    monkeypatch.setattr(prologue_step.request, "build", boom)
    argv = list(PRO_ARGV)
    argv[4] = "other=vmwn=tiny"
    assert prologue_step.main(["50-vmwn", *argv], config_path=config, pbs_home=home,
                              environ=MINIMAL_ENV) == 2
    assert "internal error" in capsys.readouterr().err


def test_prologue_deadline_respects_the_mom_alarm(site):
    from vmwn import config as configmod
    config, home = site
    cfg = configmod.load(config)
    with open(os.path.join(home, "mom_priv", "config"), "w") as f:
        f.write("$prologalarm 100\n")
    budget = min(cfg.site["prologue_deadline"], 100 - 10 - prologue_step.CLEANUP_RESERVE)
    assert prologue_step.deadline(cfg, home, now=1000.0, used=0.0) == 1000.0 + budget
    # Time the mom's session already spent (other steps, the dispatcher) is taken off.
    assert prologue_step.deadline(cfg, home, now=1000.0, used=7.0) == 1000.0 + budget - 7.0
    with open(os.path.join(home, "mom_priv", "config"), "w") as f:
        f.write("$prologalarm 25\n")
    with pytest.raises(SiteError, match="no time left to boot a VM within "
                                        r"\$prologalarm \(25 s\)"):
        prologue_step.deadline(cfg, home, used=0.0)


EPI_ARGV = ["9.testhost", "root", "root", "job", "0", "", "", "batch", "", "-2", "/x.SC"]


def test_epilogue_without_state_exits_at_once(site):
    config, home = site
    r = run_step("epilogue", EPI_ARGV, config, home)
    assert result(r) == {"rc": 0, "heavy": []}


def test_epilogue_with_stdout_and_stderr_closed(site, tmp_path):
    config, home = site
    code = ("import os, sys\n"
            "from vmwn.torque.hooks import epilogue as m\n"
            f"rc = m.main(sys.argv, config_path={config!r}, pbs_home={home!r})\n"
            "fd = os.open(os.devnull, os.O_RDONLY)\n"
            f"open({str(tmp_path / 'out')!r}, 'w').write(f'{{rc}} {{fd}}')\n")
    r = subprocess.run([VENV_PY, "-Es", "-c", code, *EPI_ARGV], cwd=REPO, env=MINIMAL_ENV,
                       stdin=subprocess.DEVNULL, preexec_fn=lambda: (os.close(1), os.close(2)))
    assert r.returncode == 0
    rc, fd = (tmp_path / "out").read_text().split()
    assert rc == "0" and int(fd) > 2   # fds 1 and 2 were reopened onto /dev/null first


def test_epilogue_bad_argv_still_exits_0(site):
    config, home = site
    r = run_step("epilogue", ["1.h", "u"], config, home)
    assert result(r)["rc"] == 0 and "epilogue" in r.stderr


def test_ensure_std_fds_fills_closed_descriptors():
    code = ("import os\nfrom vmwn.torque.hooks import ensure_std_fds\nensure_std_fds()\n"
            "fd = os.open('/dev/null', os.O_RDONLY)\nos.write(2, b'')\n"
            "raise SystemExit(0 if fd > 2 else 1)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO,
                       preexec_fn=lambda: (os.close(0), os.close(1), os.close(2)))
    assert r.returncode == 0
