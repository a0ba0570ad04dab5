"""A real Torque for the tests: pbs_server, pbs_mom and pbs_sched on this host.

The cluster comes from ``scripts/torque-up`` (Torque built by ``make torque``),
vmwn goes into its pbs_mom with ``make install`` exactly as a site installs it,
and jobs are submitted with ``qsub`` by an unprivileged user.  What the tests
check is what that user sees: ``qstat -f``, the .o/.e files pbs_mom delivers,
the files in the working directory, and that nothing is left on the node.
"""

import os
import re
import shlex
import signal
import subprocess
import time

import pytest

from vmwn.domain import domain_name
from vmwn.state import safe_name
from vmwn_testlib import TINY, WARM, install_runtime, wait_until

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = os.environ.get("TORQUE_PREFIX", "/opt/vmwn-torque")
PBS_HOME = "/var/spool/torque"
CONF_D = "/etc/vmwn/vmwn.conf.d"
TEST_CONF = os.path.join(CONF_D, "50-batch-tests.conf")
PATH = f"{PREFIX}/bin:{PREFIX}/sbin:/usr/sbin:/usr/bin:/sbin:/bin"
VMWN = "/usr/local/bin/vmwn"  # make install's
STATE_DIR = "/var/lib/vmwn/jobs"
OVERLAY_DIR = "/var/lib/vmwn/overlays"

# Environments only the batch systems' tests use (tests/conftest.py's
# test_environments writes them for the session): 'stuck' boots a kernel whose init
# never starts (the guest never answers), 'ghost' names a missing image,
# 'tinycopy' is tiny with the copy data path.
# Every batch system's hooks, wardens and starters append here (the tests' hosts
# have no syslog); tests/conftest.py shows a failed test the lines it wrote.
DEBUG_LOG = "/var/log/vmwn-tests.log"
TEST_ENVS = f"""
[site]
boot_attempts = 2
start_attempts = 2
debug_log = {DEBUG_LOG}

[env stuck]
description = a guest that never boots (tests only)
kernel = tiny/vmlinuz
initrd = tiny/initrd.img
cmdline = console=ttyS0 no_timer_check rdinit=/nonexistent panic=0
accel = qemu
memory = 256M
boot_timeout = 6

[env tinycopy]
description = tiny with the copy data path (tests only)
data = copy
""" + ("warm = on\n" if WARM else "") + TINY + """
[env tinywarm]
description = tiny restored from a prepared guest, mounted (tests only)
warm = on
""" + TINY + """
[env tinynolo]
description = tiny without the host's loopback services (tests only)
network = no-loopback
""" + TINY + """
[env ghost]
description = an environment whose image is missing (tests only)
image = ghost/disk.qcow2
accel = qemu
memory = 256M
"""


def run(cmd, check=True, timeout=120, env=None, **kw):
    env = dict(env or os.environ, PATH=PATH)
    return subprocess.run(cmd, check=check, timeout=timeout, capture_output=True, text=True,
                          env=env, **kw)


class Cluster:
    """The running one-host cluster, as the tests' job submitter uses it."""

    def __init__(self, user):
        self.user = user
        self.submitted = []  # this process's jobs (a parallel run has two Torque lanes)

    def as_user(self, command, cwd, timeout=60):
        """Run a shell command as the job submitter in ``cwd``; returns CompletedProcess."""
        line = f"cd {shlex.quote(cwd)} && PATH={shlex.quote(PATH)} {command}"
        return run(["su", "-s", "/bin/sh", self.user.pw_name, "-c", line], check=False,
                   timeout=timeout)

    def submit(self, workdir, script, options="", name="job.sh"):
        """Write ``script`` into ``workdir`` and qsub it; returns the job id."""
        path = os.path.join(workdir, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(script)
        os.chown(path, self.user.pw_uid, self.user.pw_gid)
        os.chmod(path, 0o755)
        cp = self.as_user(f"qsub {options} {shlex.quote(name)}", workdir)
        assert cp.returncode == 0, f"qsub failed: {cp.stderr.strip()}"
        self.submitted.append(cp.stdout.strip())
        return cp.stdout.strip()

    def qstat(self, *args):
        """``qstat ARGS`` on the server's host, as a CompletedProcess."""
        return run(["qstat", *args], check=False)

    def stat(self, job_id):
        """``qstat -f -1`` as a dict (empty when the server no longer knows the job)."""
        cp = self.qstat("-f", "-1", job_id)
        out = {}
        for line in cp.stdout.splitlines():
            name, sep, value = line.strip().partition(" = ")
            if sep:
                out[name] = value
        return out

    def wait(self, job_id, states=("C",), timeout=240):
        """Wait until the job is in one of ``states``; returns its qstat -f dict."""
        end = time.monotonic() + timeout
        st = {}
        while time.monotonic() < end:
            st = self.stat(job_id)
            if st.get("job_state") in states:
                return st
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} not in {states} after {timeout} s: {st}")

    def wait_output(self, workdir, job_id, name="job.sh", timeout=30):
        """(stdout, stderr) of a finished job as pbs_mom delivered them to ``workdir``
        (an array subjob 12[3].srv writes NAME.o12-3)."""
        seq = re.sub(r"\[([0-9]+)\]$", r"-\1", job_id.split(".")[0])
        paths = [os.path.join(workdir, f"{name}.{k}{seq}") for k in "oe"]
        end = time.monotonic() + timeout
        while not all(os.path.exists(p) for p in paths):
            missing = [p for p in paths if not os.path.exists(p)]
            assert time.monotonic() < end, f"pbs_mom delivered no {missing} in {timeout} s"
            time.sleep(0.2)
        out = []
        for p in paths:
            with open(p, "rb") as f:
                out.append(f.read().decode("utf-8", "replace"))
        return tuple(out)

    def mom_log(self):
        return mom_log()


