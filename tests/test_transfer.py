"""Stage-in and harvest semantics against the in-process guest (no VM)."""

import os
import stat

import pytest

from vmwn import transfer
from vmwn.errors import GuestLost, SiteError, UserError

from test_transfer_guestd import (connect, control_dir, guestd,  # noqa: F401 - fixture
                                  stage_in, write_manifest)


def _tree(root):
    """{relative path: (kind, mode, mtime, content-or-link)} of a directory, lstat-based."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", None, None, os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), int(st.st_mtime), None)
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    out[rel] = ("file", stat.S_IMODE(st.st_mode), int(st.st_mtime), f.read())
    return out


@pytest.fixture
def host_tree(tmp_path):
    h = tmp_path / "host" / "work"
    (h / "sub" / "deep").mkdir(parents=True)
    (h / "a.txt").write_bytes(b"alpha\n")
    (h / "bin.dat").write_bytes(bytes(range(256)) * 1000)
    (h / "sub" / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(h / "sub" / "run.sh", 0o750)
    (h / "sub" / "deep" / "empty").write_bytes(b"")
    os.symlink("a.txt", h / "rel-link")
    os.symlink("/etc/passwd", h / "abs-link")
    os.symlink("../../../outside", h / "sub" / "escape")
    os.mkfifo(h / "fifo")
    os.utime(h / "a.txt", (1000000000, 1000000000))
    os.utime(h / "sub", (1100000000, 1100000000))
    os.chmod(h / "sub" / "deep", 0o711)
    return str(h)


def test_stage_in_copies_files_dirs_links_with_modes_and_mtimes(guestd, tmp_path, host_tree):
    gdir = str(tmp_path / "guest" / "work")
    g = connect(guestd, tmp_path)
    try:
        res = stage_in(guestd, g, host_tree, gdir, 10 << 20)
    finally:
        g.close()
    def no_dir_times(tree):  # the guest's tar sets them (GNU) or not (busybox)
        return {k: (v[0], v[1], None, v[3]) if v[0] == "dir" else v for k, v in tree.items()}
    want = {k: v for k, v in _tree(host_tree).items() if k != "fifo"}
    assert no_dir_times(_tree(gdir)) == no_dir_times(want)
    # Symlinks keep their text and are not followed: no copy of /etc/passwd.
    assert os.readlink(os.path.join(gdir, "abs-link")) == "/etc/passwd"
    assert os.readlink(os.path.join(gdir, "sub", "escape")) == "../../../outside"
    assert not os.path.exists(tmp_path / "guest" / "outside")
    assert (res.files, res.links, res.dirs) == (4, 3, 2)
    assert res.bytes == 6 + 256000 + 18
    assert any(s.startswith("fifo:") for s in res.skipped)
    assert set(res.manifest["files"]) == {os.path.join(gdir, p) for p in
                                          ("a.txt", "bin.dat", "sub/run.sh", "sub/deep/empty")}
    assert res.manifest["files"][os.path.join(gdir, "a.txt")] == [6, 1000000000]


def test_stage_in_over_cap_copies_nothing(guestd, tmp_path, host_tree):
    gdir = str(tmp_path / "guest" / "work")
    g = connect(guestd, tmp_path)
    try:
        with pytest.raises(UserError, match="stage_in_max"):
            stage_in(guestd, g, host_tree, gdir, 1000)
    finally:
        g.close()
    assert not os.path.exists(gdir)


def test_stage_in_missing_workdir_is_users_problem(guestd, tmp_path):
    g = connect(guestd, tmp_path)
    try:
        with pytest.raises(UserError, match="working directory"):
            stage_in(guestd, g, str(tmp_path / "nope"), str(tmp_path / "g"), 1 << 20)
    finally:
        g.close()


def _stage_and_write_manifest(srv, g, host, gdir):
    stage_in(srv, g, host, gdir, 10 << 20)  # the manifest with it
    return g.sftp(), control_dir(srv)


def test_harvest_copies_new_and_changed_skips_unchanged(guestd, tmp_path, host_tree):
    gdir = str(tmp_path / "guest" / "work")
    g = connect(guestd, tmp_path)
    try:
        sftp, ctl = _stage_and_write_manifest(guestd, g, host_tree, gdir)
        # The job: a new file, a new directory tree, a changed file.
        with open(os.path.join(gdir, "result.out"), "wb") as f:
            f.write(b"\x00result\r\n")
        os.chmod(os.path.join(gdir, "result.out"), 0o4755)
        os.makedirs(os.path.join(gdir, "newdir", "inner"))
        with open(os.path.join(gdir, "newdir", "inner", "x"), "w") as f:
            f.write("x")
        with open(os.path.join(gdir, "a.txt"), "w") as f:
            f.write("changed\n")
        # Host side meanwhile: unchanged files get host edits that must survive.
        with open(os.path.join(host_tree, "bin.dat"), "wb") as f:
            f.write(b"host edit")
        os.utime(os.path.join(gdir, "result.out"), (1200000000, 1200000000))
        res = transfer.pull(g, sftp, gdir, host_tree, 1 << 30)
        sftp.close()
    finally:
        g.close()
    assert (res.files, res.unchanged, res.truncated, res.problems) == (3, 3, False, [])
    with open(os.path.join(host_tree, "result.out"), "rb") as f:
        assert f.read() == b"\x00result\r\n"
    st = os.stat(os.path.join(host_tree, "result.out"))
    assert stat.S_IMODE(st.st_mode) == 0o755  # set-id bits never come back
    assert int(st.st_mtime) == 1200000000
    with open(os.path.join(host_tree, "a.txt")) as f:
        assert f.read() == "changed\n"
    with open(os.path.join(host_tree, "newdir", "inner", "x")) as f:
        assert f.read() == "x"
    with open(os.path.join(host_tree, "bin.dat"), "rb") as f:
        assert f.read() == b"host edit"
    assert not any(".vmwn" in n for n in os.listdir(host_tree))
    assert not [n for n in os.listdir(host_tree) if n.endswith(".tmp")]


def test_harvest_never_copies_control_dir(guestd, tmp_path):
    host = tmp_path / "host"
    host.mkdir()
    g = connect(guestd, tmp_path)
    try:
        sftp = g.sftp()
        ctl = control_dir(guestd)
        with open(os.path.join(ctl, "job.sh"), "w") as f:
            f.write("secret script")
        with open(os.path.join(guestd.guest_home, "out.txt"), "w") as f:
            f.write("out")
        # The working directory is the guest home: ~/.vmwn lies inside it.
        res = transfer.pull(g, sftp, guestd.guest_home, str(host), 1 << 20)
        sftp.close()
    finally:
        g.close()
    assert sorted(os.listdir(host)) == ["out.txt"]
    assert res.files == 1


def test_harvest_does_not_follow_guest_symlinks(guestd, tmp_path):
    host = tmp_path / "host"
    host.mkdir()
    gdir = tmp_path / "guest" / "work"
    gdir.mkdir(parents=True)
    secret = tmp_path / "guest-secret"
    secret.write_text("guest system file")
    os.symlink(str(secret), gdir / "link-to-file")
    os.symlink(str(tmp_path), gdir / "link-to-dir")
    (gdir / "real").write_text("real")
    g = connect(guestd, tmp_path)
    try:
        sftp = g.sftp()
        res = transfer.pull(g, sftp, str(gdir), str(host), 1 << 20)
        sftp.close()
    finally:
        g.close()
    assert sorted(os.listdir(host)) == ["real"]
    assert res.files == 1


def test_harvest_never_writes_through_host_symlinks(guestd, tmp_path):
    host = tmp_path / "host"
    host.mkdir()
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir()
    victim = victim_dir / "file"
    victim.write_text("precious")
    os.symlink(str(victim), host / "out.txt")        # host file is a symlink
    os.symlink(str(victim_dir), host / "sub")         # host directory is a symlink
    gdir = tmp_path / "guest" / "work"
    (gdir / "sub").mkdir(parents=True)
    (gdir / "out.txt").write_text("job output")
    (gdir / "sub" / "file").write_text("job output")
    (gdir / "ok.txt").write_text("fine")
    g = connect(guestd, tmp_path)
    try:
        sftp = g.sftp()
        res = transfer.pull(g, sftp, str(gdir), str(host), 1 << 20)
        sftp.close()
    finally:
        g.close()
    assert victim.read_text() == "precious"
    assert sorted(os.listdir(victim_dir)) == ["file"]
    assert os.path.islink(host / "out.txt") and os.path.islink(host / "sub")
    assert (host / "ok.txt").read_text() == "fine"
    assert res.files == 1
    probs = " | ".join(res.problems)
    assert "out.txt: the host path is a symlink" in probs
    assert "sub" in probs and "not written through" in probs


def test_harvest_cap_truncates_and_protects_host(guestd, tmp_path):
    host = tmp_path / "host"
    host.mkdir()
    gdir = tmp_path / "guest" / "work"
    gdir.mkdir(parents=True)
    for name in ("a", "b", "c"):
        (gdir / name).write_bytes(b"z" * 4000)
    (gdir / "small").write_bytes(b"s")  # fits after the one that did not
    g = connect(guestd, tmp_path)
    try:
        sftp = g.sftp()
        res = transfer.pull(g, sftp, str(gdir), str(host), 9000)
        sftp.close()
    finally:
        g.close()
    assert res.truncated and res.files == 3 and res.bytes == 8001
    copied = sorted(os.listdir(host))
    left = ({"a", "b", "c"} - set(copied)).pop()
    assert "small" in copied and len(copied) == 3
    assert len(res.problems) == 1 and res.problems[0].startswith(f"{left}: ")
    assert "harvest_max" in res.problems[0]
    assert "left behind" in res.summary()


def test_manifest_round_trip(guestd, tmp_path):
    g = connect(guestd, tmp_path)
    try:
        sftp = g.sftp()
        ctl = control_dir(guestd)
        write_manifest(ctl, {"files": {"/w/a": [3, 7]}, "dirs": ["/w"], "umask": 0o027})
        assert transfer.read_manifest(sftp, ctl) == ({"/w/a": (3, 7)}, {"/w"}, 0o027)
        with open(os.path.join(ctl, "manifest.json"), "w") as f:
            f.write("{not json")
        assert transfer.read_manifest(sftp, ctl) == ({}, set(), transfer.DEFAULT_UMASK)
        sftp.close()
    finally:
        g.close()


def test_a_job_submitted_from_home_keeps_the_guests_key_both_ways(guestd, tmp_path):
    # PBS_O_WORKDIR is the user's home, which is the guest home's path too: the
    # user's own ~/.ssh/authorized_keys must not replace the per-job key (the
    # epilogue could not log in and the output would be lost), and the per-job
    # key must not come back into the user's real ~/.ssh.
    home = tmp_path / "host-home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "authorized_keys").write_text("ssh-ed25519 AAAAuser me@laptop\n")
    (home / ".ssh" / "config").write_text("Host x\n")
    (home / "data.txt").write_text("in\n")
    guest_keys = os.path.join(guestd.guest_home, ".ssh", "authorized_keys")
    os.makedirs(os.path.dirname(guest_keys), exist_ok=True)
    with open(guest_keys, "w") as f:
        f.write("ssh-ed25519 AAAAjob vmwn-job:1\n")
    g = connect(guestd, tmp_path)
    try:
        stage_in(guestd, g, str(home), guestd.guest_home, 10 << 20)
        sftp = g.sftp()
        with open(guest_keys) as f:
            assert f.read() == "ssh-ed25519 AAAAjob vmwn-job:1\n"
        with open(os.path.join(guestd.guest_home, ".ssh", "config")) as f:
            assert f.read() == "Host x\n"  # the rest of ~/.ssh is the user's to have
        with open(os.path.join(guestd.guest_home, "result.txt"), "w") as f:
            f.write("out\n")
        res = transfer.pull(g, sftp, guestd.guest_home, str(home), 1 << 20)
        sftp.close()
    finally:
        g.close()
    assert (home / "result.txt").read_text() == "out\n"
    assert (home / ".ssh" / "authorized_keys").read_text() == "ssh-ed25519 AAAAuser me@laptop\n"
    assert not (home / transfer.CONTROL).exists()
    assert res.problems == []


# ---------------------------------------------- preparing the guest: one command

def test_prepare_writes_the_control_files_and_answers_what_the_starter_asks(guestd, tmp_path):
    ctl = os.path.join(guestd.guest_home, ".vmwn")
    g = connect(guestd, tmp_path)
    try:
        files = [("job.sh", b"#!/bin/sh\necho hi\n", 0o700), ("job.env", b"export A=1\n", 0o600)]
        got = transfer.prepare(g, ctl, files, shell="/bin/sh", tmpdir=str(tmp_path),
                               mounts=True)
        other = transfer.prepare(g, ctl, [], shell="/no/such/shell", tmpdir="/no/such/dir")
    finally:
        g.close()
    assert stat.S_IMODE(os.stat(ctl).st_mode) == 0o700
    with open(os.path.join(ctl, "job.sh"), "rb") as f:
        assert f.read() == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE(os.stat(os.path.join(ctl, "job.sh")).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(os.path.join(ctl, "job.env")).st_mode) == 0o600
    assert (got.has_shell, got.has_tmpdir, got.staged) == (True, True, None)
    assert " /proc proc " in got.proc_mounts  # the guest's own mount table
    assert (other.has_shell, other.has_tmpdir, other.proc_mounts) == (False, False, "")
    # One guest command per preparation: no SFTP session, no second channel.
    assert len(guestd.commands) == 2


def test_a_working_directory_the_guest_cannot_make_is_the_users_to_change(
        guestd, tmp_path, host_tree):
    blocker = tmp_path / "guest-file"
    blocker.write_text("a file where the working directory's parent should be")
    g = connect(guestd, tmp_path)
    try:
        with pytest.raises(UserError) as e:
            stage_in(guestd, g, host_tree, str(blocker / "work"), 10 << 20)
    finally:
        g.close()
    assert f"cannot make the working directory {blocker}/work" in e.value.problem
    assert "qsub -d" in e.value.fix
    assert blocker.read_text().startswith("a file")


def test_a_control_directory_the_guest_cannot_make_is_the_sites_to_fix(guestd, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    (tmp_path / "host").mkdir()
    g = connect(guestd, tmp_path)
    try:
        with pytest.raises(SiteError, match="cannot make vmwn's directory") as e:
            # A working directory that could be made does not take the blame.
            transfer.prepare(g, str(blocker / ".vmwn"), [("job.sh", b"x", 0o700)],
                             workdir=str(tmp_path / "work"), host_dir=str(tmp_path / "host"),
                             max_bytes=1 << 20)
    finally:
        g.close()
    assert f"{blocker}/.vmwn" in e.value.problem and "image" in e.value.fix


def test_an_unpack_the_guest_refuses_loses_the_guest_with_tars_reason(guestd, tmp_path):
    ctl = os.path.join(guestd.guest_home, ".vmwn")
    os.makedirs(os.path.join(ctl, "job.sh", "full"))  # a directory where the script goes
    g = connect(guestd, tmp_path)
    try:
        with pytest.raises(GuestLost, match="preparing the job in the virtual machine "
                                            "failed: tar: ") as e:
            transfer.prepare(g, ctl, [("job.sh", b"echo hi\n", 0o700)])
    finally:
        g.close()
    assert "out of disk space" in e.value.fix
