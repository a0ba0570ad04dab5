"""``vmwn check --boot ENV``: one VM booted as a job's, with the node's own configuration.

The integration tests boot the bundled tiny guest with the shipped
``etc/vmwn.conf`` (data = mounted, the default), with the same file set to
``data = copy``, and through ``make check`` in a copy of the source tree as a
fresh clone has it; failures are injected after the boot and as a SIGTERM, and
every test then looks for anything the check left behind.  The unit tests
cover who the check runs as and the failures that come before any VM.
"""

import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

from vmwn import cli, config, errors
from vmwn.commands import bootcheck
from vmwn_testlib import needs_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(REPO, "etc", "vmwn.conf")
VMWN = os.path.join(os.path.dirname(sys.executable), "vmwn")
HEADER = re.compile(r"^boot tiny: job (\S+), data = (mounted|copy), as (\S+) .*, working "
                    r"directory (\S+) \(0700\)$", re.M)
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


# ------------------------------------------------------------------ unit tests

def test_the_default_user_is_a_dedicated_one_with_ids_no_account_has():
    import grp
    import pwd
    try:
        pwd.getpwnam(bootcheck.CHECK_USER)
        pytest.skip(f"this node has an account {bootcheck.CHECK_USER}")
    except KeyError:
        pass
    who = bootcheck.identity()
    assert (who.user, who.group, who.account) == ("vmwncheck", "vmwncheck", False)
    assert who.uid == who.gid and who.uid > 0
    with pytest.raises(KeyError):
        pwd.getpwuid(who.uid)
    with pytest.raises(KeyError):
        grp.getgrgid(who.gid)


def test_an_id_some_account_has_is_skipped(monkeypatch):
    import pwd
    taken = pwd.getpwnam("nobody").pw_uid
    monkeypatch.setattr(bootcheck, "CHECK_UID", taken)
    monkeypatch.setattr(bootcheck, "CHECK_USER", "vmwn-no-such-account")
    assert bootcheck.identity().uid < taken


def test_user_names_an_existing_unprivileged_account():
    import pwd
    nobody = pwd.getpwnam("nobody")
    who = bootcheck.identity("nobody")
    assert (who.user, who.uid, who.gid, who.account) == ("nobody", nobody.pw_uid,
                                                         nobody.pw_gid, True)
    with pytest.raises(errors.SiteError, match=r"--user vmwn-no-such-account: no such "
                                               r"account on this node: name an existing"):
        bootcheck.identity("vmwn-no-such-account")
    with pytest.raises(errors.SiteError, match="--user root: .*unprivileged user.*: name an"):
        bootcheck.identity("root")


def test_user_and_dir_only_with_boot(capsys):
    rc = cli.main(["--config", SHIPPED, "check", "--user", "nobody"])
    err = capsys.readouterr().err
    assert rc == errors.exit_code("cli", errors.UserError("x"))
    assert err == "vmwn check: --user and --dir apply to the boot check: add --boot ENV\n"


def test_without_root_one_line_and_nothing_made(monkeypatch):
    cfg = config.load(SHIPPED)
    monkeypatch.setattr(bootcheck.os, "geteuid", lambda: 1000)
    problems = bootcheck.run(cfg, cfg.env("tiny"), bootcheck.identity(), say=pytest.fail)
    assert problems == ["boot tiny: booting a VM as a job's needs root, as the prologue has: "
                        "run 'vmwn check --boot tiny' as root"]


@root_only
def test_a_dir_the_user_cannot_search_fails_before_any_vm_and_leaves_nothing():
    cfg = config.load(SHIPPED)
    parent = tempfile.mkdtemp(prefix="vmwn-test-")  # root's, 0700
    lines = []
    try:
        problems = bootcheck.run(cfg, cfg.env("tiny"), bootcheck.identity(), parent=parent,
                                 say=lines.append)
        assert os.listdir(parent) == []
    finally:
        shutil.rmtree(parent)
    assert len(problems) == 1, problems
    assert re.fullmatch(r"boot tiny: the check's user cannot use its working directory "
                        + re.escape(parent) + r"/vmwn-check-\w+ \(Permission denied\): "
                        r"choose a --dir every user can search", problems[0]), problems
    assert any(line.endswith("(0700)") for line in lines), lines


@root_only
def test_a_missing_dir_is_one_line():
    cfg = config.load(SHIPPED)
    lines = []
    problems = bootcheck.run(cfg, cfg.env("tiny"), bootcheck.identity(),
                             parent="/nonexistent/vmwn", say=lines.append)
    assert [ln for ln in lines if not ln.startswith("phase ")] == []
    assert problems == ["boot tiny: cannot make the check's working directory in "
                        "/nonexistent/vmwn: No such file or directory: choose another --dir"]


@root_only
def test_the_working_directory_is_the_users_alone():
    who = bootcheck.identity()
    d = bootcheck._private_dir("/tmp", who)
    try:
        st = os.lstat(d)
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (who.uid, who.gid, 0o700)
    finally:
        bootcheck._remove_tree(d)
    assert not os.path.lexists(d)


# ------------------------------------------------------------ integration tests

def _copy_config(tmp_dir):
    """The shipped configuration with data = copy for tiny."""
    with open(SHIPPED, encoding="utf-8") as f:
        text = f.read()
    assert "\n[env tiny]\n" in text and "data =" not in text
    path = os.path.join(tmp_dir, "vmwn.conf")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.replace("\n[env tiny]\n", "\n[env tiny]\ndata = copy\n"))
    return path


