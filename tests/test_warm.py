"""Warm starts (vmwn/warm.py): real guests restored from a prepared, saved one.

The unit tests at the end need neither root nor QEMU.
"""

import hashlib
import json
import logging
import os
import shutil
import socket
import struct
import time

import pytest

from vmwn.spec import JobSpec
from vmwn import config, lifecycle, share, state, warm
from vmwn.errors import SiteError
from vmwn.ssh import Guest

import vmwn_testlib
from vmwn_testlib import leftovers, needs_image, wait_until

RUN = os.getpid()
WARM_ENVS = vmwn_testlib.ENVS if vmwn_testlib.WARM else vmwn_testlib.ENVS.replace(
    "[env tiny]\ndescription = tiny test guest\ndata = copy\n",
    "[env tiny]\ndescription = tiny test guest\ndata = copy\nwarm = on\n", 1)


NOLO_ENV = """
[env tinynolo]
description = tiny restored, without the host's loopback
data = copy
warm = on
network = no-loopback
""" + vmwn_testlib.TINY

MOUNTED_ENV = """
[env tinymnt]
description = tiny restored, the job's directories mounted
warm = on
""" + vmwn_testlib.TINY


@pytest.fixture(scope="module")
def warm_site():
    """A configuration with warm = on for tiny and a generation of its own, prepared once."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    base = vmwn_testlib.qemu_reachable_dir("vmwn-warm-")
    try:
        path = vmwn_testlib.write_config(base, envs=WARM_ENVS + NOLO_ENV + MOUNTED_ENV, ports="42000-42499",
                                         warm_dir=f"{base}/warm")
        cfg = config.load(path)
        cost = warm.prepare(cfg, cfg.env("tiny"), say=lambda line: None)
        yield cfg, cost
    finally:
        shutil.rmtree(base, ignore_errors=True)


def spec(cfg, job_id, vcpus=1, memory_mib=None, user="alice", uid=4242, gid=4343, env="tiny"):
    e = cfg.env(env)
    return JobSpec(job_id=job_id, user=user, uid=uid, gid=gid, group="lab",
               job_name="w", env=e, vcpus=vcpus,
               memory_mib=memory_mib or e.memory_mib,
               workdir=f"/home/{user}/w", host_workdir="/nonexistent")


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _generation_files(cfg):
    gen = warm.current(cfg, cfg.env("tiny"))
    return {p: _sha(p) for p in (gen.state, gen.ram, gen.disk)}


@pytest.mark.integration
@needs_image("tiny")
def test_two_restored_jobs_are_unique_and_leave_nothing(warm_site):
    cfg, cost = warm_site
    assert cost["state_bytes"] > 0 and cost["prepare_seconds"] > 0
    before = _generation_files(cfg)
    # The saved guest's clock stopped when it was saved: it must be well behind when
    # the jobs restore it, or the clock check below could not tell a clock set at
    # restore from one left as saved.  What is awaited is the host's clock itself.
    with open(os.path.join(warm.current(cfg, cfg.env("tiny")).path, "meta.json")) as f:
        saved_at = json.load(f)["created"]
    wait_until(lambda: time.time() >= saved_at + 8, 20,
               "the host clock to be 8 s past the saved guest's", interval=0.1)
    jobs = [f"501.{RUN}.warm.test", f"502.{RUN}.warm.test"]
    seen = []
    try:
        for job in jobs:
            st = lifecycle.create(cfg, spec(cfg, job), time.monotonic() + 120)
            assert st.warm, "the job booted cold"
            # The connection pins the job's own host key: the restored sshd serves it.
            with Guest.connect(st) as g:
                host_before = time.time()
                status, out, err = g.run(
                    "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; "
                    "adjtimex | awk '/tv_sec/ { s = $2 } /tv_usec/ { printf \"%d.%06d\\n\", s, $2 }'; "
                    "id -un; hostname; cat /proc/cmdline /etc/machine-id")
                host_after = time.time()
                assert status == 0, err
                rnd, clock, user, host, cmdline, machine_id = out.decode().splitlines()
            seen.append((rnd, st.host_key_public, machine_id))
            with open(st.console_log, "rb") as f:  # said only after vmwn-restored succeeded
                assert b"vmwn-guest: restored" in f.read()
            # Read between the host's two readings, give or take half a second: the
            # host's time on the seed disk, not the virtual RTC (a second or so behind).
            assert host_before - 0.5 < float(clock) < host_after + 0.5, \
                f"the guest's clock is {float(clock) - host_after:+.3f} s off"
            assert len(machine_id) == 32 and int(machine_id, 16)
            assert user == "alice" and host.startswith("vmwn-")
            assert "vmwn.warm=1" in cmdline
            # Nothing of the job is in what every job restores.
            with open(warm.state_of(st.warm), "rb") as f:
                saved = f.read()
            body = st.host_key_public.split()[1].encode()
            assert body not in saved
    finally:
        for job in jobs:
            lifecycle.destroy(cfg, job)
    (rnd1, key1, id1), (rnd2, key2, id2) = seen
    assert rnd1 != rnd2, "two jobs restored from one state read the same random bytes"
    assert key1 != key2
    assert id1 != id2, "two restored jobs have one machine-id"
    for job in jobs:
        assert leftovers(cfg, job) == []
    assert _generation_files(cfg) == before, "a job changed the prepared guest"


@pytest.mark.integration
@needs_image("tiny")
def test_request_that_does_not_fit_boots_cold_and_says_so(warm_site, caplog):
    cfg, _ = warm_site
    job = f"503.{RUN}.warm.test"
    caplog.set_level(logging.INFO, logger="vmwn")
    try:
        st = lifecycle.create(cfg, spec(cfg, job, vcpus=2), time.monotonic() + 180)
        assert st.warm == ""
        with Guest.connect(st) as g:
            assert g.run("grep -c ^processor /proc/cpuinfo")[1].strip() == b"2"
    finally:
        lifecycle.destroy(cfg, job)
    assert any("cold boot: the job asks for 2 vCPUs" in r.getMessage() for r in caplog.records)
    assert leftovers(cfg, job) == []


@pytest.mark.integration
@needs_image("tiny")
@pytest.mark.parametrize("damage", ["truncated state", "unreadable memory"])
def test_a_failed_restore_falls_back_to_a_cold_boot(warm_site, caplog, damage):
    """A damaged saved state (QEMU fails to load it) or a memory file the job's QEMU
    cannot read (its launcher fails) costs a cold boot, not the job."""
    cfg, _ = warm_site
    env = cfg.env("tiny")
    gen = warm.current(cfg, env)
    root = warm.env_dir(cfg, env.name)
    broken = os.path.join(root, f"g{time.time_ns()}")
    shutil.copytree(gen.path, broken)
    if damage == "truncated state":
        with open(os.path.join(broken, "state"), "r+b") as f:
            f.truncate(4096)
    else:  # and copied: mapped, it would be QEMU that cannot open it
        os.chmod(os.path.join(broken, "ram"), 0o600)
        with open(os.path.join(broken, "meta.json")) as f:
            meta = json.load(f)
        with open(os.path.join(broken, "meta.json"), "w") as f:
            json.dump(dict(meta, maps_private=False), f)
    link = os.path.join(root, "current")
    old = os.readlink(link)
    os.unlink(link)
    os.symlink(os.path.basename(broken), link)
    job = f"504.{RUN}.warm.test"
    caplog.set_level(logging.INFO, logger="vmwn")
    try:
        st = lifecycle.create(cfg, spec(cfg, job), time.monotonic() + 180)
        assert st.warm == ""
        assert state.load(cfg, job).warm == ""
        with Guest.connect(st) as g:
            assert g.run("id -un")[1] == b"alice\n"
    finally:
        lifecycle.destroy(cfg, job)
        os.unlink(link)
        os.symlink(old, link)
        shutil.rmtree(broken)
    failed = [r.getMessage() for r in caplog.records if "warm start failed" in r.getMessage()]
    assert failed
    if damage == "unreadable memory":
        assert "cannot read the prepared guest's memory" in failed[0]
    assert leftovers(cfg, job) == []


@pytest.mark.integration
@needs_image("tiny")
def test_a_generation_removed_under_a_starting_job_costs_a_cold_boot(warm_site, monkeypatch,
                                                                      caplog):
    """A refresh may remove the generation a job chose a moment earlier (injected: its
    disk is gone when the job's overlay is made)."""
    from vmwn import disk
    cfg, _ = warm_site
    real = disk.create_overlay

    def gone(cfg, job_id, base, timeout=60):
        if base.startswith(cfg.site["warm_dir"]):
            raise SiteError(f"base image {base} is missing", "injected")
        return real(cfg, job_id, base, timeout)
    monkeypatch.setattr(disk, "create_overlay", gone)
    caplog.set_level(logging.INFO, logger="vmwn")
    job = f"507.{RUN}.warm.test"
    try:
        st = lifecycle.create(cfg, spec(cfg, job), time.monotonic() + 180)
        assert st.warm == "" and state.load(cfg, job).warm == ""
        with Guest.connect(st) as g:
            assert g.run("id -un")[1] == b"alice\n"
    finally:
        lifecycle.destroy(cfg, job)
    assert any("cold boot: base image" in r.getMessage() for r in caplog.records)
    assert leftovers(cfg, job) == []


@pytest.mark.integration
@needs_image("tiny")
def test_refresh_keeps_the_generation_a_running_job_uses(warm_site):
    cfg, _ = warm_site
    env = cfg.env("tiny")
    job = f"505.{RUN}.warm.test"
    st = lifecycle.create(cfg, spec(cfg, job), time.monotonic() + 120)
    try:
        used = st.warm
        warm.prepare(cfg, env, say=lambda line: None)
        assert warm.current(cfg, env).path != used
        assert os.path.isdir(used), "a refresh removed what a running job is backed by"
        with Guest.connect(st) as g:  # the job's disk still reads through its backing file
            assert g.run("echo x > /home/alice/f && cat /home/alice/f")[1] == b"x\n"
    finally:
        lifecycle.destroy(cfg, job)
    assert warm.remove_unused(cfg, env.name) == [os.path.basename(used)]
    assert not os.path.exists(used)


@pytest.mark.integration
@needs_image("tiny")
def test_a_restored_guest_is_confined_before_it_runs(warm_site):
    """no-loopback: the restored guest stays paused until its QEMU is confined."""
    from test_isolation import HostService
    cfg, _ = warm_site
    warm.prepare(cfg, cfg.env("tinynolo"), say=lambda line: None)
    svc = HostService()
    job = f"506.{RUN}.warm.test"
    try:
        st = lifecycle.create(cfg, spec(cfg, job, env="tinynolo"), time.monotonic() + 120)
        assert st.warm
        with Guest.connect(st) as g:
            status, out, err = g.run(f"echo x | nc -w 3 10.0.2.2 {svc.port}", timeout=30)
        assert status != 0 and b"hello from the host" not in out + err
        _barrier(svc)  # every connection that reached the service before is recorded
        assert svc.seen == [], svc.seen
    finally:
        svc.close()
        lifecycle.destroy(cfg, job)
    assert leftovers(cfg, job) == []


@pytest.fixture
def mounted_job(warm_site, test_user):
    """A mounted-mode job's spec for the test user, its working directory in their home."""
    import grp
    import tempfile
    cfg, _ = warm_site
    warm.prepare(cfg, cfg.env("tinymnt"), say=lambda line: None)
    workdir = tempfile.mkdtemp(prefix="vmwn-warm-mnt-\udcff ", dir=test_user.pw_dir)
    os.chown(workdir, test_user.pw_uid, test_user.pw_gid)
    with open(os.path.join(workdir, "in"), "w") as f:
        f.write("from the host\n")
    os.chown(os.path.join(workdir, "in"), test_user.pw_uid, test_user.pw_gid)
    env = cfg.env("tinymnt")
    yield cfg, lambda job: JobSpec(
        job_id=job, user=test_user.pw_name, uid=test_user.pw_uid, gid=test_user.pw_gid,
        group=grp.getgrgid(test_user.pw_gid).gr_name, job_name="m", env=env, vcpus=1,
        memory_mib=env.memory_mib, workdir=workdir, host_workdir=workdir), workdir
    shutil.rmtree(os.fsencode(workdir), ignore_errors=True)


def _mounted_round_trip(st, workdir, uid):
    """The job's directory in the guest at its host path: the host's file read, one
    written that the host has at once, as the job's user."""
    with Guest.connect(st) as g:
        status, out, err = g.run(f"cd '{workdir}' && cat in && echo from-guest > out && "
                                 "stat -c %u . && id -un".encode("utf-8", "surrogateescape"))
    assert status == 0, err
    assert out.decode("utf-8", "surrogateescape").splitlines()[:2] == ["from the host", str(uid)]
    path = os.path.join(workdir, "out")
    with open(path) as f:
        assert f.read() == "from-guest\n"
    assert os.stat(path).st_uid == uid
    os.unlink(path)


@pytest.mark.integration
@needs_image("tiny")
def test_a_mounted_job_restores_and_gets_its_shares_hot_plugged(mounted_job):
    cfg, make_spec, workdir = mounted_job
    job = f"509.{RUN}.warm.test"
    spec_ = make_spec(job)
    try:
        st = lifecycle.create(cfg, spec_, time.monotonic() + 120)
        assert st.warm, "the mounted job booted cold"
        assert st.shares
        _mounted_round_trip(st, workdir, spec_.uid)
        with open(st.console_log, "rb") as f:
            assert b"vmwn-guest: restored" in f.read()
    finally:
        lifecycle.destroy(cfg, job)
    assert leftovers(cfg, job) == []
    assert share.serving(state.job_dir(cfg, job)) == []


@pytest.mark.integration
@needs_image("tiny")
def test_a_share_that_cannot_be_added_costs_a_cold_boot(mounted_job, monkeypatch, caplog):
    """Injected: the share's virtiofsd is gone when libvirt adds its device."""
    from vmwn import virt
    cfg, make_spec, workdir = mounted_job
    job = f"508.{RUN}.warm.test"
    spec_ = make_spec(job)
    real = virt.attach
    failed = []

    def attach(dom, xml):
        if not failed:
            for s in state.load(cfg, job).shares:
                os.kill(s["pid"], 9)
                wait_until(lambda: not os.path.exists(f"/proc/{s['pid']}/cmdline") or
                           open(f"/proc/{s['pid']}/stat").read().split(") ")[1][0] == "Z",
                           10, "the killed virtiofsd to end")
            failed.append(xml)
        return real(dom, xml)

    monkeypatch.setattr(virt, "attach", attach)
    caplog.set_level(logging.INFO, logger="vmwn")
    try:
        st = lifecycle.create(cfg, spec_, time.monotonic() + 180)
        assert failed and st.warm == ""
        _mounted_round_trip(st, workdir, spec_.uid)
    finally:
        lifecycle.destroy(cfg, job)
    assert any("warm start failed" in r.getMessage() and "cannot add a device" in r.getMessage()
               for r in caplog.records)
    assert leftovers(cfg, job) == []
    assert share.serving(state.job_dir(cfg, job)) == []


def _barrier(svc):
    """Connect to ``svc`` from the test and wait until it has recorded that connection:
    it serves connections one at a time in the order they came, so any earlier one is
    in ``svc.seen`` by then.  The barrier's own record is taken out again."""
    with socket.create_connection(("127.0.0.1", svc.port), timeout=10) as c:
        c.sendall(b"vmwn-test-barrier\n")
        c.recv(100)
    wait_until(lambda: any(s[1] == b"vmwn-test-barrier" for s in svc.seen), 10,
               "the host service to record the test's own connection")
    svc.seen[:] = [s for s in svc.seen if s[1] != b"vmwn-test-barrier"]


# ------------------------------------------------------------------ unit tests

def _cfg(tmp_path, env_extra="warm = on\ndata = copy\n", kernel=True):
    img = tmp_path / "img"
    img.mkdir(exist_ok=True)
    for n in ("disk.qcow2", "vmlinuz", "initrd.img"):
        (img / n).write_bytes(b"x")
    tdir = tmp_path / "templates"
    tdir.mkdir(exist_ok=True)
    (tdir / "domain.xml.j2").write_text("<domain/>")
    qemu = tmp_path / "qemu-system"
    qemu.write_bytes(b"")
    conf = tmp_path / "vmwn.conf"
    kern = f"kernel = {img}/vmlinuz\ninitrd = {img}/initrd.img\n" if kernel else ""
    conf.write_text(f"[site]\nwarm_dir = {tmp_path}/warm\nstate_dir = {tmp_path}/jobs\n"
                    f"template_dir = {tdir}\nqemu = {qemu}\n\n"
                    f"[env tiny]\nimage = {img}/disk.qcow2\n{kern}{env_extra}")
    return config.load(str(conf))


def _fake_generation(cfg, env, fingerprint=None, mode=0o644):
    root = warm.env_dir(cfg, env.name)
    gen = os.path.join(root, "g1")
    os.makedirs(gen)
    for n in ("state", "ram", "disk.qcow2"):
        with open(os.path.join(gen, n), "wb") as f:
            f.write(b"s")
        os.chmod(os.path.join(gen, n), mode)
    with open(os.path.join(gen, "meta.json"), "w") as f:
        json.dump({"fingerprint": fingerprint or warm.fingerprint(cfg, env)}, f)
    os.symlink("g1", os.path.join(root, "current"))
    return gen


def test_warm_takes_either_data_mode_and_needs_a_vmwn_kernel(tmp_path):
    assert _cfg(tmp_path, env_extra="warm = on\n").env("tiny").data == "mounted"
    with pytest.raises(SiteError, match="warm = on needs a kernel booted by vmwn"):
        _cfg(tmp_path, kernel=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="generation files must be root's")
def test_a_changed_base_is_never_restored(tmp_path):
    cfg = _cfg(tmp_path)
    env = cfg.env("tiny")
    _fake_generation(cfg, env)
    assert warm.current(cfg, env).vcpus == env.vcpus
    time.sleep(0.01)
    with open(env.image, "ab") as f:  # the base changes (rebuilt, or edited by hand)
        f.write(b"y")
    with pytest.raises(warm.NotPrepared, match="made from other files; run 'vmwn warm "
                                                "prepare tiny'"):
        warm.current(cfg, env)
    assert warm.choose(cfg, env, env.vcpus, env.memory_mib) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="generation files must be root's")
