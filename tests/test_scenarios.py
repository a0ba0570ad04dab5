"""The scenarios every batch system vmwn supports must pass, written once and run
under each real one with its own commands: a real Torque 6.1 (tests/torquelib.py),
a real OpenPBS (tests/test_openpbs.py) and a real Slurm (tests/test_slurm.py).  What differs between them (how a
job asks for an environment, how its state and exit status are read, where a
refusal reaches its owner) is in one small adapter per batch system below;
what a batch system alone does stays in its own test module.
"""

import os
import re
import select
import shlex
import shutil
import time

import pytest

import torquelib
import test_openpbs as opbs
import test_slurm as sl
from test_openpbs import openpbs, workdir  # noqa: F401  (fixtures)
from test_slurm import slurm  # noqa: F401  (fixture)
from vmwn.domain import domain_name, guest_hostname
from vmwn_testlib import holds_for, needs_image, wait_for_text, wait_until

pytestmark = [pytest.mark.integration, needs_image("tiny")]


def _domstate(job_id):
    cp = torquelib.run(["virsh", "-c", "qemu:///system", "domstate", domain_name(job_id)],
                       check=False)
    return cp.stdout.strip()


def _keeper_of(job_id):
    """The pid of the keeper serving ``job_id``'s domain (vmwn.keeper), or None."""
    want = f"\0--domain\0{domain_name(job_id)}\0".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = b"\0" + f.read()
            if os.path.basename(os.readlink(f"/proc/{pid}/exe")) == "keeper" and \
                    want in cmdline:
                return int(pid)
        except OSError:
            continue
    return None


class _Batch:
    """What both adapters do the same way over their cluster object ``c``."""

    def __init__(self, cluster):
        self.c, self.user = cluster, cluster.user

    def submit(self, workdir, script, options="", name="job.sh"):
        return self.c.submit(workdir, script, options, name)

    def qsig(self, job, sig):
        self.command("qsig", "-s", sig, job)

    def qdel(self, job):
        self.command("qdel", job)

    @staticmethod
    def subjob(job, i):
        """12[].srv (as both print an array's id) -> 12[i].srv"""
        head, _, tail = job.partition("[]")
        return f"{head}[{i}]{tail}"


class Torque(_Batch):
    @staticmethod
    def vm(env):
        return f"-l other=vmwn={env}"

    def finish(self, job, timeout=240):
        """The job's exit status once it has ended."""
        return int(self.c.wait(job, timeout=timeout)["exit_status"])

    def output(self, workdir, job, name="job.sh"):
        return self.c.wait_output(workdir, job, name)

    def command(self, *argv):
        torquelib.run(list(argv))

    def interactive_argv(self, workdir, options):
        return ["su", "-s", "/bin/sh", self.user.pw_name, "-c",
                f"cd {shlex.quote(workdir)} && PATH={shlex.quote(torquelib.PATH)} "
                f"qsub -I {options}"]

    def refusal(self, workdir, env):
        """(what the owner reads, and where): Torque's server knows no environments,
        so the job starts and the starter refuses it in its .e file."""
        job = self.submit(workdir, "#!/bin/sh\necho never\n", self.vm(env))
        st = self.c.wait(job)
        out, err = self.output(workdir, job)
        assert st["exit_status"] != "0" and "never" not in out, (st, out, err)
        assert st["start_count"] == "1", st  # the owner's mistake: not requeued
        self.clean(job)
        return err

    def clean(self, job):
        assert torquelib.wait_clean(job) == []

    def starts(self, job):
        return int(self.c.stat(job)["start_count"])

    @staticmethod
    def array(n):
        return f"-t 1-{n}"

    ARRAY_INDEX = "PBS_ARRAYID"


class OpenPBS(_Batch):
    @staticmethod
    def vm(env):
        return f"-l vmwn={env}"

    def finish(self, job, timeout=240):
        return int(self.c.wait(job, timeout=timeout)["Exit_status"])

    def output(self, workdir, job, name="job.sh"):
        return self.c.output(workdir, job, name)

    def command(self, *argv):
        cp = opbs.pbs(*argv)
        assert cp.returncode == 0, (argv, cp.stderr)

    def interactive_argv(self, workdir, options):
        return opbs.in_ns("su", "-s", "/bin/sh", self.user.pw_name, "-c",
                          f"cd {shlex.quote(workdir)} && {opbs.PREFIX}/bin/qsub -I {options}")

    def refusal(self, workdir, env):
        """OpenPBS's queuejob hook refuses at qsub: the reason is on the terminal."""
        cp, job = self.c.qsub(workdir, "#!/bin/sh\necho never\n", self.vm(env))
        assert cp.returncode != 0 and not job, (cp.stdout, cp.stderr)
        return cp.stderr

    def clean(self, job):
        opbs.assert_clean(job)

    def starts(self, job):
        return int(self.c.stat(job)["run_count"])

    @staticmethod
    def array(n):
        return f"-J 1-{n}"

    ARRAY_INDEX = "PBS_ARRAY_INDEX"


