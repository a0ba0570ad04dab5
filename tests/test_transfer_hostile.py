"""The copy path against trees real users make (in-process SFTP server, real files).

Names that are not UTF-8 at several depths, thousands of directories under a
small descriptor limit, a tree deeper than Python's recursion limit, big
sparse files, the job's umask, a harvest cut by its time budget: each either
comes back byte-identical or is named in a problem while the rest comes back.
The same trees through a real guest and the real Torque are in test_torque.py.
"""

import os
import resource
import stat
import sys
import time

import pytest

from vmwn import transfer

from test_transfer_guestd import (connect, control_dir, guestd,  # noqa: F401 - fixture
                                  stage_in, write_manifest)

LATIN1 = b"r\xe9sultat"  # what any Latin-1 tool writes


def _pull(guestd, tmp_path, gdir, host, **kw):
    g = connect(guestd, tmp_path)
    try:
        sftp = g.sftp()
        try:
            return transfer.pull(g, sftp, gdir, host, 1 << 40, **kw)
        finally:
            sftp.close()
    finally:
        g.close()


def _files(root):
    """{relative path as bytes: content} of every regular file below root."""
    out = {}
    for dirpath, _, files in os.walk(os.fsencode(root)):
        for n in files:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, os.fsencode(root))] = f.read()
    return out


@pytest.fixture
def dirs(tmp_path):
    g = tmp_path / "guest" / "work"
    h = tmp_path / "host"
    g.mkdir(parents=True)
    h.mkdir()
    return str(g), str(h)


def test_names_that_are_not_utf8_come_back_byte_identical(guestd, tmp_path, dirs):
    gdir, host = dirs
    g = os.fsencode(gdir)
    os.makedirs(os.path.join(g, LATIN1, b"sub", LATIN1))
    for rel in (LATIN1 + b".txt", os.path.join(LATIN1, b"a"),
                os.path.join(LATIN1, b"sub", LATIN1, LATIN1 + b"\xff\xfe")):
        with open(os.path.join(g, rel), "wb") as f:
            f.write(rel)
    with open(os.path.join(g, b"plain.txt"), "wb") as f:
        f.write(b"plain")
    res = _pull(guestd, tmp_path, gdir, host)
    assert res.problems == []
    assert _files(host) == _files(gdir)
    assert res.files == 4


def test_thousands_of_directories_under_a_small_descriptor_limit(guestd, tmp_path, dirs):
    gdir, host = dirs
    for i in range(1500):
        d = os.path.join(gdir, f"d{i:04}")
        os.mkdir(d)
        with open(os.path.join(d, "out"), "w") as f:
            f.write(str(i))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # 1500 open dirs would fail
    try:
        res = _pull(guestd, tmp_path, gdir, host)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert res.problems == [] and res.files == 1500
    assert _files(host) == _files(gdir)


def _remove_chain(root, depth):
    """Remove root/d/d/.../d (``depth`` levels, files at the bottom) without recursion."""
    fds = [os.open(root, os.O_RDONLY)]
    for _ in range(depth):
        try:
            fds.append(os.open("d", os.O_RDONLY, dir_fd=fds[-1]))
        except FileNotFoundError:
            break
    while len(fds) > 1:
        fd = fds.pop()
        for n in os.listdir(fd):
            os.unlink(n, dir_fd=fd)
        os.close(fd)
        os.rmdir("d", dir_fd=fds[-1])
    os.close(fds[0])


@pytest.fixture
def deep():
    made = []
    yield made
    for root, depth in made:
        _remove_chain(root, depth)


