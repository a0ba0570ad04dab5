"""Faults around a job's start and teardown, injected without a guest: SIGTERM at
the points where a raising handler lost what the boot had started, and a
cleanup that fails after a failed create.

The warden here is the real one (forked by warden.spawn), booting on libvirt's
test driver with a stand-in virtiofsd started by the real vmwn.share: a program
called virtiofsd that waits on its socket as the real one does.
"""

import contextlib
import ctypes
import dataclasses
import grp
import logging
import os
import select
import shutil
import signal
import subprocess
import threading
import time
import types

import pytest

from vmwn import config, interrupt, keys, lifecycle, netpolicy, share, state, virt, warden
from vmwn.domain import domain_name
from vmwn.errors import SiteError, TransientError, UserError
from vmwn.spec import JobSpec

from vmwn_testlib import qemu_reachable_dir, write_config

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (user namespaces, "
                               "processes of the job's user)")
NOBODY = types.SimpleNamespace(pw_name="nobody", pw_uid=65534, pw_gid=65534)
# Waits on its socket (fd 3) as virtiofsd does, under virtiofsd's name (share.py
# knows its virtiofsd by both), having logged that it does as virtiofsd does.
FAKE_VIRTIOFSD = """#!/bin/bash
[ "$1" = --version ] && { echo 'virtiofsd version 7.2.0 (stand-in)'; exit 0; }
exec -a virtiofsd /usr/bin/python3 -c '
import socket, sys
s = socket.socket(fileno=3)
print("fake: Waiting for vhost-user socket connection...", file=sys.stderr, flush=True)
c, _ = s.accept()
while c.recv(4096):
    pass
'
"""


def _poll(predicate, timeout, what):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)


class Started:
    """The processes a test started (wardens, virtiofsd), each held by a pidfd from
    when it is noted: the fixture's end kills those still running, and never a
    process that took a freed pid since.  Pids wrap at 32768 on small hosts, and
    the parallel lanes' real virtiofsd and QEMU take them all the time."""

    def __init__(self):
        self.fds = {}

    def append(self, pid):
        if pid > 0 and pid not in self.fds:
            try:
                self.fds[pid] = os.pidfd_open(pid)
            except ProcessLookupError:  # exited and reaped: nothing to end
                self.fds[pid] = None

    def __iadd__(self, pids):
        for pid in pids:
            self.append(pid)
        return self

    def __iter__(self):
        return iter(list(self.fds))

    def __bool__(self):
        return bool(self.fds)

    def gone(self, pid):
        """Exited (a zombie counts: nobody here reaps an orphan)."""
        fd = self.fds[pid]
        return fd is None or bool(select.select([fd], [], [], 0)[0])

    def end_all(self):
        for fd in (f for f in self.fds.values() if f is not None):
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):  # an orphan of ours, or not ours
                os.waitid(os.P_PIDFD, fd, os.WEXITED)
            os.close(fd)
        self.fds.clear()


@pytest.fixture
def node(monkeypatch):
    """A configuration on libvirt's test driver with an environment whose files exist,
    the stand-in virtiofsd, and this process as the subreaper of what it forks."""
    if os.geteuid() != 0:
        pytest.skip("needs root: vmwn's state directory and files owned by job users")
    base = qemu_reachable_dir("vmwn-teardown-")
    images = os.path.join(base, "images", "t")
    os.makedirs(images)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2",
                    os.path.join(images, "disk.qcow2"), "1M"], check=True)
    for name in ("vmlinuz", "initrd.img"):
        with open(os.path.join(images, name), "wb") as f:
            f.write(b"x")
    for name in os.listdir(images):
        os.chmod(os.path.join(images, name), 0o644)
    fake = os.path.join(base, "virtiofsd-stand-in")  # a unit test starts no "virtiofsd"
    with open(fake, "w") as f:
        f.write(FAKE_VIRTIOFSD)
    os.chmod(fake, 0o755)
    env = ("image = {d}/disk.qcow2\nkernel = {d}/vmlinuz\ninitrd = {d}/initrd.img\n"
           "accel = qemu\nmemory = 256M\nboot_timeout = 120\n").format(d=images)
    path = write_config(base, site_extra=(
        f"libvirt_uri = test:///default\nvirtiofsd = {fake}\ndebug_log = {base}/debug.log\n"
        f"pbs_home = {base}/torque\nstart_attempts = 3"),
        envs=f"[env t]\n{env}\n[env tcopy]\ndata = copy\n{env}", ports="44700-44799")
    os.makedirs(os.path.join(base, "torque", "mom_priv", "jobs"))
    # Nothing of the host: libvirt's per-domain directory and the no-loopback cgroup.
    monkeypatch.setattr(virt, "open_domain_dirs", lambda *a: False)
    monkeypatch.setattr(netpolicy, "MOUNTINFO", os.path.join(base, "no-mountinfo"))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans come back here
    started = Started()
    try:
        yield config.load(path), base, started
    finally:
        libc.prctl(36, 0, 0, 0, 0)
        started.end_all()
        shutil.rmtree(base, ignore_errors=True)


