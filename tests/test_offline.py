"""Offline harvest: a dead guest's output read from its qcow2 overlay, never mounted.

Each test builds a real ext4 filesystem with ``mkfs.ext4 -d``, wraps it as a
qcow2 overlay on a qcow2 base (as the prologue does), and recovers from it as
root with the work done by the unprivileged test user.
"""

import json
import os
import shutil
import subprocess

import pytest

from conftest import write_site_config
from vmwn import config, errors, extfs, landlock, offline, privs, state

pytestmark = pytest.mark.skipif(
    not (shutil.which("mkfs.ext4") or os.path.exists("/usr/sbin/mkfs.ext4"))
    or not shutil.which("qemu-img"), reason="needs e2fsprogs and qemu-utils")

USER_HOME = "vmwntest"          # the user's home below the disk's root (guest /home/vmwntest)
OUT = f"/home/{USER_HOME}/job"  # the job's working directory in the guest
SPACE_NL = "sp ace\nnl.txt"
NON_UTF8 = os.fsdecode(b"caf\xe9.dat")
MTIME = 1_700_000_000


def _mkfs(tree, raw, label="vmwn-home", size="64M"):
    subprocess.run(["truncate", "-s", size, raw], check=True)
    args = ["mkfs.ext4", "-q", "-F", "-d", tree, raw]
    if label:
        args[3:3] = ["-L", label]
    subprocess.run(args, check=True, env={"PATH": "/usr/sbin:/sbin:/usr/bin:/bin"})


def _overlay(raw, where):
    """A qcow2 base made from ``raw`` and an empty qcow2 overlay on it, as the prologue makes."""
    base = os.path.join(where, "base.qcow2")
    ov = os.path.join(where, "job.qcow2")
    subprocess.run(["qemu-img", "convert", "-q", "-O", "qcow2", raw, base], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, ov],
                   check=True)
    os.unlink(raw)
    os.chmod(ov, 0o600)
    return ov


def _write(path, data, mtime=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    if mtime:
        os.utime(path, (mtime, mtime))


@pytest.fixture
def job(world_tmp, test_user):
    """A site config, a job state record and an empty host working directory."""
    conf = os.path.join(world_tmp, "etc", "vmwn.conf")

    def make(overlay, output_dir=OUT, harvest_max="10G"):
        if overlay and os.path.isfile(overlay):  # as lifecycle leaves it: the job user's
            os.chown(overlay, test_user.pw_uid, test_user.pw_gid)
        write_site_config(conf, world_tmp, extra_site=f"harvest_max = {harvest_max}")
        cfg = config.load(conf)
        host = os.path.join(world_tmp, "submit")
        os.makedirs(host, exist_ok=True)
        os.chown(host, test_user.pw_uid, test_user.pw_gid)
        st = state.JobState(
            job_id="77.offline.test", domain="vmwn-77", env="tiny", user=test_user.pw_name,
            uid=test_user.pw_uid, gid=test_user.pw_gid, group="vmwntest",
            bind_address="127.0.0.1", port=1, host_key_public="", key_path="",
            workdir=output_dir, host_workdir=host, output_dir=output_dir, overlay=overlay,
            seed="", console_log="", phase="running")
        state.save(cfg, st)
        return cfg, st
    return make


def _home_disk(world_tmp, extra=None):
    """The tiny guest's /home disk after a job wrote output and then the VM died."""
    tree = os.path.join(world_tmp, "fs")
    job = os.path.join(tree, USER_HOME, "job")
    _write(os.path.join(job, "result.txt"), b"the answer is 42\n")
    _write(os.path.join(job, "sub", "deep", "data.bin"), bytes(range(256)) * 40)
    _write(os.path.join(job, SPACE_NL), b"spaces and a newline\n")
    _write(os.path.join(job, NON_UTF8), b"latin-1 name\n")
    _write(os.path.join(job, "staged.in"), b"staged, unchanged\n", MTIME)
    _write(os.path.join(job, "changed.in"), b"staged, then changed by the job\n")
    _write(os.path.join(job, "victim.txt"), b"guest content\n")
    os.symlink("/etc/passwd", os.path.join(job, "passwd-link"))
    os.mkfifo(os.path.join(job, "a-fifo"))
    manifest = {"files": {f"{OUT}/staged.in": [18, MTIME], f"{OUT}/changed.in": [5, MTIME]},
                "dirs": []}
    _write(os.path.join(tree, USER_HOME, ".vmwn", "manifest.json"),
           json.dumps(manifest).encode())
    _write(os.path.join(tree, USER_HOME, ".vmwn", "job.sh"), b"#!/bin/sh\n")
    for rel, data in (extra or {}).items():
        _write(os.path.join(job, rel), data)
    raw = os.path.join(world_tmp, "disk.raw")
    _mkfs(tree, raw)
    shutil.rmtree(tree)
    return _overlay(raw, world_tmp)


def _files(top):
    out = {}
    for dirpath, dirs, files in os.walk(top):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, top)] = os.lstat(p)
    return out