class Slurm(_Batch):
    """sbatch with the files the PBS moms would write (NAME.oID, NAME.eID) and the
    umask they give a job (077): under Slurm the submitter's umask is the job's."""

    @staticmethod
    def vm(env):
        return f"--vmwn={env}"

    def submit(self, workdir, script, options="", name="job.sh"):
        cp, job = self.c.sbatch(workdir, script, f"-o {name}.o%j -e {name}.e%j {options}",
                                name, umask=0o077)
        assert cp.returncode == 0 and job, f"sbatch failed: {cp.stderr.strip()}"
        return job

    def finish(self, job, timeout=240):
        return self.c.finish(job, timeout)

    def output(self, workdir, job, name="job.sh"):
        return tuple(_read(os.path.join(workdir, f"{name}.{k}{job}")) for k in "oe")

    def qsig(self, job, sig):
        if sig in ("suspend", "resume"):  # an administrator's, as qsig -s suspend is
            cp = sl.run(["scontrol", sig, job])
        else:
            cp = self.c.as_user(f"scancel --batch --signal={sig.removeprefix('SIG')} {job}",
                                "/")
        assert cp.returncode == 0, (sig, cp.stderr)

    def qdel(self, job):
        cp = self.c.as_user(f"scancel {job}", "/")
        assert cp.returncode == 0, cp.stderr

    def interactive_argv(self, workdir, options):
        pytest.skip("salloc --vmwn is refused at submission (a VM is a job's, not an "
                    "allocation's): tests/test_slurm.py checks the refusal")

    def refusal(self, workdir, env):
        """The plugin refuses at sbatch: the reason is on the terminal."""
        cp, job = self.c.sbatch(workdir, "#!/bin/sh\necho never\n", self.vm(env))
        assert cp.returncode != 0 and not job, (cp.stdout, cp.stderr)
        self.c.assert_idle()
        return cp.stderr

    def clean(self, job):
        sl.assert_clean(job)
        self.c.assert_idle()  # never drained

    def starts(self, job):
        return int(self.c.show(job)["Restarts"]) + 1

    def subjob(self, job, i):
        """An array task has a job id of its own once it starts (the array's own id
        goes to one of them), which names its VM."""
        def started():
            cp = sl.run(["scontrol", "-o", "show", "job", f"{job}_{i}"])
            for line in cp.stdout.splitlines():  # one line a record
                rec = dict(re.findall(r"(\w+)=(\S*)", line))
                if rec.get("ArrayTaskId") == str(i) and rec.get("JobState") != "PENDING":
                    return rec["JobId"]
            return None
        return wait_until(started, 120, f"array task {job}_{i} to start", interval=0.2)

    @staticmethod
    def array(n):
        return f"--array=1-{n}"

    ARRAY_INDEX = "SLURM_ARRAY_TASK_ID"


@pytest.fixture(params=[pytest.param("torque", marks=pytest.mark.torque),
                        pytest.param("openpbs", marks=pytest.mark.openpbs),
                        pytest.param("slurm", marks=pytest.mark.slurm)])
def batch(request):
    if request.param == "torque":
        return Torque(request.getfixturevalue("torque_cluster"))
    if request.param == "slurm":
        return Slurm(request.getfixturevalue("slurm"))
    return OpenPBS(request.getfixturevalue("openpbs"))