def test_a_template_installed_again_keeps_the_guest_warm_and_an_edited_one_does_not(tmp_path):
    cfg = _cfg(tmp_path)
    env = cfg.env("tiny")
    _fake_generation(cfg, env)
    template = tmp_path / "templates" / "domain.xml.j2"
    text = template.read_text()
    template.unlink()
    template.write_text(text)  # another inode and time, the same text: an install's
    assert warm.current(cfg, env).vcpus == env.vcpus
    template.write_text(text + "<!-- edited -->")
    with pytest.raises(warm.NotPrepared, match="made from other template_sha256"):
        warm.current(cfg, env)


@pytest.mark.skipif(os.geteuid() != 0, reason="generation files must be root's")
@pytest.mark.parametrize("name", ["disk.qcow2", "ram", "state"])
def test_a_generation_with_a_missing_file_is_not_restored(tmp_path, caplog, name):
    cfg = _cfg(tmp_path)
    env = cfg.env("tiny")
    gen = _fake_generation(cfg, env)
    os.unlink(os.path.join(gen, name))  # removed by hand
    caplog.set_level(logging.INFO, logger="vmwn")
    assert warm.choose(cfg, env, env.vcpus, env.memory_mib) is None
    assert f"{name} of the prepared guest of tiny is unreadable" in caplog.text


