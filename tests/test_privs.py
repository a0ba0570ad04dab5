"""Dropping to the job user in a forked child, with a real unprivileged user."""

import grp
import os
import shutil
import signal
import tempfile
import time

import pytest

from vmwn import errors, privs

from conftest import account_or_skip

USER = "vmwntest"
GROUP2 = "vmwntest2"


@pytest.fixture(scope="session")
def unpriv():
    """(name, uid, gid, extra gid) of a real unprivileged user (scripts/test-accounts)."""
    pw = account_or_skip(USER)
    try:
        extra = grp.getgrnam(GROUP2)
    except KeyError:
        pytest.skip(f"no group {GROUP2}: run scripts/test-accounts (make test does)")
    if USER not in extra.gr_mem:
        pytest.skip(f"{USER} is not in {GROUP2}: run scripts/test-accounts (make test does)")
    return USER, pw.pw_uid, pw.pw_gid, extra.gr_gid


@pytest.fixture
def open_tmp():
    """A temporary directory the unprivileged user can traverse (pytest's is root-only)."""
    d = tempfile.mkdtemp(prefix="vmwn-test-")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _ids():
    return {"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(),
            "egid": os.getegid(), "groups": sorted(os.getgroups())}


def test_child_runs_with_users_ids_and_groups(unpriv):
    name, uid, gid, extra = unpriv
    got = privs.run_as(name, uid, gid, _ids)
    assert got == {"uid": uid, "euid": uid, "gid": gid, "egid": gid,
                   "groups": sorted({gid, extra})}
    assert os.geteuid() == 0  # the parent is untouched


def _try_root():
    try:
        os.setuid(0)
    except PermissionError:
        return "refused"
    return "became root"


def test_drop_is_irrevocable(unpriv):
    name, uid, gid, _ = unpriv
    assert privs.run_as(name, uid, gid, _try_root) == "refused"


def _write(path):
    with open(path, "w") as f:
        f.write("x")
    return os.stat(path).st_uid


def test_files_are_written_with_users_rights(unpriv, open_tmp):
    import pathlib
    tmp_path = pathlib.Path(open_tmp)
    name, uid, gid, _ = unpriv
    mine = tmp_path / "users"
    mine.mkdir()
    os.chown(mine, uid, gid)
    assert privs.run_as(name, uid, gid, _write, str(mine / "f")) == uid
    rootdir = tmp_path / "roots"
    rootdir.mkdir(mode=0o755)
    with pytest.raises(errors.SiteError, match="PermissionError"):
        privs.run_as(name, uid, gid, _write, str(rootdir / "f"))
    assert not (rootdir / "f").exists()


def _raise(cls_name):
    raise getattr(errors, cls_name)("the problem", "the fix")


@pytest.mark.parametrize("cls", ["UserError", "SiteError", "TransientError", "GuestLost"])
def test_vmwn_errors_come_back_as_the_same_class(unpriv, cls):
    name, uid, gid, _ = unpriv
    with pytest.raises(getattr(errors, cls)) as ei:
        privs.run_as(name, uid, gid, _raise, cls)
    assert type(ei.value) is getattr(errors, cls)
    assert str(ei.value) == "the problem: the fix"


def _sleep(n, tmp):
    """Record the pid, sleep, then leave a mark that only a child allowed to finish leaves."""
    with open(os.path.join(tmp, "pid"), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(n)
    with open(os.path.join(tmp, "woke"), "w") as f:
        f.write("woke")
    return "woke"


def assert_killed_and_reaped(tmp):
    pid = int(open(os.path.join(tmp, "pid")).read())
    assert not os.path.exists(os.path.join(tmp, "woke"))   # its sleep never ended
    assert not os.path.exists(f"/proc/{pid}")               # gone, not even a zombie


def test_timeout_kills_the_child(unpriv, open_tmp):
    name, uid, gid, _ = unpriv
    os.chown(open_tmp, uid, gid)
    with pytest.raises(errors.TransientError, match="did not finish"):
        privs.run_as(name, uid, gid, _sleep, 20, open_tmp, timeout=0.5)
    assert_killed_and_reaped(open_tmp)


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("exc", [Interrupted, KeyboardInterrupt])
def test_interrupted_parent_kills_and_reaps_the_child(unpriv, open_tmp, exc):
    name, uid, gid, _ = unpriv
    os.chown(open_tmp, uid, gid)
    pidfile = os.path.join(open_tmp, "pid")

    def on_alarm(signum, frame):
        if not os.path.exists(pidfile):       # interrupt only once the child is at work
            signal.setitimer(signal.ITIMER_REAL, 0.05)
            return
        raise exc()
    old = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(exc):
            privs.run_as(name, uid, gid, _sleep, 20, open_tmp)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert_killed_and_reaped(open_tmp)


def _die():
    os._exit(3)


def test_silent_death_is_reported(unpriv):
    name, uid, gid, _ = unpriv
    with pytest.raises(errors.SiteError, match="without a result"):
        privs.run_as(name, uid, gid, _die)