def test_recovers_new_and_changed_files_as_the_user_and_never_follows_symlinks(
        world_tmp, job, test_user):
    cfg, st = job(_home_disk(world_tmp))
    # A root-owned file the job must not reach through a symlink planted on the host.
    secret = os.path.join(world_tmp, "root-only")
    _write(secret, b"root's\n")
    os.chmod(secret, 0o600)
    os.symlink(secret, os.path.join(st.host_workdir, "victim.txt"))

    res = offline.recover(cfg, st)

    host = st.host_workdir
    got = _files(host)
    assert set(got) == {"result.txt", "sub/deep/data.bin", SPACE_NL, NON_UTF8, "changed.in",
                        "victim.txt"}
    for rel in got:
        if rel != "victim.txt":
            assert got[rel].st_uid == test_user.pw_uid and got[rel].st_gid == test_user.pw_gid
    with open(os.path.join(host, "result.txt"), "rb") as f:
        assert f.read() == b"the answer is 42\n"
    with open(os.path.join(host, "sub", "deep", "data.bin"), "rb") as f:
        assert f.read() == bytes(range(256)) * 40
    with open(os.path.join(host, SPACE_NL), "rb") as f:
        assert f.read() == b"spaces and a newline\n"
    with open(os.path.join(host, NON_UTF8), "rb") as f:
        assert f.read() == b"latin-1 name\n"
    # The planted symlink is left alone; root's file is untouched.
    assert os.path.islink(os.path.join(host, "victim.txt"))
    with open(secret, "rb") as f:
        assert f.read() == b"root's\n"
    assert res.files == 5 and res.unchanged == 1
    assert res.bytes == sum(got[r].st_size for r in got if r != "victim.txt")
    problems = "\n".join(res.problems)
    assert "victim.txt: the host path is a symlink; not written through" in problems
    assert "passwd-link: a symlink in the guest; not copied back" in problems
    assert "a-fifo: a fifo in the guest; not copied back" in problems
    assert not res.truncated
    # The raw copy and scratch directory are gone; the overlay is untouched.
    assert os.listdir(state.job_dir(cfg, st.job_id)) == ["state.json"]
    assert os.path.isfile(st.overlay)


def test_output_beyond_harvest_max_stays_behind(world_tmp, job):
    extra = {f"big{i}.dat": bytes([i]) * 3000 for i in range(5)}
    cfg, st = job(_home_disk(world_tmp, extra), harvest_max="7000")
    res = offline.recover(cfg, st)
    assert res.truncated
    assert res.bytes <= 7000
    got = _files(st.host_workdir)
    assert "big0.dat" in got and "big1.dat" in got and "big2.dat" not in got
    assert sum(s.st_size for s in got.values()) == res.bytes
    assert any("harvest_max" in p for p in res.problems)
    assert os.listdir(state.job_dir(cfg, st.job_id)) == ["state.json"]


def test_output_in_guest_memory_is_reported_unrecoverable(world_tmp, job):
    cfg, st = job(_home_disk(world_tmp), output_dir="/tmp/job")
    with pytest.raises(errors.UserError, match="/tmp/job was in the VM's memory"):
        offline.recover(cfg, st)
    assert os.listdir(st.host_workdir) == []
    assert os.listdir(state.job_dir(cfg, st.job_id)) == ["state.json"]