@pytest.mark.skipif(os.geteuid() != 0, reason="generation files must be root's")
def test_a_generation_others_can_write_is_refused(tmp_path):
    cfg = _cfg(tmp_path)
    env = cfg.env("tiny")
    _fake_generation(cfg, env, mode=0o666)
    with pytest.raises(warm.NotPrepared, match="writable by others"):
        warm.current(cfg, env)


def test_no_generation_and_warm_off(tmp_path, caplog):
    cfg = _cfg(tmp_path)
    env = cfg.env("tiny")
    caplog.set_level(logging.INFO, logger="vmwn")
    assert warm.choose(cfg, env, 1, env.memory_mib) is None
    assert "cold boot: no prepared guest for tiny (run 'vmwn warm prepare tiny')" in caplog.text
    cold = _cfg(tmp_path, env_extra="data = copy\n")
    assert warm.choose(cold, cold.env("tiny"), 1, 512) is None
    assert "warm off" in warm.status(cold, cold.env("tiny"))
    with pytest.raises(SiteError, match="does not have warm = on"):
        warm.prepare(cold, cold.env("tiny"))


def test_seed_padding(tmp_path):
    small = tmp_path / "seed.iso"
    small.write_bytes(b"CD001" * 10)
    assert warm.pad_seed(str(small)) and small.stat().st_size == warm.SEED_BYTES
    big = tmp_path / "big.iso"
    big.write_bytes(b"x" * (warm.CLOCK_OFFSET + 1))  # it would overlap the host's clock
    assert not warm.pad_seed(str(big))