def _prepared(cfg, job, user, workdir):
    """A job's record as lifecycle.prepare leaves it, sharing ``workdir``."""
    jdir = state.make_job_dir(cfg, job)
    shares = share.shares_for(jdir, [workdir])
    st = state.JobState(
        job_id=job, domain=domain_name(job), env="t", user=user.pw_name, uid=user.pw_uid,
        gid=user.pw_gid, group="g", bind_address="127.0.0.1", port=44799,
        host_key_public=keys.generate("vmwn-host:t").public_line,
        key_path=os.path.join(jdir, "id_ed25519"), workdir=workdir, host_workdir=workdir,
        output_dir=workdir, overlay=os.path.join(jdir, "overlay.qcow2"),
        seed=os.path.join(jdir, "seed.iso"), console_log=os.path.join(jdir, "console.log"),
        data="mounted", shares=[dataclasses.asdict(s) for s in shares], phase="prepared")
    state.save(cfg, st)
    return st


def _spawn(cfg, st, started):
    pid = warden.spawn(cfg, st, warden.listen(cfg, st))
    started.append(pid)
    return pid


def _debug_log(base):
    with open(os.path.join(base, "debug.log"), encoding="utf-8") as f:
        return f.read()


# ------------------------------------------------------------------ the mechanism

def test_a_noted_signal_is_not_swallowed_and_ends_a_sleep_early():
    with interrupt.noted(signal.SIGTERM):
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # its handler runs right here
        except Exception:  # noqa: BLE001 - what swallowed the old handlers' exception
            pytest.fail("a signal handler raised")
        assert interrupt.requested()
        with pytest.raises(interrupt.Interrupted):
            interrupt.check()
    with interrupt.noted(signal.SIGTERM):
        assert not interrupt.requested()  # a new stretch of work starts clean
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
        t = time.monotonic()
        with pytest.raises(interrupt.Interrupted, match="SIGTERM"):
            interrupt.sleep(30)
        assert time.monotonic() - t < 10
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # pytest's own, back


# ------------------------------------------------------------------ the warden

@ROOT_ONLY
def test_sigterm_as_virtiofsd_started_leaves_them_recorded_and_torn_down(
        node, monkeypatch, test_user, world_tmp):
    """The old handler raised right after share.start returned: its virtiofsd ran on,
    in no record, and the epilogue's teardown never found them."""
    cfg, base, started = node
    job = f"1.{os.getpid()}.teardown"
    st = _prepared(cfg, job, test_user, world_tmp)
    real_start = share.start

    def start_then_sigterm(st, shares, virtiofsd=share.VIRTIOFSD):
        out = real_start(st, shares, virtiofsd)
        os.kill(os.getpid(), signal.SIGTERM)  # in the warden: the epilogue's stop
        return out
    monkeypatch.setattr(share, "start", start_then_sigterm)
    pid = _spawn(cfg, st, started)
    _poll(lambda: started.gone(pid), 30, "the warden to stop")
    rec = state.load(cfg, job)
    shares = [share.Share(**d) for d in rec.shares]
    started += [s.pid for s in shares]
    assert shares and all(s.pid > 0 and share._is_ours(s) for s in shares), _debug_log(base)
    log = _debug_log(base)
    assert "warden stopped by SIGTERM" in log and "warden failed" not in log, log

    removed = lifecycle.destroy(cfg, job)
    assert all(not share._is_ours(s) for s in shares)
    assert not os.path.exists(state.job_dir(cfg, job)), removed


