"""Faults during a VM job, each through the installed hooks under pbs_mom's conventions.

Every test drives one job with vmwn.torque.harness (prologue as root in its own
session under the alarm, the job starter as the job user, the epilogue with
its 11 arguments), injects one fault, and checks three things: the job ends
the way its user would expect, its .e file says why, and nothing of the job
(domain, overlay, seed, key, state) is left on the node.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time

import pytest

from conftest import REPO, user_python_path
from vmwn_testlib import IMAGE_DIR, leftovers, pidfd_wait, worker_ports, write_launcher

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not all(os.path.exists(os.path.join(IMAGE_DIR, "tiny", f))
                                         for f in ("disk.qcow2", "vmlinuz", "initrd.img"))
                                 or os.geteuid() != 0,
                                 reason="needs root and the tiny image")]

GUEST_LOST = 253
LIBVIRT_SOCK = "/var/run/libvirt/libvirt-sock"

JOB = """#!/bin/sh
cd "$PBS_O_WORKDIR"
printf 'written before the fault\\n' > kept.txt
echo started
sleep 300
echo never
"""



class Node:
    """A Torque node tree with vmwn installed, in a world-searchable temporary directory.
    Its state directory is its own, so its port lock is too: the nodes of tests that
    run in parallel lanes take their ports from the lane's own slice of the range."""

    def __init__(self, root, user, site_extra=""):
        from vmwn import config
        from vmwn.torque import install
        self.root, self.user = root, user
        self.conf = os.path.join(root, "etc", "vmwn", "vmwn.conf")
        self.debug_log = os.path.join(root, "debug.log")
        os.makedirs(os.path.dirname(self.conf))
        tiny = ("image = tiny/disk.qcow2\nkernel = tiny/vmlinuz\ninitrd = tiny/initrd.img\n"
                "accel = qemu\nmemory = 256M\n")
        with open(self.conf, "w") as f:
            f.write(f"[site]\nemulator = {write_launcher(root)}\n"
                    f"state_dir = {root}/state\noverlay_dir = {root}/overlays\n"
                    f"pbs_home = {root}/torque\nimage_dir = {IMAGE_DIR}\nsyslog = no\n"
                    f"debug_log = {self.debug_log}\nport_range = {worker_ports('43000-43499')}\n"
                    f"boot_timeout = 120\nboot_attempts = 2\n{site_extra}\n"
                    f"[env tiny]\n{tiny}cmdline = console=ttyS0 no_timer_check quiet\ndata = copy\n\n"
                    f"[env tinymount]\n{tiny}cmdline = console=ttyS0 no_timer_check quiet\n\n"
                    # A guest whose kernel never finds an init: it runs, but SSH never answers.
                    f"[env hang]\n{tiny}cmdline = console=ttyS0 no_timer_check rdinit=/nonexistent\n"
                    "boot_timeout = 8\n")
        python, path = user_python_path()
        install.install(install.build_parser().parse_args(
            ["install", "--pbs-home", f"{root}/torque", "--sysconfdir", f"{root}/etc",
             "--prefix", f"{root}/prefix", "--python", python, "--pythonpath", path]))
        # Job ids (and so domain names) must not collide with other nodes' tests
        # sharing this libvirtd: start the sequence somewhere of this node's own.
        with open(os.path.join(root, "torque", "mom_priv", "vmwn-run.seq"), "w") as f:
            f.write(f"{int.from_bytes(os.urandom(3), 'big') * 100}\n")
        self.submit = os.path.join(root, "submit")
        os.mkdir(self.submit)
        os.chown(self.submit, user.pw_uid, user.pw_gid)
        self.cfg = config.load(self.conf)

    def job(self, script=JOB, resources=("other=vmwn=tiny",), alarm=300, name="job.sh"):
        return Run(self, script, resources, alarm, name)

    def sweep(self):
        """After the test, pass or fail: every job of this node is gone from the mom,
        so a reap removes whatever a failed assertion left (domains included)."""
        from vmwn import reap
        from vmwn.torque import pbs
        jobs = os.path.join(self.root, "torque", "mom_priv", "jobs")
        for name in os.listdir(jobs) if os.path.isdir(jobs) else []:
            os.unlink(os.path.join(jobs, name))
        reap.Reaper(self.cfg, pbs.MomJobs(os.path.join(self.root, "torque")).present, grace=0).run()

    def logs(self):
        try:
            with open(self.debug_log, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""


@pytest.fixture
def node(world_tmp, test_user):
    n = Node(world_tmp, test_user)
    yield n
    n.sweep()


class Run:
    """One job's three steps, each callable on its own so faults can go between them."""

    def __init__(self, node, script, resources, alarm, name):
        from vmwn import cli
        from vmwn.torque import harness
        self.node = node
        path = os.path.join(node.submit, name)
        with open(path, "w") as f:
            f.write(script)
        os.chown(path, node.user.pw_uid, node.user.pw_gid)
        argv = ["--config", node.conf, "run", "-u", node.user.pw_name,
                "--prologalarm", str(alarm)]
        for r in resources:
            argv += ["-l", r]
        args = cli.build_parser().parse_args(argv + [name])
        with contextlib.chdir(node.submit):
            self.job = harness.Job.prepare(args, node.cfg)
        self.job.cancelled = None
        self.job.starter_pid = None
        self.id = self.job.job_id
        self.prologue_rc = None
        self.result = None
        self.thread = None

    # -- the steps -----------------------------------------------------------
    def prologue(self):
        j = self.job
        self.prologue_rc = j.run_hook("prologue", [j.job_id, j.user, j.group, j.name,
                                                   j.resource_string, j.args.queue,
                                                   j.args.account, j.sc])
        return self.prologue_rc

    def wait_ready(self, timeout=120):
        """Until the job's warden has the guest up (the prologue only started it)."""
        from vmwn import state

        def ready():
            try:
                st = state.load(self.node.cfg, self.id)
            except state.NoSuchJob:
                return None
            assert st.phase != "failed", "the guest did not boot"
            return st if st.phase == "running" else None
        return wait_for(ready, timeout, "the guest to be ready")

    def start(self):
        def body():
            self.result = self.job.run_starter()
        self.thread = threading.Thread(target=body, daemon=True)
        self.thread.start()

    def wait_output(self, text, timeout=60):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with open(self.job.ou, encoding="utf-8", errors="replace") as f:
                if text in f.read():
                    return
            assert self.thread is None or self.thread.is_alive() or self.result is None, \
                f"the starter ended before the job printed {text!r}: {_read(self.job.er)}"
            time.sleep(0.1)
        raise AssertionError(f"job {self.id} never printed {text!r}")

    def join(self, timeout=120):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the job starter did not end"
        return self.result

    def epilogue(self, status, sid=0):
        j = self.job
        used = "cput=00:00:00,vmem=0kb,walltime=00:00:01,mem=0kb,energy_used=0"
        return j.run_hook("epilogue", [j.job_id, j.user, j.group, j.name, str(sid),
                                       j.resource_string, used, j.args.queue, j.args.account,
                                       str(status), j.sc])

    def finish(self):
        """Deliver .o/.e when the job started (else they stay in spool) and drop job files."""
        if self.prologue_rc == 0:
            self.job.deliver()
        else:
            for p in (self.job.ou, self.job.er):
                shutil.copy(p, p + ".kept")
        self.job._remove_job_files()

    def run_all(self):
        """The whole job as pbs_mom runs it; returns the harness Outcome."""
        j = self.job
        outcome = j.run()
        self.prologue_rc = outcome.prologue if outcome.prologue is not None else 0
        self.result = (0, outcome.status, "")
        return outcome

    # -- what the user gets ---------------------------------------------------
    def texts(self):
        if self.prologue_rc == 0:
            paths = (self.job.out_path("o"), self.job.out_path("e"))
        else:
            paths = (self.job.ou + ".kept", self.job.er + ".kept")
        out = []
        for p in paths:
            with open(p, encoding="utf-8", errors="replace") as f:
                out.append(f.read())
        return out

    def workdir_file(self, name):
        p = os.path.join(self.node.submit, name)
        if not os.path.exists(p):
            return None
        with open(p, encoding="utf-8") as f:
            return f.read()

    def domain_state(self):
        from vmwn import state
        return state.load(self.node.cfg, self.id)

    def assert_clean(self):
        assert leftovers(self.node.cfg, self.id) == []
        assert not any(n.endswith(".qcow2") for n in _ls(self.node.cfg.site["overlay_dir"]))
        assert [n for n in _ls(self.node.cfg.site["state_dir"]) if not n.startswith(".")] == []


def _read(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError as e:
        return f"({e.strerror})"


def _ls(d):
    try:
        return os.listdir(d)
    except FileNotFoundError:
        return []


def qemu_pid(domain):
    with open(f"/var/run/libvirt/qemu/{domain}.pid") as f:
        return int(f.read().strip())


def wait_for(pred, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# ------------------------------------------------------------------- the faults

def test_guest_killed_mid_job_in_the_mounted_mode_loses_nothing_written(node):
    script = ('#!/bin/sh\ncd "$PBS_O_WORKDIR"\nhead -c 3000000 /dev/urandom > written.bin\n'
              'sync\necho started\nsleep 600\n')
    run = node.job(script, resources=("other=vmwn=tinymount",))
    assert run.prologue() == 0
    run.start()
    run.wait_output("started")
    with open(os.path.join(run.node.submit, "written.bin"), "rb") as f:
        before = f.read()
    assert len(before) == 3000000  # on the host while the job runs
    os.kill(qemu_pid(run.domain_state().domain), signal.SIGKILL)
    sid, status, _ = run.join()
    assert status == GUEST_LOST
    run.epilogue(status, sid)
    run.finish()
    _, err = run.texts()
    assert "virtual machine was lost" in err and "not copied back" not in err, err
    with open(os.path.join(run.node.submit, "written.bin"), "rb") as f:
        assert f.read() == before
    run.assert_clean()


def test_guest_killed_mid_job(node):
    run = node.job()
    assert run.prologue() == 0
    run.start()
    run.wait_output("started")
    os.kill(qemu_pid(run.domain_state().domain), signal.SIGKILL)
    sid, status, _ = run.join()
    assert status == GUEST_LOST
    run.epilogue(status, sid)
    run.finish()
    out, err = run.texts()
    assert "started" in out and "never" not in out
    assert "virtual machine was lost" in err, err
    assert "output not copied back" in err, err
    run.assert_clean()


def test_job_starter_sigkilled(node):
    run = node.job()
    assert run.prologue() == 0
    run.start()
    run.wait_output("started")
    os.kill(run.job.starter_pid, signal.SIGKILL)
    sid, status, _ = run.join()
    assert status == 256 + signal.SIGKILL
    run.epilogue(status, sid)
    run.finish()
    out, err = run.texts()
    assert "killed by SIGKILL" in err, err
    assert "still running in its virtual machine" in err, err
    # The guest was alive: what the job wrote before the fault is copied back.
    assert run.workdir_file("kept.txt") == "written before the fault\n"
    assert "copied back 1 files" in out, out
    run.assert_clean()


def test_warden_killed_mid_boot(node):
    # The boot happens in the job's warden, outside pbs_mom's alarm: SIGKILL it
    # while its guest boots.  The starter says so in one line; nothing is left.
    from vmwn import state
    run = node.job(resources=("other=vmwn=hang",))
    assert run.prologue() == 0
    st = wait_for(lambda: _warden_started(node, run.id), 20, "the warden")
    os.kill(st.warden_pid, signal.SIGKILL)
    run.start()
    _, status, _ = run.join()
    assert status == 2
    run.epilogue(status, sid=run.result[0])
    run.finish()
    _, err = run.texts()
    assert err.count("\n") == 1 and "warden ended before the guest was ready" in err, err
    assert not os.path.exists(state.job_dir(node.cfg, run.id))
    run.assert_clean()


def _wait_warden_ended(node, job_id, timeout):
    """Wait for the job's warden process to exit (through a pidfd on it)."""
    from vmwn import state, warden
    try:
        st = state.load(node.cfg, job_id)
    except state.NoSuchJob:
        return
    if not st.warden_pid:
        return
    try:
        fd = os.pidfd_open(st.warden_pid)
    except ProcessLookupError:
        return
    try:
        # Checked after the pidfd is held: the pid is still the warden's, not reused.
        if warden.proc_start_time(st.warden_pid) == st.warden_start:
            pidfd_wait(fd, timeout, f"the warden of job {job_id} to end")
    finally:
        os.close(fd)


def _warden_started(node, job_id):
    from vmwn import state
    try:
        st = state.load(node.cfg, job_id)
    except state.NoSuchJob:
        return None
    return st if st.warden_pid else None


def test_ssh_never_comes_up(node):
    run = node.job(resources=("other=vmwn=hang",))
    t = time.monotonic()
    assert run.prologue() == 0  # the warden boots; pbs_mom is not held up
    assert time.monotonic() - t < 5
    run.start()
    _, status, _ = run.join()
    assert status == 2  # the site's problem, told once: no requeue loop
    run.epilogue(status, sid=run.result[0])
    run.finish()
    _, err = run.texts()
    assert "did not start in 2 attempts" in err and "did not answer SSH within 8 s" in err \
        and "vmwn check --boot hang" in err, err
    run.assert_clean()


def test_state_directory_full(node):
    state_dir = node.cfg.site["state_dir"]
    os.makedirs(state_dir, mode=0o711, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0711", "tmpfs", state_dir],
                   check=True)
    try:
        with open(os.path.join(state_dir, "filler"), "wb") as f:
            with contextlib.suppress(OSError):
                f.write(b"\0" * (64 << 10))
        run = node.job()
        # No room even to count the job's starts: a requeue could loop without end,
        # so the job is aborted (exit 1) with the reason, never retried.
        assert run.prologue() == 1
        run.epilogue(-2)
        run.finish()
        _, err = run.texts()
        assert "No space left on device" in err and "state_dir" in err, err
        os.unlink(os.path.join(state_dir, "filler"))
        assert leftovers(node.cfg, run.id) == []
        assert [n for n in _ls(state_dir) if not n.startswith(".")] == []
        assert not any(n.endswith(".qcow2") for n in _ls(node.cfg.site["overlay_dir"]))
    finally:
        subprocess.run(["umount", "-l", state_dir], check=False)


def test_epilogue_run_twice(node):
    run = node.job(script='#!/bin/sh\ncd "$PBS_O_WORKDIR"\necho out > made.txt\necho done\n')
    outcome = run.run_all()
    assert outcome.status == 0
    assert run.workdir_file("made.txt") == "out\n"
    before = os.path.getsize(run.job.out_path("o"))
    # The mom's job files are gone; a second epilogue (mom retry) finds nothing to do.
    for p in (run.job.ou, run.job.er):
        open(p, "w").close()
        os.chown(p, node.user.pw_uid, node.user.pw_gid)
    assert run.epilogue(0) == 0
    assert open(run.job.er).read() == "" and open(run.job.ou).read() == ""
    assert os.path.getsize(run.job.out_path("o")) == before
    run.assert_clean()


def test_epilogue_for_a_job_whose_prologue_never_ran(node):
    run = node.job()
    assert run.epilogue(-3) == 0
    assert open(run.job.er).read() == "" and open(run.job.ou).read() == ""
    run.prologue_rc = 2
    run.finish()
    run.assert_clean()


def test_mom_restart_while_the_job_runs(node):
    from vmwn.torque import harness
    run = node.job()
    assert run.prologue() == 0
    run.start()
    run.wait_output("started")
    # pbs_mom goes down, the job's session with it; the restarted mom finds the
    # session gone and reports exit status 0.
    harness.signal_session(run.job.starter_pid, signal.SIGKILL)
    sid, _, _ = run.join()
    run.epilogue(0, sid)
    run.finish()
    out, err = run.texts()
    assert "still running in its virtual machine" in err, err
    assert "exit status 0 is not the job's own" in err
    assert run.workdir_file("kept.txt") == "written before the fault\n"
    run.assert_clean()


def _libvirtd_pids():
    r = subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True, text=True)
    return [int(p) for p in r.stdout.split()]


def _libvirt_answers():
    r = subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True,
                       timeout=20)
    return r.returncode == 0


@contextlib.contextmanager
def libvirtd_restored():
    """Whatever the test does to libvirtd, it runs and answers afterwards."""
    try:
        yield
    finally:
        if not _libvirtd_pids():
            subprocess.run([os.path.join(REPO, "scripts", "start-libvirtd")], check=False)
        wait_for(lambda: os.path.exists(LIBVIRT_SOCK) and _libvirt_answers(), 60,
                 "libvirtd to answer again")


@pytest.mark.exclusive  # stops the host's libvirtd under every other lane's guests
def test_libvirtd_stopped_during_the_boot(node):
    run = node.job()
    from vmwn import state
    with libvirtd_restored():
        assert run.prologue() == 0  # the job's warden boots the guest
        run.start()  # the job starter waits for the warden's answer
        # Stop libvirtd once the domain exists (the warden waits for SSH).
        def booting():
            try:
                st = state.load(node.cfg, run.id)
            except state.NoSuchJob:
                return False
            return os.path.exists(f"/var/run/libvirt/qemu/{st.domain}.pid")
        wait_for(booting, 60, "the domain to start")
        for pid in _libvirtd_pids():
            os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not _libvirtd_pids(), 30, "libvirtd to stop")
        _, status, _ = run.join()
        assert status == 2  # the site must act; told once, never requeued in a loop
        # The warden ends once its starter has gone: libvirtd comes back only after
        # it, so the epilogue (not the warden) removes what was left.
        _wait_warden_ended(node, run.id, 30)
    # libvirtd is back: the epilogue removes what the warden could not.
    run.epilogue(status, sid=run.result[0])
    run.finish()
    _, err = run.texts()
    assert "libvirt" in err, err
    # A domain libvirtd was creating when it died is adopted again some time
    # after its restart, possibly after the epilogue looked: the next reap
    # (every VM job's prologue runs one) removes it.
    from vmwn import reap
    from vmwn.torque import pbs
    end = time.monotonic() + 10
    while time.monotonic() < end and not leftovers(node.cfg, run.id):
        time.sleep(0.5)
    reap.Reaper(node.cfg, pbs.MomJobs(node.cfg.pbs_home).present, grace=0).run()
    run.assert_clean()