def test_the_host_clock_goes_on_the_seeds_last_block(tmp_path):
    seed = tmp_path / "seed.iso"
    seed.write_bytes(b"CD001" * 10)
    warm.pad_seed(str(seed))
    before = time.time_ns()
    warm.give_clock(str(seed))
    after = time.time_ns()
    data = seed.read_bytes()
    assert len(data) == warm.SEED_BYTES and data[:50] == b"CD001" * 10
    magic, sec, nsec = struct.unpack_from("<16sqq", data, warm.SEED_BYTES - 4096)
    assert magic == b"vmwn-host-clock\0" and 0 <= nsec < 10**9
    assert before <= sec * 10**9 + nsec <= after
    assert data[50:warm.SEED_BYTES - 4096] == bytes(warm.SEED_BYTES - 4096 - 50)


def test_the_prepared_memory_is_copied_to_a_file_of_its_own_without_its_zeros(tmp_path):
    src = tmp_path / "ram"
    with open(src, "wb") as f:
        f.write(b"k" * 5000)                 # a page and a bit
        f.write(bytes(3 * 4096 - 5000 + 8192))  # zeros, written
        f.write(b"\0" * 100 + b"x")          # a page that is not all zeros
        f.truncate(1 << 20)                  # a hole to the end
    before = src.read_bytes()
    warm._copy_sparse(str(src), str(tmp_path / "copy"))
    copy = tmp_path / "copy"
    assert copy.read_bytes() == before
    assert os.stat(copy).st_ino != os.stat(src).st_ino
    assert os.stat(copy).st_mode & 0o777 == 0o600
    assert os.stat(copy).st_blocks * 512 <= 3 * 4096  # the written zeros are holes
    with pytest.raises(FileExistsError):  # never into a file someone else made
        warm._copy_sparse(str(src), str(copy))