@ROOT_ONLY
def test_sigterm_during_the_boot_wait_stops_the_warden_and_teardown_finds_everything(
        node, test_user, world_tmp):
    """The epilogue's own path: destroy SIGTERMs the warden that waits for the guest."""
    cfg, base, started = node
    job = f"2.{os.getpid()}.teardown"
    st = _prepared(cfg, job, test_user, world_tmp)
    _spawn(cfg, st, started)

    def recorded():
        return all(d["pid"] > 0 for d in state.load(cfg, job).shares)
    _poll(recorded, 30, "the warden to record its virtiofsd")
    shares = [share.Share(**d) for d in state.load(cfg, job).shares]
    started += [s.pid for s in shares]
    assert all(share._is_ours(s) for s in shares)
    _poll(lambda: "for the guest's sshd" in _debug_log(base), 30,
          "the warden to wait for the guest's SSH (which never comes)")

    t = time.monotonic()
    removed = lifecycle.destroy(cfg, job)
    assert time.monotonic() - t < 5  # warden.stop's SIGTERM did it: no SIGKILL was needed
    assert any(r.startswith("warden") for r in removed), removed
    assert all(not share._is_ours(s) for s in shares)
    assert not os.path.exists(state.job_dir(cfg, job))
    assert "warden stopped by SIGTERM" in _debug_log(base)


@ROOT_ONLY
def test_sigterm_while_a_virtiofsd_starts_ends_it(node, monkeypatch, test_user, world_tmp):
    """A virtiofsd not yet waiting on its socket has no pid in any record: a stop
    request there ends it, as a start that fails does."""
    cfg, base, started = node
    hung = os.path.join(base, "hung", "virtiofsd-stand-in")
    os.makedirs(os.path.dirname(hung))
    with open(hung, "w") as f:  # never accepts: share.py keeps waiting for it
        f.write("#!/bin/bash\n[ \"$1\" = --version ] && { echo 'virtiofsd 1.13.0'; exit 0; }\n"
                f"exec -a virtiofsd /usr/bin/python3 -c "
                f"'import time; time.sleep(300)' {base}\n")
    os.chmod(hung, 0o755)
    st = _prepared(cfg, f"7.{os.getpid()}.teardown", test_user, world_tmp)
    real = share._await_accept

    def sigterm_then_wait(pid, *a, **kw):
        started.append(pid)
        os.kill(os.getpid(), signal.SIGTERM)
        return real(pid, *a, **kw)
    monkeypatch.setattr(share, "_await_accept", sigterm_then_wait)
    shares = [share.Share(**d) for d in st.shares]
    with interrupt.noted(signal.SIGTERM):
        with pytest.raises(interrupt.Interrupted):
            share.start(st, shares, hung)
    assert started and all(started.gone(pid) for pid in started)


@ROOT_ONLY
def test_sigterm_wakes_the_warden_waiting_for_its_starter(node):
    cfg, base, started = node
    job = f"8.{os.getpid()}.teardown"
    st = _prepared(cfg, job, NOBODY, "/nonexistent-workdir")
    w = warden.Warden(cfg, job, warden.listen(cfg, st))
    w.answer = b"{}\n"
    with interrupt.noted(signal.SIGTERM):
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
        t = time.monotonic()
        with pytest.raises(interrupt.Interrupted):
            w._serve(stoppable=True)
        assert time.monotonic() - t < 0.9  # the wakeup fd, not the select's 1 s timeout
    w.listener.close()