def mom_log():
    """pbs_mom's log files, oldest first, as one text."""
    d = os.path.join(PBS_HOME, "mom_logs")
    out = []
    for n in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        with open(os.path.join(d, n), errors="replace") as f:
            out.append(f.read())
    return "".join(out)


def leftovers(job_id):
    """The job's domain, overlay, state, start count and spool files left on the node
    (must be none).  This job's only: the other batch systems' lanes of a parallel run
    have jobs on the node meanwhile."""
    found = []
    cp = run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"], check=False)
    found += [f"domain {n}" for n in cp.stdout.split() if n == domain_name(job_id)]
    logs = "/var/log/libvirt/qemu"
    if os.path.isdir(logs):
        seq = job_id.split(".")[0].split("[")[0]
        found += [os.path.join(logs, n) for n in os.listdir(logs)
                  if n.startswith(domain_name(job_id) + ".")
                  or ("[]" in job_id and n.startswith(f"vmwn-{seq}_"))]  # its subjobs']
    mine = safe_name(job_id)
    for d in (STATE_DIR, OVERLAY_DIR, os.path.join(STATE_DIR, ".starts")):
        if os.path.isdir(d):
            found += [os.path.join(d, n) for n in os.listdir(d)
                      if n == mine or n.startswith(mine + ".")]
    spool = os.path.join(PBS_HOME, "spool")
    if os.path.isdir(spool):
        seq = job_id.split(".")[0]
        found += [os.path.join(spool, n) for n in os.listdir(spool)
                  if re.match(rf"^{re.escape(seq)}[.\[]", n)]
    return found


def wait_clean(job_id, timeout=20):
    end = time.monotonic() + timeout
    left = leftovers(job_id)
    while left and time.monotonic() < end:
        time.sleep(0.5)
        left = leftovers(job_id)
    return left


def bring_up():
    """make install into the cluster's pbs_mom, cluster up."""
    if os.geteuid() != 0:
        pytest.skip("the Torque tests need root (they run pbs_server and pbs_mom)")
    if not os.path.exists(os.path.join(PREFIX, "sbin", "pbs_mom")):
        pytest.fail(f"no Torque in {PREFIX}: run 'make torque' (make test does)")
    install_runtime()
    # Four slots: a parallel run's two Torque lanes run a two-job test beside another.
    cp = run([os.path.join(REPO, "scripts", "torque-up")], check=False, timeout=120,
             env=dict(os.environ, TORQUE_NP="4"))
    assert cp.returncode == 0, f"torque-up failed: {cp.stderr.strip()}"
    if WARM:  # VMWN_TEST_WARM=1: the copy-mode jobs are restored, not booted
        cp = run([VMWN, "warm", "prepare", "tinycopy"], check=False, timeout=300)
        assert cp.returncode == 0, f"vmwn warm prepare tinycopy failed: {cp.stderr.strip()}"
    # pbs_mom reads $job_starter at start and on SIGHUP; its main loop then rereads
    # mom_priv/config (process_hup), logging the starter as it reads it
    # ("...;Svr;jobstarter;PATH", Torque 6.1 src/resmom/parse_config.c).
    seen = len(mom_log())
    for pid in daemon_pids("pbs_mom"):
        os.kill(pid, signal.SIGHUP)
    wait_until(lambda: ";jobstarter;" in mom_log()[seen:], 30,
               "pbs_mom to reread $job_starter after SIGHUP (a 'jobstarter' line in "
               f"{PBS_HOME}/mom_logs)", interval=0.1)


def daemon_pids(name):
    """PIDs of this Torque's daemon ``name`` (by executable: OpenPBS's have the same
    names)."""
    exe = os.path.join(PREFIX, "sbin", name)
    pids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                # A daemon whose binary a rebuild replaced reads "... (deleted)".
                if os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)") == exe:
                    pids.append(int(pid))
            except OSError:
                pass
    return pids


def write_test_envs():
    os.makedirs(CONF_D, mode=0o755, exist_ok=True)
    # The job starters (the job's user) log there too: their one-line error is what
    # a job that ended wrongly says, and its output file goes with its test.
    fd = os.open(DEBUG_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o666)
    finally:
        os.close(fd)
    tmp = f"{TEST_CONF}.{os.getpid()}.tmp"  # parallel workers: a job never reads half a file
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(TEST_ENVS)
    os.chmod(tmp, 0o644)
    os.replace(tmp, TEST_CONF)


def remove_test_envs():
    try:
        os.unlink(TEST_CONF)
    except FileNotFoundError:
        pass


def take_down():
    if WARM:
        run([VMWN, "warm", "drop", "tinycopy"], check=False, timeout=120)
    run([os.path.join(REPO, "scripts", "torque-down")], check=False, timeout=120)
