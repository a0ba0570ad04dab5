"""The mounted data path's host side: which directories, and a virtiofsd with the
job user's rights only (real virtiofsd, real user namespace; no guest needed)."""

import os
import pwd
import shutil
import socket
import tempfile
import types

import pytest

from vmwn import share
from vmwn.errors import SiteError, UserError
from vmwn_testlib import wait_until

HAVE_VIRTIOFSD = os.access(share.VIRTIOFSD, os.X_OK)


def test_plan_mounts_parents_first_and_drops_what_another_covers(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    home = tmp_path / "home" / "alice"
    home.mkdir(parents=True)
    paths = share.plan(str(home / "run" / "1"), str(home),
                       [str(scratch), "/nonexistent-site-path", str(scratch / "..")])
    assert paths == [str(tmp_path)]  # home and scratch lie inside tmp_path
    assert share.plan("/srv/w", str(home), ()) == ["/srv/w", str(home)]
    assert share.plan("/srv/w", None, ()) == ["/srv/w"]
    assert share.plan("/srv/w", "/nonexistent-home", ()) == ["/srv/w"]
    assert share.plan("/", "/", ()) == []  # never the whole host


@pytest.mark.parametrize("path, escaped", [
    ("/home/a,b", "/home/a\\,b"),
    ("/data/x,sandbox=none", "/data/x\\,sandbox\\=none"),
    ("/p/back\\slash", "/p/back\\\\slash"),
    ("/p/0,123", "/p/0\\,123"),  # digits never follow a backslash (libfuse reads \\NNN)
    ("/w/ü€ space", "/w/ü€\\ space"),
])
def test_paths_reach_virtiofsds_option_parser_as_one_value(path, escaped):
    assert share.fuse_escape(path) == escaped


@pytest.fixture
def job(test_user):
    d = tempfile.mkdtemp(prefix="vmwn-share-", dir="/var/tmp")
    os.chmod(d, 0o711)
    mine = tempfile.mkdtemp(prefix="vmwn-share-data,x=1 ", dir=test_user.pw_dir)
    os.chown(mine, test_user.pw_uid, test_user.pw_gid)
    st = types.SimpleNamespace(job_id="1.share", user=test_user.pw_name, uid=test_user.pw_uid,
                               gid=test_user.pw_gid)
    yield st, d, mine
    shutil.rmtree(d, ignore_errors=True)
    shutil.rmtree(mine, ignore_errors=True)


def _status(pid):
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


@pytest.mark.integration  # a real virtiofsd
@pytest.mark.skipif(os.geteuid() != 0 or not HAVE_VIRTIOFSD, reason="needs root and virtiofsd")
def test_virtiofsd_runs_as_the_job_user_in_a_namespace_of_its_ids_only(job):
    st, d, mine = job
    shares = share.shares_for(d, [mine])
    share.start(st, shares)
    try:
        pid = shares[0].pid
        s = _status(pid)
        assert s["Uid"].split() == [str(st.uid)] * 4 and s["Gid"].split() == [str(st.gid)] * 4
        with open(f"/proc/{pid}/uid_map") as f:
            assert f.read().split() == [str(st.uid), str(st.uid), "1"]
        with open(f"/proc/{pid}/gid_map") as f:
            assert f.read().split() == [str(st.gid), str(st.gid), "1"]
        assert os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")
        sock = os.stat(shares[0].socket)
        assert (sock.st_uid, sock.st_mode & 0o777) == (st.uid, 0o600)  # the job's QEMU
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        assert b"source=" + os.fsencode(share.fuse_escape(mine)) in argv
        assert share._is_ours(shares[0])
    finally:
        share.stop(st, shares)
    assert not os.path.exists(f"/proc/{shares[0].pid}") or not share._is_ours(shares[0])
    assert not os.path.exists(shares[0].socket)


@pytest.mark.integration  # a real virtiofsd
@pytest.mark.skipif(os.geteuid() != 0 or not HAVE_VIRTIOFSD, reason="needs root and virtiofsd")
def test_a_directory_the_user_cannot_enter_is_the_users_problem(job):
    st, d, _ = job
    private = tempfile.mkdtemp(prefix="vmwn-share-root-", dir="/var/tmp")  # root's, 0700
    try:
        shares = share.shares_for(d, [private])
        with pytest.raises(UserError) as e:
            share.start(st, shares)
        assert private in e.value.problem and "Permission denied" in e.value.problem
        assert not os.path.exists(shares[0].socket)
    finally:
        os.rmdir(private)


@pytest.mark.integration  # a real virtiofsd
@pytest.mark.skipif(os.geteuid() != 0 or not HAVE_VIRTIOFSD, reason="needs root and virtiofsd")
def test_a_virtiofsd_that_exits_at_once_is_a_site_error(job):
    st, d, mine = job
    fake = os.path.join(d, "virtiofsd")  # the job user may run it
    with open(fake, "w") as f:
        f.write("#!/bin/sh\necho 'fuse: unknown option(s)' >&2\nexit 1\n")
    os.chmod(fake, 0o755)
    with pytest.raises(SiteError) as e:
        share.start(st, share.shares_for(d, [mine]), virtiofsd=fake)
    assert "exited at once" in e.value.problem and "unknown option" in e.value.problem


@pytest.mark.integration  # a real virtiofsd
@pytest.mark.skipif(os.geteuid() != 0 or not HAVE_VIRTIOFSD, reason="needs root and virtiofsd")
def test_health_says_what_became_of_a_virtiofsd_qemu_could_not_reach(job):
    """virtiofsd takes the first connection and closes its listener: whoever comes
    next (QEMU) is refused.  health() tells the three states apart for the log."""
    st, d, mine = job
    shares = share.shares_for(d, [mine])
    share.start(st, shares)
    try:
        assert share.health(shares) == f"virtiofsd {shares[0].pid} for {mine} waits on its socket"
        first = socket.socket(socket.AF_UNIX)
        first.connect(shares[0].socket)
        wait_until(lambda: not share._is_ours(shares[0]), 10, "virtiofsd to take the connection",
                   interval=0.02)
        late = socket.socket(socket.AF_UNIX)
        with pytest.raises(ConnectionRefusedError):
            late.connect(shares[0].socket)
        late.close()
        assert "runs (state" in share.health(shares) and "no longer on its socket" in \
            share.health(shares)
        first.close()  # virtiofsd ends with its only connection
        wait_until(lambda: "has exited" in share.health(shares), 10, "virtiofsd to exit",
                   interval=0.02)
    finally:
        share.stop(st, shares)


def test_health_of_a_virtiofsd_that_has_gone_quotes_its_log(tmp_path):
    sh = share.Share(path="/data", tag="vmwn0", socket=str(tmp_path / "fs0.sock"),
                     pid=2 ** 22 + 1)  # above any pid_max: no such process
    (tmp_path / "vmwn0.log").write_bytes(b"first\n[ID: 00000007] vhost socket accept: "
                                         b"Interrupted system call\n")
    assert share.health([sh]) == (f"virtiofsd {sh.pid} for /data has exited ([ID: 00000007] "
                                  "vhost socket accept: Interrupted system call)")
    (tmp_path / "vmwn0.log").unlink()
    assert share.health([sh]).endswith("has exited (its log is empty)")