def test_teardown_reads_the_record_again_after_the_warden_stopped(node, monkeypatch):
    """What a stopping warden records (its virtiofsd) is what the teardown stops."""
    cfg, base, started = node
    job = f"3.{os.getpid()}.teardown"
    _prepared(cfg, job, NOBODY, "/nonexistent-workdir")  # no shares running yet

    def stop_recording(st):
        rec = state.load(cfg, job)
        rec.shares = [{**rec.shares[0], "pid": 424242}]
        state.save(cfg, rec)
        return True
    stopped = []
    monkeypatch.setattr(warden, "stop", stop_recording)
    monkeypatch.setattr(share, "stop", lambda st, shares, timeout=5.0: stopped.extend(shares))
    lifecycle.destroy(cfg, job)
    assert [s.pid for s in stopped] == [424242]


# ------------------------------------------------------------------ the prologue

@ROOT_ONLY
def test_sigterm_while_the_prologue_records_its_warden_stops_that_warden(
        node, monkeypatch, capsys):
    """The old handler raised between the warden's fork and its record: the
    teardown found no warden to stop, and it booted on for a requeued job."""
    from vmwn.torque.hooks import prologue
    cfg, base, started = node
    job = f"4.{os.getpid()}.teardown"
    real = warden.proc_start_time
    forked = []

    def record_then_sigterm(pid):
        if not forked:  # the first call: in spawn, before the pid is saved
            forked.append(pid)
            started.append(pid)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(pid)
    monkeypatch.setattr(warden, "proc_start_time", record_then_sigterm)
    argv = ["prologue", job, "nobody", "nogroup", "job", "other=vmwn=tcopy", "batch", "", ""]
    rc = prologue.main(argv, config_path=os.path.join(base, "vmwn.conf"),
                       pbs_home=os.path.join(base, "torque"), environ={"PBS_O_WORKDIR": "/tmp/w"})
    assert rc == 2  # requeued, as any start that may pass
    assert "interrupted by SIGTERM" in capsys.readouterr().err
    assert forked and started.gone(forked[0])
    assert not os.path.exists(state.job_dir(cfg, job))
    assert not os.path.exists(os.path.join(cfg.site["overlay_dir"],
                                           state.safe_name(job) + ".qcow2"))


# ------------------------------------------------------------------ a failing cleanup

def _spec(cfg, job):
    e = cfg.env("tcopy")
    return JobSpec(job_id=job, user="nobody", uid=65534, gid=65534, group="nogroup",
                   job_name="t", env=e, vcpus=1, memory_mib=e.memory_mib,
                   workdir="/tmp/w", host_workdir="/tmp/w")


@pytest.mark.parametrize("where", ["prepare", "boot"])
def test_a_cleanup_that_fails_does_not_replace_the_original_error(node, monkeypatch, caplog,
                                                                   where):
    cfg, base, started = node
    job = f"5.{os.getpid()}.teardown"

    def fail_boot(cfg, env, st, deadline, timer, log, progress=None):
        progress.append("start")  # libvirt may have the domain
        raise TransientError("the original failure", "the job is requeued")

    def fail_prepare(*a):
        raise TransientError("the original failure", "the job is requeued")
    if where == "boot":
        monkeypatch.setattr(lifecycle, "_boot", fail_boot)
    else:
        monkeypatch.setattr(lifecycle, "_prepare", fail_prepare)

    def broken(*a, **kw):
        raise SiteError("the cleanup broke", "see libvirt")
    monkeypatch.setattr(lifecycle, "destroy", broken)

    def files_broken(*a):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(lifecycle, "_remove_files", files_broken)
    caplog.set_level(logging.INFO)
    make = lifecycle.create if where == "boot" else lifecycle.prepare
    with pytest.raises(TransientError, match="the original failure"):
        make(cfg, _spec(cfg, job), time.monotonic() + 60)
    failed = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(failed) == 1 and f"job {job}: cleanup after failed create also failed" in \
        failed[0] and "the cleanup broke" in failed[0], failed
    if where == "prepare":  # nothing reached libvirt: the files were tried too
        assert "Input/output error" in failed[0]