def test_preparing_needs_room_for_the_guests_memory(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    env = cfg.env("tiny")
    real = os.statvfs(tmp_path)

    class Full:
        f_frsize, f_bavail = real.f_frsize, (2 * env.memory_mib << 20) // real.f_frsize
    monkeypatch.setattr(warm.os, "statvfs", lambda p: Full)
    with pytest.raises(SiteError, match=r"has less than \d+ MiB free, which preparing tiny "
                                        r"needs \(twice its memory\)"):
        warm._check_room(str(tmp_path), env)


def test_libvirt_save_header_is_stripped(tmp_path):
    xml = b"<domain/>" + b"\0" * 100
    stream = b"QEVM\x00\x00\x00\x03" + os.urandom(5000)
    head = struct.pack("=16sIIIII56x", b"LibvirtQemudSave", 2, len(xml), 1, 0, 0)
    saved = tmp_path / "saved"
    saved.write_bytes(head + xml + stream)
    warm._strip_libvirt_header(str(saved), str(tmp_path / "out"))
    assert (tmp_path / "out").read_bytes() == stream
    saved.write_bytes(struct.pack("=16sIIIII56x", b"LibvirtQemudSave", 2, len(xml), 1, 1, 0)
                      + xml + stream)
    with pytest.raises(SiteError, match="save_image_format"):
        warm._strip_libvirt_header(str(saved), str(tmp_path / "out"))
    saved.write_bytes(b"short")
    with pytest.raises(SiteError, match="truncated"):
        warm._strip_libvirt_header(str(saved), str(tmp_path / "out"))


def test_domain_carries_the_warm_flag_and_the_memory(tmp_path):
    from vmwn.domain import render
    cfg = config.load(vmwn_testlib.write_config(str(tmp_path), envs=WARM_ENVS))
    env = cfg.env("tiny")
    cold = render(cfg, env, job_id="1.x", user="nobody", uid=65534, gid=65534)
    assert "vmwn.warm=1" not in cold and "VMWN_RAM" not in cold and "-incoming" not in cold
    # Being prepared: its memory is the generation's file.
    xml = render(cfg, env, job_id="1.x", user="nobody", uid=65534, gid=65534, warm=True,
                 ram="/var/lib/vmwn/warm/tiny/.new-1/ram")
    assert f"{env.cmdline} vmwn.warm=1'" in xml
    assert "<qemu:env name='VMWN_RAM_FILE' value='/var/lib/vmwn/warm/tiny/.new-1/ram'/>" in xml
    assert "-incoming" not in xml
    # No global run state in the stream: a restored guest runs as libvirt says.
    assert "<qemu:arg value='migration.store-global-state=off'/>" in xml
    # Restored: a copy of it or the file mapped private, and QEMU waits for the device
    # state vmwn gives it.
    for how, var in (("copy", "VMWN_RAM_FROM"), ("map", "VMWN_RAM_MAP")):
        xml = render(cfg, env, job_id="1.x", user="nobody", uid=65534, gid=65534, warm=True,
                     ram="/var/lib/vmwn/warm/tiny/g1/ram", restore=how)
        assert f"<qemu:env name='{var}' value='/var/lib/vmwn/warm/tiny/g1/ram'/>" in xml
        assert xml.count("VMWN_RAM_") == 1
        assert "<qemu:arg value='-incoming'/>\n    <qemu:arg value='defer'/>" in xml
    with pytest.raises(ValueError):
        render(cfg, env, job_id="1.x", user="nobody", uid=65534, gid=65534, warm=True,
               ram="/r", restore="mmap")


def test_a_template_from_an_earlier_bundle_still_renders(tmp_path):
    """A site's template copied before the memory file names incoming and autostart."""
    from vmwn.domain import render
    tdir = tmp_path / "t"
    tdir.mkdir()
    bundled = open(os.path.join(vmwn_testlib.ROOT, "templates", "domain.xml.j2")).read()
    old = bundled.replace("</qemu:commandline>", "{% if incoming %}<qemu:env name='VMWN_INCOMING' "
                          "value='{{ incoming }}'/>{% if autostart %}<qemu:env "
                          "name='VMWN_AUTOSTART' value='1'/>{% endif %}{% endif %}"
                          "</qemu:commandline>")
    (tdir / "domain.xml.j2").write_text(old)
    conf = vmwn_testlib.write_config(str(tmp_path), envs=WARM_ENVS)
    with open(conf) as f:
        text = f.read().replace(f"template_dir = {vmwn_testlib.ROOT}/templates",
                                f"template_dir = {tdir}")
    with open(conf, "w") as f:
        f.write(text)
    cfg = config.load(conf)
    xml = render(cfg, cfg.env("tiny"), job_id="1.x", user="nobody", uid=65534, gid=65534,
                 warm=True, ram="/r", restore="copy")
    assert "VMWN_INCOMING" in xml and "VMWN_AUTOSTART" not in xml


def test_a_guest_with_shares_copies_the_memory_others_map_it_where_qemu_can(tmp_path):
    gen = tmp_path / "g1"
    gen.mkdir()
    assert warm.restore_by(str(gen), []) == "copy"  # no meta: the safe way
    (gen / "meta.json").write_text(json.dumps({"maps_private": True}))
    assert warm.restore_by(str(gen), []) == "map"
    assert warm.restore_by(str(gen), ["a share"]) == "copy"  # virtiofsd maps it shared
    (gen / "meta.json").write_text(json.dumps({"maps_private": False}))
    assert warm.restore_by(str(gen), []) == "copy"


@pytest.mark.parametrize("help_text, maps", [
    ("memory-backend-file options:\n  readonly=<bool>\n  rom=<OnOffAuto>        - Whether\n", True),
    ("memory-backend-file options:\n  readonly=<bool>\n  share=<bool>\n", False)])
def test_whether_qemu_maps_a_read_only_file_private_is_asked_of_qemu(tmp_path, help_text, maps):
    qemu = tmp_path / "qemu"
    qemu.write_text(f"#!/bin/sh\n[ \"$2\" = memory-backend-file,help ] && printf '%s' "
                    f"'{help_text}'\n")
    qemu.chmod(0o755)
    assert warm.maps_private(str(qemu)) is maps


def test_a_restored_domain_gets_its_shares_as_devices_to_add(tmp_path):
    """The template's <filesystem> devices come out of a restored domain whole (QEMU
    could not load a saved guest into a machine with them) and go in after; the
    shared memory virtio-fs needs stays."""
    import xml.etree.ElementTree as ET
    from vmwn.domain import render, without_filesystems
    from vmwn.share import Share
    cfg = config.load(vmwn_testlib.write_config(str(tmp_path), envs=WARM_ENVS))
    shares = [Share(path="/home/a & b", tag="vmwn0", socket="/j/vmwn0.sock"),
              Share(path="/home/a & b/w", tag="vmwn1", socket="/j/<1>.sock")]
    xml = render(cfg, cfg.env("tiny"), job_id="1.x", user="nobody", uid=65534, gid=65534,
                 warm=True, ram="/r", restore="copy", shares=shares)
    rest, devices = without_filesystems(xml)
    root = ET.fromstring(rest)
    assert root.find("devices/filesystem") is None
    assert root.find("memoryBacking/access").get("mode") == "shared"
    assert root.find("devices/disk") is not None and root.find("devices/serial") is not None
    parsed = [ET.fromstring(d) for d in devices]
    assert [(d.tag, d.find("source").get("socket"), d.find("target").get("dir"))
            for d in parsed] == [("filesystem", "/j/vmwn0.sock", "vmwn0"),
                                 ("filesystem", "/j/<1>.sock", "vmwn1")]
    assert all(d.find("driver").get("type") == "virtiofs" for d in parsed)
    assert without_filesystems(rest) == (rest, [])


def test_drop_leaves_no_directory_behind(tmp_path):
    cfg = _cfg(tmp_path)
    env = cfg.env("tiny")
    gen = _fake_generation(cfg, env)
    open(os.path.join(warm.env_dir(cfg, env.name), ".lock"), "w").close()
    assert warm.drop(cfg, env.name) == [os.path.basename(gen)]
    assert not os.path.exists(warm.env_dir(cfg, env.name))
    assert warm.drop(cfg, env.name) == []  # again: nothing to do, no error


def test_an_image_build_refreshes_every_warm_environment_on_its_files(tmp_path, monkeypatch):
    from vmwn import images
    cfg = _cfg(tmp_path)
    conf = cfg.files[0]
    with open(conf, "a") as f:  # a second environment on the same files, warm too
        base = cfg.env("tiny")
        f.write(f"\n[env tinywarm]\nimage = {base.image}\nkernel = {base.kernel}\n"
                f"initrd = {base.initrd}\ndata = copy\nwarm = on\n"
                f"\n[env other]\nimage = {tmp_path}/other.qcow2\nkernel = {base.kernel}\n"
                "data = copy\nwarm = on\n")
    cfg = config.load(conf)
    prepared = []

    def not_prepared(cfg, env):
        raise warm.NotPrepared("stale")
    monkeypatch.setattr(warm, "current", not_prepared)
    monkeypatch.setattr(warm, "prepare", lambda cfg, env: prepared.append(env.name) or
                        {"prepare_seconds": 1.0})
    images._refresh_warm(cfg, cfg.env("tiny"))
    # 'other' shares the kernel: its saved guest booted it, so it is stale too.
    assert prepared == ["other", "tiny", "tinywarm"]