def _read(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _release(batch, workdir, name):
    """A file the job waits for, made as its owner."""
    path = os.path.join(workdir, name)
    with open(path, "w", encoding="ascii"):
        pass
    os.chown(path, batch.user.pw_uid, batch.user.pw_gid)


JOB = """#!/bin/sh
echo "on $(hostname)"
cd "${PBS_O_WORKDIR:-$SLURM_SUBMIT_DIR}" && echo made > made-in-guest
echo to-stderr >&2
exit 3
"""


def test_a_vm_job_keeps_its_exit_status_output_and_files(batch, workdir):
    job = batch.submit(workdir, JOB, batch.vm("tiny"))
    status = batch.finish(job)
    out, err = batch.output(workdir, job)
    assert status == 3, (status, out, err)
    assert f"on {guest_hostname(job)}" in out, (out, err)
    assert "to-stderr" in err, err
    made = os.path.join(workdir, "made-in-guest")
    assert _read(made) == "made\n"
    assert os.stat(made).st_uid == batch.user.pw_uid  # written with the owner's rights
    batch.clean(job)


WARM_JOB = """#!/bin/sh
cat /proc/cmdline
cd "${PBS_O_WORKDIR:-$SLURM_SUBMIT_DIR}" && echo made > made-in-warm-guest
exit 4
"""


def test_a_warm_job_is_restored_with_its_directory_mounted(batch, workdir, prepared_tinywarm):
    """A job of an environment with warm = on (the mounted mode) is restored, not
    booted, and keeps its exit status, output and files as a booted one does."""
    job = batch.submit(workdir, WARM_JOB, batch.vm(prepared_tinywarm))
    status = batch.finish(job)
    out, err = batch.output(workdir, job)
    assert status == 4, (status, out, err)
    assert "vmwn.warm=1" in out, ("the job's guest was booted, not restored", out, err)
    made = os.path.join(workdir, "made-in-warm-guest")
    assert _read(made) == "made\n"
    assert os.stat(made).st_uid == batch.user.pw_uid  # through the hot-plugged share
    batch.clean(job)


def test_the_vmwn_env_variable_asks_for_a_vm_too(batch, workdir):
    if isinstance(batch, Slurm):
        pytest.skip("under Slurm a job asks with --vmwn (or #SBATCH --vmwn) only")
    job = batch.submit(workdir, JOB, "-v VMWN_ENV=tiny")
    status = batch.finish(job)
    out, err = batch.output(workdir, job)
    assert status == 3 and f"on {guest_hostname(job)}" in out, (status, out, err)
    batch.clean(job)


def test_a_job_without_vmwn_runs_natively_and_hears_nothing_of_it(batch, workdir):
    job = batch.submit(workdir, JOB)
    status = batch.finish(job)
    out, err = batch.output(workdir, job)
    assert status == 3, (status, out, err)
    assert f"on {os.uname().nodename}" in out, out
    assert err == "to-stderr\n", err  # not one line of vmwn's
    batch.clean(job)


WHERE = """#!/bin/sh
echo "pwd=$(pwd) umask=$(umask)"
"""


def test_a_vm_job_starts_where_a_native_one_does_with_its_umask(batch, workdir):
    """The directory a job starts in and its umask are the batch system's: the guest
    job gets what the same job gets natively."""
    native = batch.submit(workdir, WHERE, name="native.sh")
    vm = batch.submit(workdir, WHERE, batch.vm("tiny"), name="vm.sh")
    assert batch.finish(native) == 0 and batch.finish(vm) == 0
    want, _ = batch.output(workdir, native, "native.sh")
    got, err = batch.output(workdir, vm, "vm.sh")
    assert want.startswith("pwd=/") and got == want, (want, got, err)
    batch.clean(vm)


@pytest.mark.exclusive  # the test user's home and keys, which every lane's jobs use
def test_a_job_from_home_keeps_the_users_keys_and_its_files_private(batch, test_user):
    """Most users submit from $HOME, and most have ~/.ssh/authorized_keys: the job's
    file is written with the job's umask (both moms give 077, the Slurm adapter submits
    with it), the keys are untouched
    and vmwn leaves nothing in the home."""
    home = test_user.pw_dir
    before = set(os.listdir(home))
    ssh = os.path.join(home, ".ssh")
    keys = os.path.join(ssh, "authorized_keys")
    mine = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMine me@laptop\n"
    os.makedirs(ssh, exist_ok=True)
    try:
        with open(keys, "rb") as f:
            kept = f.read()  # the account's own, put back after
    except FileNotFoundError:
        kept = None
    with open(keys, "w", encoding="ascii") as f:
        f.write(mine)
    for p in (ssh, keys):
        os.chown(p, test_user.pw_uid, test_user.pw_gid)
    os.chmod(ssh, 0o700)
    os.chmod(keys, 0o600)
    made = os.path.join(home, "from-home.txt")
    try:
        job = batch.submit(home, '#!/bin/sh\ncd "${PBS_O_WORKDIR:-$SLURM_SUBMIT_DIR}"\n'
                           'echo kept > from-home.txt\n',
                           batch.vm("tiny"), name="home.sh")
        status = batch.finish(job)
        out, err = batch.output(home, job, "home.sh")
        assert status == 0, (status, out, err)
        assert _read(made) == "kept\n"
        assert os.stat(made).st_mode & 0o777 == 0o600
        assert _read(keys) == mine
        new = set(os.listdir(home)) - before - {".ssh", "from-home.txt", "home.sh"}
        assert all(n.startswith("home.sh.") for n in new), new  # the job's .o and .e only
        batch.clean(job)
    finally:
        for n in set(os.listdir(home)) - before:
            p = os.path.join(home, n)
            if os.path.isfile(p):
                os.unlink(p)
        if ".ssh" not in before:
            shutil.rmtree(ssh, ignore_errors=True)
        elif kept is None:
            os.unlink(keys)
        else:
            with open(keys, "wb") as f:
                f.write(kept)


def test_array_subjobs_each_run_in_a_guest_of_their_own(batch, workdir):
    script = f"#!/bin/sh\necho \"on $(hostname) index=${{{batch.ARRAY_INDEX}}}\"\n"
    job = batch.submit(workdir, script, f"{batch.vm('tiny')} {batch.array(2)}")
    for i in (1, 2):
        sub = batch.subjob(job, i)
        status = batch.finish(sub)
        out, err = batch.output(workdir, sub)
        assert status == 0, (sub, status, out, err)
        assert out == f"on {guest_hostname(sub)} index={i}\n", (sub, out, err)
        batch.clean(sub)


def test_a_guest_that_never_boots_fails_its_job_once_with_the_reason(batch, workdir):
    """The guest is booted [site] boot_attempts (2) times within the one start; then the
    job fails with the reason in its error file, and is not started again."""
    job = batch.submit(workdir, JOB, batch.vm("stuck"))
    status = batch.finish(job, timeout=180)
    out, err = batch.output(workdir, job)
    assert status not in (0, 3) and "on " not in out, (status, out, err)
    said = [ln for ln in err.splitlines() if "vmwn:" in ln]
    assert len(said) == 1 and "did not start in 2 attempts" in said[0], err
    assert "vmwn check --boot stuck" in said[0] and "requeue" not in said[0], said
    assert batch.starts(job) == 1
    batch.clean(job)


def test_a_start_that_may_pass_is_retried_a_bounded_number_of_times(batch, workdir):
    """A missing image is the site's, and another start may find it: the job is started
    again up to [site] start_attempts (2), then fails with the count and the reason."""
    job = batch.submit(workdir, JOB, batch.vm("ghost"))
    status = batch.finish(job, timeout=120)
    out, err = batch.output(workdir, job)
    assert status not in (0, 3) and "on " not in out, (status, out, err)
    said = [ln for ln in err.splitlines() if "vmwn:" in ln]
    assert len(said) == 1 and "could not be prepared in 2 starts" in said[0], err
    assert "vmwn image build ghost" in said[0], said
    assert batch.starts(job) == 2
    batch.clean(job)


@pytest.mark.exclusive  # moves the node's vmwn.conf away under every other lane
def test_a_native_job_runs_when_vmwn_conf_is_missing(batch, workdir):
    conf = "/etc/vmwn/vmwn.conf"
    os.rename(conf, conf + ".away")
    try:
        job = batch.submit(workdir, JOB)
        status = batch.finish(job)
    finally:
        os.rename(conf + ".away", conf)
    out, err = batch.output(workdir, job)
    assert status == 3 and f"on {os.uname().nodename}" in out, (status, out, err)
    assert err == "to-stderr\n", err
    batch.clean(job)


def test_an_unknown_environment_is_refused_in_one_line_its_owner_reads(batch, workdir):
    said = [ln for ln in batch.refusal(workdir, "nosuch").splitlines() if "vmwn:" in ln]
    assert len(said) == 1, said
    assert "unknown vmwn environment 'nosuch'" in said[0], said
    assert "request one of: " in said[0] and "tiny" in said[0], said


SIGNALS = """#!/bin/sh
cd "${PBS_O_WORKDIR:-$SLURM_SUBMIT_DIR}"
trap 'echo TERM >> sigs' TERM
trap 'echo USR1 >> sigs' USR1
trap 'echo USR2 >> sigs' USR2
echo started > started
i=0
while [ ! -e stop ] && ! grep -q TERM sigs 2>/dev/null && [ $i -lt 1500 ]; do
    sleep 0.2; i=$((i+1))
done
sleep 1  # a repeated signal would arrive here
exit 0
"""


def test_a_signal_runs_the_jobs_trap_once(batch, workdir):
    job = batch.submit(workdir, SIGNALS, batch.vm("tiny"))
    wait_for_text(os.path.join(workdir, "started"), "started", 180, "the guest job to start")
    sigs = os.path.join(workdir, "sigs")
    batch.qsig(job, "SIGUSR1")
    wait_for_text(sigs, "USR1", 60, "the job's USR1 trap")
    # A barrier: a repeat of that USR1 (a batch daemon may send one within
    # milliseconds) would reach the job before this USR2, which the relay keeps in order.
    batch.qsig(job, "SIGUSR2")
    wait_for_text(sigs, "USR2", 60, "the job's USR2 trap")
    _release(batch, workdir, "stop")
    assert batch.finish(job) == 0
    assert _read(sigs) == "USR1\nUSR2\n"
    batch.clean(job)


def test_a_delete_gives_the_guest_job_one_term(batch, workdir):
    job = batch.submit(workdir, SIGNALS, batch.vm("tiny"))
    wait_for_text(os.path.join(workdir, "started"), "started", 180, "the guest job to start")
    batch.qdel(job)
    batch.finish(job)
    assert _read(os.path.join(workdir, "sigs")) == "TERM\n"
    batch.clean(job)


CLOCK = """#!/bin/sh
cd "${PBS_O_WORKDIR:-$SLURM_SUBMIT_DIR}"
echo started > started
i=0
while [ ! -e stop ] && [ $i -lt 3000 ]; do echo tick >> ticks; sleep 0.1; i=$((i+1)); done
"""


def test_suspend_pauses_the_guest_and_resume_continues_it(batch, workdir):
    job = batch.submit(workdir, CLOCK, batch.vm("tiny"))
    ticks = os.path.join(workdir, "ticks")
    wait_for_text(os.path.join(workdir, "started"), "started", 180, "the guest job to start")
    wait_for_text(ticks, "tick", 30, "the job's first tick")
    # The job's warden has handed it to the keeper, which pauses and resumes the VM.
    keeper = wait_until(lambda: _keeper_of(job), 30, "the keeper to take over from the warden")
    batch.qsig(job, "suspend")
    wait_until(lambda: _domstate(job) == "paused", 30, "the guest to be paused")
    n = _read(ticks).count("tick")
    # Its clock-driven output stopped: nothing can signal that nothing happens, so
    # it is watched over 20 of its ticks (0.1 s each), failing at the first.
    holds_for(lambda: _read(ticks).count("tick") == n, 2,
              "the suspended job's clock-driven output went on")
    batch.qsig(job, "resume")
    wait_until(lambda: _read(ticks).count("tick") > n, 30, "the resumed job to tick again")
    assert _domstate(job) == "running"
    _release(batch, workdir, "stop")
    assert batch.finish(job) == 0
    wait_until(lambda: not os.path.exists(f"/proc/{keeper}"), 30, "the keeper to end")
    batch.clean(job)


def _on_a_terminal(argv, typed, timeout=180):
    """Run ``argv`` (qsub -I) on a pseudo-terminal; type ``typed`` once qsub says the
    job is ready (before the guest is, as a user would); everything it printed."""
    import pty
    pid, fd = pty.fork()
    if pid == 0:
        try:
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)
    buf, sent, end = b"", False, time.monotonic() + timeout
    try:
        while time.monotonic() < end:
            r, _, _ = select.select([fd], [], [], end - time.monotonic())
            if not r:
                continue
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: the terminal's other side has gone
                break
            if not data:
                break
            buf += data
            if not sent and re.search(rb"qsub: job \S+ ready", buf):
                os.write(fd, typed)
                sent = True
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
        os.close(fd)
    return buf.decode("utf-8", "replace")


def test_an_interactive_job_gets_a_terminal_in_its_guest(batch, workdir):
    """qsub -I: the user's terminal is the guest's, what was typed before the guest
    was up is kept, and the job leaves nothing."""
    out = _on_a_terminal(batch.interactive_argv(workdir, batch.vm("tiny")),
                         b"echo MARK-$(hostname)-$(tty); exit\n")
    m = re.search(r"qsub: job (\S+) ready", out)
    assert m, out
    job = m.group(1)
    assert f"MARK-{guest_hostname(job)}-/dev/pts/" in out, out
    batch.finish(job)
    batch.clean(job)