def test_a_stop_request_during_prepare_removes_what_was_made(node, monkeypatch):
    cfg, base, started = node
    job = f"6.{os.getpid()}.teardown"
    real = lifecycle._give_overlay

    def overlay_then_sigterm(*a):
        real(*a)
        os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(lifecycle, "_give_overlay", overlay_then_sigterm)
    with interrupt.noted(signal.SIGTERM):
        with pytest.raises(interrupt.Interrupted):
            lifecycle.create(cfg, _spec(cfg, job), time.monotonic() + 60)
    assert not os.path.exists(state.job_dir(cfg, job))
    assert not os.path.exists(os.path.join(cfg.site["overlay_dir"],
                                           state.safe_name(job) + ".qcow2"))


@ROOT_ONLY
def test_a_virtiofsd_qemu_cannot_reach_fails_the_boot_attempt_saying_what_became_of_it(
        node, monkeypatch, test_user, world_tmp):
    """QEMU refused at a virtiofsd's socket is a boot the warden tries again (with fresh
    ones), and the attempt's line says whether that virtiofsd still waited, ran on
    elsewhere or had gone, with its own last words."""
    cfg, base, started = node
    job = f"9.{os.getpid()}.teardown"
    st = _prepared(cfg, job, test_user, world_tmp)

    def refused(conn, xml, paused=False):
        raise virt.ShareUnreachable("QEMU could not connect to the job's virtiofsd: "
                                    "Connection refused", "see the log")
    monkeypatch.setattr(virt, "start", refused)
    with pytest.raises(TransientError) as e:
        lifecycle.boot(cfg, st, cfg.environments["t"], time.monotonic() + 30)
    shares = [share.Share(**d) for d in state.load(cfg, job).shares]
    started += [s.pid for s in shares]
    assert e.value.problem.startswith("QEMU could not connect to the job's virtiofsd: "
                                      "Connection refused; ")
    assert f"virtiofsd {shares[0].pid} for {world_tmp} waits on its socket" in e.value.problem
    lifecycle.destroy(cfg, job)
    assert all(not share._is_ours(s) for s in shares)


@ROOT_ONLY
def test_a_start_retried_on_another_port_gets_fresh_virtiofsd(
        node, monkeypatch, test_user, world_tmp, caplog):
    """A QEMU whose SSH port was taken connected to each virtiofsd before it failed, and
    a virtiofsd serves one connection only: the retry on another port must start fresh
    ones (the same ones refused QEMU, which failed a fresh-machine check's job)."""
    cfg, base, started = node
    caplog.set_level("INFO")
    job = f"11.{os.getpid()}.teardown"
    st = _prepared(cfg, job, test_user, world_tmp)
    starts = []  # (port, the shares' (pid, running) at each start)

    class Seen(Exception):
        pass

    def start(conn, xml, paused=False):
        rec = state.load(cfg, job)
        shares = [share.Share(**d) for d in rec.shares]
        for s in shares:
            started.append(s.pid)
        starts.append((rec.port, [(s.pid, share._is_ours(s)) for s in shares]))
        if len(starts) == 1:
            raise virt.PortTaken("the forwarded SSH port is taken: Could not set up host "
                                 "forwarding rule", "see the log")
        raise Seen()  # the retry's start: what it was given is all this test needs
    monkeypatch.setattr(virt, "start", start)
    with pytest.raises(Seen):
        lifecycle.boot(cfg, st, cfg.environments["t"], time.monotonic() + 30)
    (port1, first), (port2, second) = starts
    assert port2 != port1
    assert [alive for _, alive in first] == [True] and [alive for _, alive in second] == [True]
    assert first[0][0] != second[0][0]  # a fresh virtiofsd
    old = share.Share(**{**state.load(cfg, job).shares[0], "pid": first[0][0]})
    assert not share._is_ours(old)  # the one the failed QEMU took is gone
    assert f"SSH port taken by another process; retrying on {port2}" in caplog.text
    lifecycle.destroy(cfg, job)
    assert not share._is_ours(share.Share(**{**old.__dict__, "pid": second[0][0]}))