# Output a job flushed to its disk (sync, or older than the guest's ~30 s writeback)
# survives the VM; in the tiny environment the disk is /home.
SYNCED_JOB = """#!/bin/sh
cd "$PBS_O_WORKDIR"
printf 'written before the fault\\n' > kept.txt
mkdir -p 'out dir' && printf 'nested\\n' > 'out dir/n.txt'
sync
echo started
sleep 300
echo never
"""


def test_output_of_a_dead_guest_is_harvested_from_its_overlay(node):
    import tempfile
    u = node.user
    node.submit = tempfile.mkdtemp(prefix="vmwn-fault-", dir=u.pw_dir)
    os.chown(node.submit, u.pw_uid, u.pw_gid)
    try:
        run = node.job(script=SYNCED_JOB)
        assert run.prologue() == 0
        run.start()
        run.wait_output("started")
        os.kill(qemu_pid(run.domain_state().domain), signal.SIGKILL)
        sid, status, _ = run.join()
        assert status == GUEST_LOST
        run.epilogue(status, sid)
        run.finish()
        out, err = run.texts()
        assert run.workdir_file("kept.txt") == "written before the fault\n", (out, err)
        assert run.workdir_file("out dir/n.txt") == "nested\n"
        for name in ("kept.txt", "out dir/n.txt"):
            assert os.stat(os.path.join(node.submit, name)).st_uid == u.pw_uid
        # The job script was staged in and is unchanged: not copied back.
        assert "the VM was lost; recovered 2 files (32 bytes) from its disk in" in out, out
        assert "virtual machine was lost" in err and "output not copied back" not in err, err
        run.assert_clean()
    finally:
        shutil.rmtree(node.submit, ignore_errors=True)