def test_a_tree_deeper_than_the_recursion_limit(guestd, tmp_path, dirs, deep):
    gdir, host = dirs
    depth = sys.getrecursionlimit() + 100
    deep += [(gdir, depth), (host, depth)]
    fd = os.open(gdir, os.O_RDONLY)
    for _ in range(depth):  # relative steps: the absolute path exceeds PATH_MAX
        os.mkdir("d", dir_fd=fd)
        nfd = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    leaf = os.open("leaf.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(leaf, b"bottom")
    os.close(leaf)
    os.close(fd)
    rel = "/".join(["d"] * depth) + "/leaf.txt"
    res = _pull(guestd, tmp_path, gdir, host)
    if res.files == 1:
        hfd = os.open(host, os.O_RDONLY)
        for _ in range(depth):
            nfd = os.open("d", os.O_RDONLY, dir_fd=hfd)
            os.close(hfd)
            hfd = nfd
        with os.fdopen(os.open("leaf.txt", os.O_RDONLY, dir_fd=hfd), "rb") as f:
            assert f.read() == b"bottom"
        os.close(hfd)
    else:  # the SFTP server cannot open a path that long: reported by name, not a crash
        assert res.files == 0 and res.problems, res
        assert len(rel) > os.pathconf(gdir, "PC_PATH_MAX")


def test_a_big_sparse_file_stays_sparse(guestd, tmp_path, dirs):
    gdir, host = dirs
    size = 1 << 30
    with open(os.path.join(gdir, "sparse.img"), "wb") as f:
        f.write(b"head")
        f.seek(size - 4)
        f.write(b"tail")
    res = _pull(guestd, tmp_path, gdir, host)
    assert res.problems == [] and res.files == 1
    st = os.stat(os.path.join(host, "sparse.img"))
    assert st.st_size == size
    assert st.st_blocks * 512 < 16 << 20  # written as holes, not a gigabyte of zeros
    with open(os.path.join(host, "sparse.img"), "rb") as f:
        assert f.read(4) == b"head"
        f.seek(size - 4)
        assert f.read() == b"tail"


def test_the_jobs_umask_applies_to_what_comes_back(guestd, tmp_path, dirs):
    gdir, host = dirs
    write_manifest(control_dir(guestd), {"files": {}, "dirs": [], "umask": 0o077})
    os.mkdir(os.path.join(gdir, "open"))
    os.chmod(os.path.join(gdir, "open"), 0o777)
    with open(os.path.join(gdir, "open", "f"), "w") as f:
        f.write("x")
    os.chmod(os.path.join(gdir, "open", "f"), 0o666)
    res = _pull(guestd, tmp_path, gdir, host)
    assert res.problems == []
    assert stat.S_IMODE(os.stat(os.path.join(host, "open")).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(os.path.join(host, "open", "f")).st_mode) == 0o600


def test_a_harvest_cut_by_its_budget_says_so_and_leaves_no_temporary_files(
        guestd, tmp_path, dirs):
    gdir, host = dirs
    for i in range(20000):
        with open(os.path.join(gdir, f"f{i:05}"), "w") as f:
            f.write("x" * 100)
    res = _pull(guestd, tmp_path, gdir, host, deadline=time.monotonic() + 0.2, budget=0.2)
    assert res.out_of_time
    assert res.files < 20000
    text = " ".join(res.problems)
    assert "time budget of 0 s" in text and "hook alarm" in text and "hung" not in text
    assert not [n for n in os.listdir(host) if n.endswith(".tmp")]
    assert all(os.path.getsize(os.path.join(host, n)) == 100 for n in os.listdir(host))


def test_stage_in_takes_names_that_are_not_utf8(guestd, tmp_path, dirs):
    gdir, host = dirs
    h = os.fsencode(host)
    os.makedirs(os.path.join(h, LATIN1))
    with open(os.path.join(h, LATIN1, LATIN1), "wb") as f:
        f.write(b"in")
    g = connect(guestd, tmp_path)
    try:
        res = stage_in(guestd, g, host, gdir, 1 << 20)
    finally:
        g.close()
    assert res.skipped == [] and res.files == 1
    assert _files(gdir) == _files(host)


def test_a_file_the_job_was_given_keeps_its_mode_a_new_one_gets_the_umask(guestd, tmp_path, dirs):
    gdir, host = dirs
    with open(os.path.join(host, "given.txt"), "w") as f:
        f.write("in\n")
    os.chmod(os.path.join(host, "given.txt"), 0o644)
    os.symlink("given.txt", os.path.join(host, "given-link"))
    g = connect(guestd, tmp_path)
    try:
        res = stage_in(guestd, g, host, gdir, 1 << 20, umask=0o077)
    finally:
        g.close()
    with open(os.path.join(gdir, "given.txt"), "a") as f:  # the job appends
        f.write("more\n")
    os.utime(os.path.join(gdir, "given.txt"), (2000000000, 2000000000))
    with open(os.path.join(gdir, "new.txt"), "w") as f:
        f.write("new\n")
    os.chmod(os.path.join(gdir, "new.txt"), 0o644)
    os.symlink("/etc/passwd", os.path.join(gdir, "new-link"))
    res = _pull(guestd, tmp_path, gdir, host)
    assert stat.S_IMODE(os.stat(os.path.join(host, "given.txt")).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(os.path.join(host, "new.txt")).st_mode) == 0o600
    assert res.problems == ["new-link: a symlink in the guest; not copied back"], res.problems


def test_a_working_directory_the_user_cannot_read_fails_the_job_before_it_runs(
        guestd, tmp_path, test_user, world_tmp):
    host = os.path.join(world_tmp, "noaccess")  # reachable, but mode 000
    os.mkdir(host, 0o000)
    os.chown(host, test_user.pw_uid, test_user.pw_gid)
    g = connect(guestd, tmp_path)
    try:
        pid = os.fork()
        if pid == 0:  # as the job user, who cannot read it (root could)
            code = 1
            try:
                os.setgid(test_user.pw_gid)
                os.setuid(test_user.pw_uid)
                transfer.scan_host(host, 1 << 20)
            except transfer.UserError as e:
                code = 0 if ("cannot read the job's working directory" in e.problem
                             and "Permission denied" in e.problem) else 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        os.chmod(host, 0o755)
        g.close()