def test_teardown_sets_the_disk_and_seed_aside_before_it_looks_for_the_domain(
        node, monkeypatch, test_user, world_tmp):
    """A warden SIGKILLed inside libvirt's createXML leaves that call to libvirtd,
    which may start the domain after the teardown looked for it (the fresh-machine
    check left such a domain behind): the start must find neither disk nor seed."""
    from vmwn import disk
    cfg, base, started = node
    job = f"10.{os.getpid()}.teardown"
    st = _prepared(cfg, job, test_user, world_tmp)
    for path in (st.overlay, st.seed):
        with open(path, "w") as f:
            f.write("x")
    seen = []
    real = virt.connect

    def connect(uri):
        seen.append([os.path.exists(p) for p in (st.overlay, st.seed, disk.aside(st.overlay),
                                                 disk.aside(st.seed))])
        return real(uri)
    monkeypatch.setattr(virt, "connect", connect)
    removed = lifecycle.destroy(cfg, job)
    assert seen[0] == [False, False, True, True]
    assert f"overlay {st.overlay}" in removed
    assert not os.path.exists(disk.aside(st.overlay))
    assert not os.path.exists(state.job_dir(cfg, job))


def _mounted_spec(cfg, job, user, workdir):
    """A job of ``user`` in the mounted environment "t", working in ``workdir``."""
    e = cfg.env("t")
    return JobSpec(job_id=job, user=user.pw_name, uid=user.pw_uid, gid=user.pw_gid,
                   group=grp.getgrgid(user.pw_gid).gr_name, job_name="t", env=e, vcpus=1,
                   memory_mib=e.memory_mib, workdir=workdir, host_workdir=workdir)


@ROOT_ONLY
def test_a_create_that_cannot_reach_libvirt_leaves_no_virtiofsd(node, monkeypatch, test_user,
                                                                  world_tmp):
    """The shares start before the domain; a libvirtd that is down then failed the
    create, whose teardown gave up at libvirt before it stopped them and removed the
    record that named them: every virtiofsd ran on (seen on a node whose libvirtd
    had not come up)."""
    cfg, base, started = node
    cfg = dataclasses.replace(cfg, site={**cfg.site, "libvirt_uri":
                                         f"qemu:///system?socket={base}/no-libvirtd.sock"})
    job = f"8.{os.getpid()}.teardown"
    spec = _mounted_spec(cfg, job, test_user, world_tmp)
    seen = []
    real = share.start

    def noting(st, shares, virtiofsd=share.VIRTIOFSD):
        out = real(st, shares, virtiofsd)
        seen.extend(s.pid for s in shares)
        for s in shares:
            started.append(s.pid)
        return out
    monkeypatch.setattr(share, "start", noting)
    with pytest.raises(SiteError, match="cannot reach libvirt"):
        lifecycle.create(cfg, spec, time.monotonic() + 60)
    assert seen and all(started.gone(pid) for pid in seen), seen
    assert not os.path.exists(state.job_dir(cfg, job))


@ROOT_ONLY
def test_a_working_directory_whose_path_is_not_utf8_is_refused_before_anything_starts(
        node, test_user, world_tmp):
    """Its path would reach the guest's seed as text: the job's owner is told, and no
    virtiofsd, overlay or state is left."""
    cfg, base, started = node
    workdir = os.path.join(world_tmp, "r\udce9sultat")
    os.mkdir(workdir)
    os.chown(workdir, test_user.pw_uid, test_user.pw_gid)
    job = f"9.{os.getpid()}.teardown"
    spec = _mounted_spec(cfg, job, test_user, workdir)
    with pytest.raises(UserError, match=r"r\\xe9sultat cannot be mounted .* not UTF-8"):
        lifecycle.create(cfg, spec, time.monotonic() + 60)
    assert not os.path.exists(state.job_dir(cfg, job))
    assert not os.path.exists(os.path.join(cfg.site["overlay_dir"],
                                           state.safe_name(job) + ".qcow2"))