def test_no_private_key_text_in_any_log_or_output(node):
    run = node.job(script='#!/bin/sh\necho hello\n')
    outcome = run.run_all()
    assert outcome.status == 0
    out, err = run.texts()
    logs = node.logs()
    assert "job " + run.id in logs  # the debug log did capture the job's steps
    for text in (out, err, logs):
        assert "PRIVATE KEY" not in text
    run.assert_clean()


FILLING_JOB = """#!/bin/sh
cd "$PBS_O_WORKDIR"
printf 'written before the disk filled\\n' > kept.txt
sync
echo started
dd if=/dev/urandom of=fill.bin bs=1M count=200 2>/dev/null; sync
echo never
"""


@pytest.fixture
def small_overlay_fs(node):
    """overlay_dir on a 2.5 GiB loop file system: room for one tiny guest's limit."""
    img = os.path.join(node.root, "overlays.img")
    mnt = os.path.join(node.root, "overlays")
    os.makedirs(mnt, exist_ok=True)
    subprocess.run(["truncate", "-s", "2560M", img], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-m", "0", img], check=True)
    subprocess.run(["mount", "-o", "loop", img, mnt], check=True)
    yield mnt
    subprocess.run(["umount", "-l", mnt], check=False)
    os.unlink(img)


def test_a_full_host_disk_pauses_one_guest_which_counts_as_lost_with_output_recovered(
        node, small_overlay_fs):
    import tempfile
    u = node.user
    node.submit = tempfile.mkdtemp(prefix="vmwn-fault-", dir=u.pw_dir)  # below /home: on disk
    os.chown(node.submit, u.pw_uid, u.pw_gid)
    filler = os.path.join(small_overlay_fs, "taken-by-something-else")
    try:
        run = node.job(script=FILLING_JOB)
        assert run.prologue() == 0  # admitted: the file system had room for its limit
        run.start()
        run.wait_output("started")
        # Then something outside vmwn takes the space the guest was promised.
        subprocess.run(["fallocate", "-l", str(_free_bytes(small_overlay_fs) - (1 << 20)),
                        filler], check=True)
        wait_for(lambda: _paused_on_io_error(run.domain_state().domain), 120,
                 "the guest to pause on its I/O error")
        os.kill(run.job.starter_pid, signal.SIGKILL)  # walltime: pbs_mom kills the starter
        sid, status, _ = run.join()
        run.epilogue(status, sid)
        run.finish()
        out, err = run.texts()
        assert run.workdir_file("kept.txt") == "written before the disk filled\n", (out, err)
        assert "the VM was lost; recovered" in out, out
        run.assert_clean()
    finally:
        if os.path.exists(filler):
            os.unlink(filler)
        shutil.rmtree(node.submit, ignore_errors=True)


def test_a_node_without_room_for_the_guests_disk_refuses_it_before_it_starts(
        node, small_overlay_fs):
    filler = os.path.join(small_overlay_fs, "taken-by-something-else")
    subprocess.run(["fallocate", "-l", str(1 << 30), filler], check=True)
    try:
        run = node.job()
        assert run.prologue() == 2  # requeued (counted; refused after start_attempts)
        assert sorted(os.listdir(small_overlay_fs)) == ["lost+found", "taken-by-something-else"]
        assert "no room for another guest disk" in node.logs()
        run.finish()
        run.assert_clean()
    finally:
        os.unlink(filler)


def _free_bytes(path):
    v = os.statvfs(path)
    return v.f_bavail * v.f_frsize


def _paused_on_io_error(name):
    from vmwn import virt
    conn = virt.connect("qemu:///system")
    try:
        dom = virt.lookup(conn, name)
        return dom is not None and virt.paused_on_io_error(dom)
    finally:
        conn.close()