def _nothing_left(cfg, out):
    """The check's header names its job and working directory: none of it may remain."""
    m = HEADER.search(out)
    assert m, out
    job_id, workdir = m.group(1), m.group(4)
    made = bootcheck._Made(job_id=job_id, workdir=workdir, created=True)
    assert bootcheck.leftovers(cfg, made) == []
    assert not glob.glob(os.path.join(cfg.site["state_dir"], ".check-*"))
    assert not os.path.lexists(workdir)
    return m


@pytest.mark.integration
@needs_image("tiny")
@pytest.mark.parametrize("data", ["mounted", "copy"])
def test_check_boot_tiny_with_the_shipped_configuration(data, tmp_path):
    conf = SHIPPED if data == "mounted" else _copy_config(str(tmp_path))
    r = subprocess.run([VMWN, "--config", conf, "check", "--boot", "tiny"],
                       capture_output=True, text=True, timeout=600)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert "Traceback" not in r.stderr and "problem:" not in r.stderr, r.stderr
    m = _nothing_left(config.load(conf), out)
    assert m.group(2) == data and m.group(3) == "vmwncheck"
    workdir = m.group(4)
    assert os.path.dirname(workdir) == "/tmp"
    assert re.search(r"^ssh: the guest presented its pinned host key \(SHA256:\S+\) and "
                     r"took the job's key as vmwncheck: ok$", out, re.M), out
    assert re.search(r"^guest: uid=\d+\(vmwncheck\) gid=\d+\(vmwncheck\)", out, re.M), out
    if data == "mounted":
        assert f"\nshare: {workdir} mounted in the guest at the same path: ok\n" in out
    else:
        assert f"\ncopy: {workdir} staged into the guest at the same path: ok\n" in out
        assert "\nphase harvest " in out
    assert re.search(r"^files: the host's file read in the guest, the guest's file on the "
                     r"host \((at once|harvested)\) owned by vmwncheck:vmwncheck: ok$",
                     out, re.M), out
    assert out.rstrip().endswith("left: ok\nall checks passed"), out


@pytest.fixture
def shipped_check(monkeypatch, capsys):
    """Runs 'vmwn check --boot tiny' with the shipped configuration in this process,
    with lifecycle.create replaced by ``wrap(real_create)``; (exit code, out, err)."""
    from vmwn import lifecycle

    def run(wrap):
        monkeypatch.setattr(lifecycle, "create", wrap(lifecycle.create))
        rc = cli.main(["--config", SHIPPED, "check", "--boot", "tiny"])
        out, err = capsys.readouterr()
        return rc, out, err
    return run


@pytest.mark.integration
@needs_image("tiny")
def test_a_failure_after_the_boot_is_one_line_and_leaves_nothing(shipped_check):
    seen = {}

    def wrap(real):
        def create(cfg, spec, *a, **kw):
            st = real(cfg, spec, *a, **kw)
            seen["shares"] = [s["pid"] for s in st.shares]
            assert seen["shares"] and all(os.path.exists(f"/proc/{p}") for p in seen["shares"])
            raise RuntimeError("injected after the boot")
        return create
    rc, out, err = shipped_check(wrap)
    assert rc == errors.exit_code("cli", errors.SiteError("x")), out + err
    assert "Traceback" not in err
    problems = [line for line in err.splitlines() if line.startswith("problem:")]
    assert problems == ["problem: boot tiny: internal error (RuntimeError: injected after the "
                        "boot); run with -v for details"], err
    _nothing_left(config.load(SHIPPED), out)
    assert not [p for p in seen["shares"] if os.path.exists(f"/proc/{p}")]


@pytest.mark.integration
@needs_image("tiny")
def test_sigterm_after_the_boot_tears_down_and_says_interrupted(shipped_check):
    def wrap(real):
        def create(cfg, spec, *a, **kw):
            st = real(cfg, spec, *a, **kw)
            os.kill(os.getpid(), signal.SIGTERM)  # noted, acted on at the next waiting point
            return st
        return create
    rc, out, err = shipped_check(wrap)
    assert rc == 130, out + err
    assert err.splitlines()[-1] == "vmwn check: interrupted", err
    assert "Traceback" not in err and "problem:" not in err, err
    _nothing_left(config.load(SHIPPED), out)


@pytest.mark.integration
@needs_image("tiny")
def test_make_check_in_a_fresh_tree(tmp_path):
    """'make check' as a fresh clone runs it: the tree's files (committed or not, but
    nothing git ignores) and its default configuration; the venv is the checkout's."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    tree = tmp_path / "vmwn"
    for rel in filter(None, files):
        src = os.path.join(REPO, rel)
        if os.path.lexists(src):  # deleted in the work tree, not yet in the index
            os.makedirs(os.path.dirname(tree / rel), exist_ok=True)
            shutil.copy2(src, tree / rel, follow_symlinks=False)
    venv = os.path.dirname(os.path.dirname(sys.executable))
    installed = os.path.join(venv, ".installed")
    assert os.path.exists(installed), "make venv first"
    # -o: the venv is this checkout's; make must not reinstall it from the copy.
    r = subprocess.run(["make", "-C", str(tree), "check", f"VENV={venv}", "-o", installed],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"--config {tree}/etc/vmwn.conf check --boot tiny" in r.stdout, r.stdout
    assert "data = mounted" in r.stdout and "all checks passed" in r.stdout, r.stdout
    _nothing_left(config.load(str(tree / "etc" / "vmwn.conf")), r.stdout)
