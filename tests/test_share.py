"""The mounted data path's host side: which directories, and a virtiofsd with the
job user's rights only (real virtiofsd, real user namespace; no guest needed)."""

import grp
import os
import pwd
import shutil
import socket
import tempfile
import time
import types

import pytest

from vmwn import config, lifecycle, share, state
from vmwn.errors import SiteError, UserError
from vmwn.spec import JobSpec
from vmwn.ssh import Guest
from vmwn.usage import start_time, stat_fields
from hostile_tree import command as tree_command, problems
from vmwn_testlib import (RUST_VIRTIOFSD, TINY, VIRTIOFSD_KINDS, leftovers, needs_image,
                          qemu_reachable_dir, virtiofsd_or_skip, wait_until, write_config)

HAVE_VIRTIOFSD = any(os.access(p, os.X_OK) for p in share.CANDIDATES)


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
@pytest.mark.parametrize("daemon", VIRTIOFSD_KINDS)
def test_virtiofsd_runs_as_the_job_user_in_a_namespace_of_its_ids_only(job, daemon):
    st, d, mine = job
    kind = virtiofsd_or_skip(daemon, rust=daemon == RUST_VIRTIOFSD)
    shares = share.shares_for(d, [mine])
    share.start(st, shares, daemon)
    try:
        pid = shares[0].pid
        s = _status(pid)  # the host's view of its ids
        assert s["Uid"].split() == [str(st.uid)] * 4 and s["Gid"].split() == [str(st.gid)] * 4
        with open(f"/proc/{pid}/uid_map") as f:  # its own view: the job's ids, nothing else
            assert f.read().split() == [str(kind.inner(st.uid)), str(st.uid), "1"]
        with open(f"/proc/{pid}/gid_map") as f:
            assert f.read().split() == [str(kind.inner(st.gid)), str(st.gid), "1"]
        # The Rust daemon keeps the job user's groups (its namespace denies setgroups);
        # the C one drops them (CVE-2022-0358) and serves the primary group only.
        want = {str(g) for g in os.getgrouplist(st.user, st.gid)} if kind.rust else set()
        assert set(s["Groups"].split()) == want
        assert os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")
        # The Rust daemon sees the share at vmwn's mount point, in a namespace of its own.
        assert (os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")) == kind.rust
        sock = os.stat(shares[0].socket)
        assert (sock.st_uid, sock.st_mode & 0o777) == (st.uid, 0o600)  # the job's QEMU
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        assert share.serves(argv, shares[0])
        assert share._is_ours(shares[0])
    finally:
        share.stop(st, shares)
    assert not os.path.exists(f"/proc/{shares[0].pid}") or not share._is_ours(shares[0])
    assert not os.path.exists(shares[0].socket)
    assert not os.path.lexists(share.mount_point(shares[0]))


@pytest.mark.integration  # a real virtiofsd
@pytest.mark.skipif(os.geteuid() != 0 or not HAVE_VIRTIOFSD, reason="needs root and virtiofsd")
@pytest.mark.parametrize("daemon", VIRTIOFSD_KINDS)
def test_a_directory_the_user_cannot_enter_is_the_users_problem(job, daemon):
    st, d, _ = job
    virtiofsd_or_skip(daemon, rust=daemon == RUST_VIRTIOFSD)
    private = tempfile.mkdtemp(prefix="vmwn-share-root-", dir="/var/tmp")  # root's, 0700
    try:
        shares = share.shares_for(d, [private])
        with pytest.raises(UserError) as e:
            share.start(st, shares, daemon)
        assert private in e.value.problem and "Permission denied" in e.value.problem
        assert not os.path.exists(shares[0].socket)
        assert not os.path.lexists(share.mount_point(shares[0]))
    finally:
        os.rmdir(private)


@pytest.mark.integration  # a real virtiofsd
@pytest.mark.skipif(os.geteuid() != 0 or not HAVE_VIRTIOFSD, reason="needs root and virtiofsd")
def test_a_virtiofsd_that_exits_at_once_is_a_site_error(job):
    st, d, mine = job
    fake = os.path.join(d, "virtiofsd")  # the job user may run it
    with open(fake, "w") as f:
        f.write("#!/bin/sh\n[ \"$1\" = --version ] && { echo 'virtiofsd version 7.2.0'; exit 0; }\n"
                "echo 'fuse: unknown option(s)' >&2\nexit 1\n")
    os.chmod(fake, 0o755)
    with pytest.raises(SiteError) as e:
        share.start(st, share.shares_for(d, [mine]), virtiofsd=fake)
    assert "exited at once" in e.value.problem and "unknown option" in e.value.problem


@pytest.mark.integration  # a real virtiofsd
@pytest.mark.skipif(os.geteuid() != 0 or not HAVE_VIRTIOFSD, reason="needs root and virtiofsd")
@pytest.mark.parametrize("daemon", VIRTIOFSD_KINDS)
def test_stop_ends_a_virtiofsd_that_qemu_still_holds(job, daemon):
    """Once connected, virtiofsd closes its listening socket and ends only when its
    peer hangs up, in its own time: stop() must end it all the same (a fresh-machine
    check found the Rust daemon alive after its job's teardown)."""
    st, d, mine = job
    virtiofsd_or_skip(daemon, rust=daemon == RUST_VIRTIOFSD)
    shares = share.shares_for(d, [mine])
    share.start(st, shares, daemon)
    peer = socket.socket(socket.AF_UNIX)
    try:
        peer.connect(shares[0].socket)
        wait_until(lambda: share._socket_inode(shares[0].pid) != shares[0].inode, 10,
                   "virtiofsd to take the connection", interval=0.02)
        assert share.serving(d, [mine]) == [shares[0].pid]
        share.stop(st, shares)
        assert share.serving(d, [mine]) == []
        assert not share._is_ours(shares[0])
    finally:
        peer.close()
        share.stop(st, shares)


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
        wait_until(lambda: share._socket_inode(shares[0].pid) != shares[0].inode, 10,
                   "virtiofsd to take the connection", interval=0.02)
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


def test_readiness_is_virtiofsds_own_word_in_its_log_past_where_this_start_began(tmp_path):
    """A restarted share's virtiofsd appends to the same log: the earlier daemon's
    line does not count for the new one."""
    log = tmp_path / "vmwn0.log"
    log.write_bytes(b"[ID: 00000007] virtio_session_mount: " + share.WAITING + b"...\n")
    start = log.stat().st_size
    assert share._logged(str(log), 0, share.WAITING)
    assert not share._logged(str(log), start, share.WAITING)
    with open(log, "ab") as f:
        f.write(b"[INFO  virtiofsd] " + share.WAITING + b" on ...\n")  # the Rust daemon's
    assert share._logged(str(log), start, share.WAITING)
    assert not share._logged(str(tmp_path / "nosuch.log"), 0, share.WAITING)


def test_health_quotes_virtiofsds_reason_not_its_progress(tmp_path):
    sh = share.Share(path="/data", tag="vmwn0", socket=str(tmp_path / "fs0.sock"),
                     pid=2 ** 22 + 1)  # above any pid_max: no such process
    (tmp_path / "vmwn0.log").write_bytes(
        b"virtio_session_mount: Waiting for vhost-user socket connection...\n"
        b"virtio_session_mount: Received vhost-user socket connection\n"
        b"virtio_loop: Entry\nfv_panic: libvhost-user: Invalid vring_addr message\n"
        b"virtio_loop: Exit\n")
    assert share.health([sh]).endswith(
        "has exited (fv_panic: libvhost-user: Invalid vring_addr message)")


@pytest.mark.parametrize("rust", [False, True])
def test_each_daemon_is_known_by_what_it_serves(rust):
    d = share.Daemon(path="/x/virtiofsd", rust=rust, version="1")
    sh, other = share.shares_for("/var/lib/vmwn/jobs/1.x", ["/home/a,b/\udcff dir", "/home/a"])
    argv = [os.fsencode(a) for a in d.argv(sh, 1000, 100)]
    assert share.serves(argv, sh)
    assert not share.serves(argv, other)
    assert not share.serves([b"/usr/bin/other"] + argv[1:], sh)
    if rust:  # the path reaches no argv: the share is bound at vmwn's own name
        assert not any(b"/home/a" in a for a in argv)
        assert f"--shared-dir={share.mount_point(sh)}" in d.argv(sh, 1000, 100)


def test_the_rust_daemon_maps_the_guests_ids_to_its_root_and_refuses_every_other():
    sh = share.shares_for("/var/lib/vmwn/jobs/1.x", ["/w"])[0]
    argv = share.Daemon(path="/x", rust=True, version="1.13.2").argv(sh, 1000, 100)
    assert "--sandbox=chroot" in argv and "--cache=never" in argv
    assert [a for a in argv if a.startswith("--translate-uid")] == [
        "--translate-uid=map:1000:0:1", "--translate-uid=forbid-guest:0:1000",
        f"--translate-uid=forbid-guest:1001:{0xFFFFFFFE - 1000}"]
    assert "--translate-gid=map:100:0:1" in argv
    assert share.Daemon(path="/x", rust=True, version="1").inner(1000) == 0
    assert share.Daemon(path="/x", rust=False, version="7.2").inner(1000) == 1000


@pytest.mark.parametrize("said, rust, version", [
    ("virtiofsd version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright", False, "7.2.22"),
    ("virtiofsd 1.13.2\n", True, "1.13.2"),
])
def test_the_daemons_kind_is_read_from_its_version(tmp_path, said, rust, version):
    fake = tmp_path / "fsd"  # a unit test starts nothing named virtiofsd
    fake.write_text(f"#!/bin/sh\nprintf '{said}'\n")
    fake.chmod(0o755)
    d = share.daemon(str(fake))
    assert (d.path, d.rust, d.version) == (str(fake), rust, version)


def test_a_program_that_is_no_virtiofsd_or_none_at_all_is_a_site_error(tmp_path):
    fake = tmp_path / "fsd"  # a unit test starts nothing named virtiofsd
    fake.write_text("#!/bin/sh\necho 'usage: something else'\n")
    fake.chmod(0o755)
    with pytest.raises(SiteError) as e:
        share.daemon(str(fake))
    assert "no virtiofsd that vmwn knows" in e.value.problem and "[site] virtiofsd" in e.value.fix
    with pytest.raises(SiteError) as e:
        share.daemon(str(tmp_path / "nosuch"))
    assert e.value.problem == f"no virtiofsd at {tmp_path / 'nosuch'}"


MOUNTED_TINY = f"""
[env tiny]
description = tiny test guest, mounted mode
{TINY}boot_timeout = 120
"""


@pytest.mark.integration  # a real guest writes through each real virtiofsd
@needs_image("tiny")
@pytest.mark.parametrize("daemon", VIRTIOFSD_KINDS)
def test_each_virtiofsd_serves_a_hostile_tree_to_the_host_as_the_job_user(daemon, test_user):
    """A job submitted from its home writes names that are not UTF-8, 1200
    directories, a 300-deep tree, a sparse file, a symlink and a fifo through the
    daemon; the host has every byte at once, owned by the job's user.  The daemon
    that ``virtiofsd = auto`` picks here serves the rest of the suite's mounted jobs
    (the Torque suite's hostile tree among them): this test serves the other."""
    kind = virtiofsd_or_skip(daemon, rust=daemon == RUST_VIRTIOFSD)
    if os.path.realpath(kind.path) == os.path.realpath(share.daemon("auto").path):
        pytest.skip(f"{daemon} serves every mounted job of this suite ('auto')")
    base = qemu_reachable_dir()
    workdir = tempfile.mkdtemp(prefix="vmwn-share-tree-\udcff ", dir=test_user.pw_dir)
    os.chown(workdir, test_user.pw_uid, test_user.pw_gid)
    cfg = config.load(write_config(base, site_extra=f"virtiofsd = {daemon}", envs=MOUNTED_TINY))
    job = f"12.{os.getpid()}.{'rust' if daemon == RUST_VIRTIOFSD else 'c'}.share.test"
    env = cfg.env("tiny")
    try:
        spec = JobSpec(job_id=job, user=test_user.pw_name, uid=test_user.pw_uid,
                       gid=test_user.pw_gid, group=grp.getgrgid(test_user.pw_gid).gr_name,
                       job_name="tree", env=env, vcpus=1, memory_mib=env.memory_mib,
                       workdir=workdir, host_workdir=workdir)
        st = lifecycle.create(cfg, spec, time.monotonic() + 180)
        # This job's daemons by pid and start time: another lane's job may serve
        # the same home meanwhile, with a daemon whose command line is the same.
        daemons = [(s["pid"], s["started"]) for s in st.shares]
        assert daemons and all(pid and started for pid, started in daemons)
        try:
            with Guest.connect(st) as g:
                status, out, err = g.run(tree_command(workdir), timeout=600)
            assert (status, out) == (0, b"done-writing\n"), err
        finally:
            lifecycle.destroy(cfg, job)
        assert leftovers(cfg, job) == []
        assert share.serving(state.job_dir(cfg, job)) == []
        assert [d for d in daemons if _runs(*d)] == []
        o = os.path.join(os.fsencode(workdir), b"out")
        assert problems(o, test_user.pw_uid, test_user.pw_gid) == []
    finally:
        shutil.rmtree(os.fsencode(workdir), ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


def _runs(pid, started):
    """The process ``pid`` started at ``started`` still runs (not a zombie)."""
    fields = stat_fields(pid)
    return bool(fields) and fields[0] != "Z" and start_time(pid) == started


def test_a_share_whose_own_path_is_not_utf8_is_the_users_problem_named_readably():
    share.check_mountable(["/home/a", "/home/a/r\u00e9sum\u00e9"])  # UTF-8: fine
    with pytest.raises(UserError) as e:
        share.check_mountable(["/home/a", "/tmp/r\udce9sultat"])
    assert e.value.problem == ("/tmp/r\\xe9sultat cannot be mounted in the virtual machine: "
                               "its path is not UTF-8")
    assert "data = copy" in e.value.fix and "below your home" in e.value.fix


@pytest.mark.parametrize("rust", [False, True])
def test_a_jobs_daemons_are_known_by_its_directory_whatever_their_tags(rust):
    d = share.Daemon(path="/x/virtiofsd", rust=rust, version="1")
    home, work = share.shares_for("/var/lib/vmwn/jobs/1.x", ["/home/a", "/tmp/w"])
    argv = [os.fsencode(a) for a in d.argv(work, 1000, 100)]  # the second share: vmwn1
    assert share.serves(argv, path="/tmp/w", job_dir="/var/lib/vmwn/jobs/1.x")
    assert not share.serves(argv, path="/tmp/other", job_dir="/var/lib/vmwn/jobs/2.x")