def test_output_directory_missing_from_the_disk(world_tmp, job):
    cfg, st = job(_home_disk(world_tmp), output_dir="/home/vmwntest/elsewhere")
    with pytest.raises(errors.GuestLost, match="not on the VM's disk"):
        offline.recover(cfg, st)


def test_root_filesystem_disk_is_read_at_its_own_paths(world_tmp, job):
    tree = os.path.join(world_tmp, "fs")
    _write(os.path.join(tree, "etc", "debian_version"), b"12.0\n")
    _write(os.path.join(tree, "srv", "out", "r.txt"), b"from the root disk\n")
    raw = os.path.join(world_tmp, "disk.raw")
    _mkfs(tree, raw, label=None)
    shutil.rmtree(tree)
    cfg, st = job(_overlay(raw, world_tmp), output_dir="/srv/out")
    res = offline.recover(cfg, st)
    assert res.files == 1
    with open(os.path.join(st.host_workdir, "r.txt"), "rb") as f:
        assert f.read() == b"from the root disk\n"


def test_unknown_disk_is_a_site_error(world_tmp, job):
    tree = os.path.join(world_tmp, "fs")
    _write(os.path.join(tree, "x"), b"x")
    raw = os.path.join(world_tmp, "disk.raw")
    _mkfs(tree, raw, label="data")
    shutil.rmtree(tree)
    cfg, st = job(_overlay(raw, world_tmp))
    with pytest.raises(errors.SiteError, match="label 'data'"):
        offline.recover(cfg, st)


def test_a_missing_overlay_is_reported(world_tmp, job):
    cfg, st = job(os.path.join(world_tmp, "gone.qcow2"))
    with pytest.raises(errors.GuestLost, match="disk is gone"):
        offline.recover(cfg, st)


def _try_writes(inside, outside):
    confined = landlock.confine(inside)
    results = {"confined": confined}
    for name, path in (("inside", inside), ("outside", outside)):
        try:
            with open(os.path.join(path, "probe"), "w") as f:
                f.write("x")
            results[name] = "written"
        except PermissionError:
            results[name] = "denied"
    with open(os.devnull, "w") as f:
        f.write("x")
    return results


def test_landlock_confines_writes_to_the_scratch_directory(world_tmp, test_user):
    inside, outside = os.path.join(world_tmp, "in"), os.path.join(world_tmp, "out")
    for d in (inside, outside):
        os.mkdir(d)
        os.chown(d, test_user.pw_uid, test_user.pw_gid)
    r = privs.run_as(test_user.pw_name, test_user.pw_uid, test_user.pw_gid, _try_writes,
                     inside, outside)
    if not r["confined"]:
        pytest.skip("the kernel has no Landlock")
    assert r == {"confined": True, "inside": "written", "outside": "denied"}


@pytest.mark.parametrize("guest, mount, expect", [
    ("/home/u/job", "/home", "/u/job"), ("/home", "/home", "/"), ("/tmp/x", "/home", None),
    ("/homework/x", "/home", None), ("/srv/a", "/", "/srv/a"), ("/home/u/../v", "/home", "/v"),
])
def test_guest_paths_map_onto_the_disk(guest, mount, expect):
    assert offline.on_disk(guest, mount) == expect


def test_debugfs_quoting():
    assert extfs.quote('/a b"c') == '"/a b""c"'
    with pytest.raises(errors.UserError):
        extfs.quote("/a\nb")


def test_an_overlay_naming_a_root_only_backing_file_is_read_with_the_users_rights(
        world_tmp, job):
    """The overlay is the job user's file: its header may name any backing file.  The
    conversion runs as the job user, so a root-only file is never read into the copy."""
    secret = os.path.join(world_tmp, "root-only.raw")
    with open(secret, "wb") as f:
        f.write(b"ROOT-ONLY-SECRET" * 65536)
    os.chmod(secret, 0o600)  # root's
    ov = os.path.join(world_tmp, "evil.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", secret, ov],
                   check=True)
    cfg, st = job(ov)
    with pytest.raises(errors.SiteError, match="Permission denied"):
        offline.recover(cfg, st)
    assert not os.listdir(st.host_workdir)
