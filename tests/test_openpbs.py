"""vmwn under a real OpenPBS: jobs submitted with qsub by an unprivileged user.

The complex comes from scripts/build-openpbs and scripts/openpbs-up (all its
daemons in network namespace vmwn-pbs), vmwn goes in with ``make install`` and
``vmwn-openpbs-install``, exactly as a site installs it.  Each test checks what
the job's owner sees (qsub's answer, ``qstat -x -f``, the .o/.e files the mom
delivers, files in the working directory) and that nothing is left: no domain,
no state or overlay, nothing of the job in the mom's spool.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile

import pytest

from vmwn.domain import domain_name, guest_hostname
from vmwn.state import safe_name
from vmwn_testlib import install_runtime, needs_image, wait_until

pytestmark = [pytest.mark.openpbs, pytest.mark.integration, needs_image("tiny")]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "/opt/vmwn-openpbs"
PBS_HOME = "/var/spool/vmwn-pbs"
NETNS = "vmwn-pbs"
RUNTIME = "/usr/local/lib/vmwn"
STATE_DIR = "/var/lib/vmwn/jobs"
OVERLAY_DIR = "/var/lib/vmwn/overlays"


def run(argv, timeout=120, check=False, **kw):
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=check,
                          stdin=subprocess.DEVNULL, **kw)


def in_ns(*argv):
    return ["ip", "netns", "exec", NETNS] + list(argv)


def pbs(cmd, *args, timeout=60):
    """An OpenPBS client command as root, inside the complex's namespace."""
    return run(in_ns(os.path.join(PREFIX, "bin", cmd), *args), timeout=timeout)


class Complex:
    def __init__(self, user):
        self.user = user

    def as_user(self, command, cwd, timeout=60):
        line = f"cd {shlex.quote(cwd)} && {command}"
        return run(in_ns("su", "-s", "/bin/sh", self.user.pw_name, "-c", line),
                   timeout=timeout)

    def qsub(self, workdir, script, options="", name="job.sh"):
        """(qsub's CompletedProcess, job id or "") for ``script`` written into ``workdir``."""
        path = os.path.join(workdir, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(script)
        os.chown(path, self.user.pw_uid, self.user.pw_gid)
        os.chmod(path, 0o755)
        cp = self.as_user(f"{PREFIX}/bin/qsub {options} {shlex.quote(name)}", workdir)
        return cp, cp.stdout.strip() if cp.returncode == 0 else ""

    def submit(self, workdir, script, options="", name="job.sh"):
        cp, job_id = self.qsub(workdir, script, options, name)
        assert cp.returncode == 0 and job_id, f"qsub failed: {cp.stderr.strip()}"
        return job_id

    def stat(self, job_id):
        """The job's attributes (``qstat -x -f -F json``), {} when unknown."""
        cp = pbs("qstat", "-x", "-f", "-F", "json", job_id)
        if cp.returncode != 0:
            return {}
        try:
            return json.loads(cp.stdout).get("Jobs", {}).get(job_id, {})
        except ValueError:
            return {}

    def wait(self, job_id, states=("F",), timeout=240):
        return wait_until(lambda: (lambda s: s if s.get("job_state") in states else None)(
            self.stat(job_id)), timeout, f"job {job_id} to reach state {'/'.join(states)}",
            interval=0.3)

    def output(self, workdir, job_id, name="job.sh", timeout=30):
        # An array subjob 12[3].srv writes NAME.o12.3
        seq = re.sub(r"\[([0-9]+)\]$", r".\1", job_id.split(".")[0])
        paths = [os.path.join(workdir, f"{name}.{k}{seq}") for k in "oe"]
        wait_until(lambda: all(os.path.exists(p) for p in paths), timeout,
                   f"the mom to deliver {' and '.join(paths)}", interval=0.2)
        out = []
        for p in paths:
            with open(p, "rb") as f:
                out.append(f.read().decode("utf-8", "replace"))
        return tuple(out)


def leftovers(job_id):
    """The job's domain, vmwn state and overlays, and its files in the mom's spool."""
    found = []
    cp = run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"])
    # This job's only: what an earlier run or the other batch system left is not its.
    # vmwn names them by the job id made safe (an array subjob's has brackets).
    found += [f"domain {n}" for n in cp.stdout.split() if n == domain_name(job_id)]
    mine = safe_name(job_id)
    for d in (STATE_DIR, OVERLAY_DIR):
        if os.path.isdir(d):
            found += [os.path.join(d, n) for n in os.listdir(d)
                      if n == mine or n.startswith(mine + ".")]
    for d in (os.path.join(PBS_HOME, "spool"), os.path.join(PBS_HOME, "mom_priv", "jobs")):
        if os.path.isdir(d):
            found += [os.path.join(d, n) for n in os.listdir(d) if n.startswith(job_id + ".")]
    return found


def assert_clean(job_id, timeout=30):
    left = []

    def clean():
        left[:] = leftovers(job_id)
        return not left
    try:
        wait_until(clean, timeout, f"job {job_id}'s remains to go", interval=0.3)
    except AssertionError:
        raise AssertionError(f"left after job {job_id}: {left}") from None


INSTALLED_HOOK = "/usr/local/share/vmwn/openpbs/vmwn_hook.py"


def wait_for_mom_hook(timeout=60):
    """The server sends a hook to the mom on its own time: wait until the mom has
    the one just imported (mom_priv/hooks/vmwn.PY), so the first job meets it."""
    with open(INSTALLED_HOOK, "rb") as f:
        want = f.read()

    def arrived():
        try:
            with open(os.path.join(PBS_HOME, "mom_priv", "hooks", "vmwn.PY"), "rb") as f:
                return f.read() == want
        except FileNotFoundError:
            return False
    wait_until(arrived, timeout, "the mom to receive vmwn's hook", interval=0.2)


@pytest.fixture(scope="session")
def openpbs(test_user, test_environments):
    if os.geteuid() != 0:
        pytest.skip("the OpenPBS tests need root (they run pbs_server and pbs_mom)")
    if not os.path.exists(os.path.join(PREFIX, "sbin", "pbs_server.bin")):
        cp = run([os.path.join(REPO, "scripts", "build-openpbs")], timeout=1800)
        if cp.returncode != 0:
            pytest.skip(f"no OpenPBS in {PREFIX} and scripts/build-openpbs failed: "
                        f"{(cp.stderr.strip().splitlines() or ['?'])[-1]}")
    cp = run([os.path.join(REPO, "scripts", "openpbs-up")], timeout=300)
    assert cp.returncode == 0, f"openpbs-up failed: {cp.stderr.strip()}"
    try:
        install_runtime()
        cp = run(in_ns(os.path.join(RUNTIME, "bin", "vmwn-openpbs-install"), "install",
                       "--pbs-exec", PREFIX, "--pbs-home", PBS_HOME), timeout=120)
        assert cp.returncode == 0, f"vmwn-openpbs-install failed: {cp.stderr.strip()}"
        wait_for_mom_hook()
        yield Complex(test_user)
    finally:
        run(in_ns(os.path.join(RUNTIME, "bin", "vmwn-openpbs-install"), "uninstall",
                  "--pbs-exec", PREFIX, "--pbs-home", PBS_HOME), timeout=120)
        run([os.path.join(REPO, "scripts", "openpbs-down")], timeout=300)


@pytest.fixture
def workdir(test_user):
    d = tempfile.mkdtemp(prefix="vmwn-openpbs-", dir=test_user.pw_dir)
    os.chown(d, test_user.pw_uid, test_user.pw_gid)
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_an_unknown_environment_is_refused_at_submission(openpbs, workdir):
    for option in ("-l vmwn=nosuch", "-v VMWN_ENV=nosuch"):
        cp, job_id = openpbs.qsub(workdir, "#!/bin/sh\necho never\n", option)
        assert cp.returncode != 0 and not job_id, (option, cp.stdout, cp.stderr)
        lines = cp.stderr.strip().splitlines()
        assert len(lines) == 1, cp.stderr
        assert lines[0].startswith("qsub: vmwn: unknown vmwn environment 'nosuch'"), lines
        assert "request one of: " in lines[0] and "tiny" in lines[0], lines


def test_a_request_over_a_limit_fails_the_job_with_the_reason_in_its_error_file(
        openpbs, workdir):
    job_id = openpbs.submit(workdir, "#!/bin/sh\necho never-ran\n", "-l vmwn=tiny -l mem=3gb")
    st = openpbs.wait(job_id, timeout=60)
    out, err = openpbs.output(workdir, job_id)
    assert st.get("Exit_status") == 1, (st, out, err)
    assert "never-ran" not in out
    assert err.strip().splitlines() == [
        "vmwn: the job asks for 3072 MiB of memory but max_memory of environment tiny is "
        "2048 MiB: ask for at most 2048mb"], err
    assert_clean(job_id)


# The guest's loop is bounded by CPU time ('ulimit -t'), not by the clock.
CPU_LOOP = ("#!/bin/sh\nsh -c 'ulimit -t {secs}; while :; do :; done'\necho done\n")
USED = re.compile(r"the virtual machine used ([0-9.]+) s of CPU and ([0-9]+) MiB")
JOB_EXEC_KILL_CPUT = -28  # OpenPBS's Exit_status for a job over its cput (job.h)


def _seconds(hms):
    h, m, s = (int(x) for x in hms.split(":"))
    return h * 3600 + m * 60 + s


def test_a_program_job_runs_in_its_guest_with_the_stdin_a_native_one_has(openpbs, workdir):
    """qsub -- PROGRAM: the program runs in the guest as it is, and reads the stdin the
    mom gives a native one (/dev/null) to its end: the guest's stdin is closed when the
    task's is, or the job would hang here.  That stdin is forwarded is Slurm's test
    (srun has one)."""
    got = {}
    for opts in ("", "-l vmwn=tiny"):
        cp = openpbs.as_user(f"{PREFIX}/bin/qsub -N prog {opts} -- /bin/sh -c "
                             "'cat; echo eof-seen; hostname'", workdir)
        assert cp.returncode == 0, cp.stderr
        job = cp.stdout.strip()
        st = openpbs.wait(job)
        out, err = openpbs.output(workdir, job, "prog")
        assert st["Exit_status"] == 0, (st.get("Exit_status"), out, err)
        got[opts] = (job, out)
    native, (job, vm) = got[""][1], got["-l vmwn=tiny"]
    assert native.splitlines()[-2:] == ["eof-seen", os.uname().nodename], native
    assert vm.splitlines()[-2:] == ["eof-seen", guest_hostname(job)], vm
    assert_clean(job)


@pytest.mark.exclusive  # CPU time: alone, so no other lane takes the CPU it measures
def test_a_vm_job_is_charged_what_its_vm_used(openpbs, workdir):
    """OpenPBS's mom counts sessions and QEMU is in none of the job's: vmwn's hook
    sets resources_used from the VM (exechost_periodic, and execjob_epilogue last)."""
    job_id = openpbs.submit(workdir, CPU_LOOP.format(secs=15), "-l vmwn=tiny")
    st = openpbs.wait(job_id, timeout=300)
    out, err = openpbs.output(workdir, job_id)
    assert st.get("Exit_status") == 0 and out == "done\n", (st, out, err)
    m = USED.search(err)
    assert m, err
    used, peak_mib = float(m.group(1)), int(m.group(2))
    assert used >= 15, err  # the guest's 15 s of CPU ran in QEMU
    charged = _seconds(st["resources_used"]["cput"])
    # charged at the epilogue, a moment after the starter's own count: the idle guest
    assert used - 1 <= charged <= used + max(3, used * 0.1), (st["resources_used"], err)
    mem = st["resources_used"]["mem"]
    # the starter's MiB are rounded to the nearest: the charge is at least one less
    assert mem.endswith("kb") and int(mem[:-2]) >= (peak_mib - 1) * 1024 > 100 * 1024, (mem, err)
    print(f"vm job: guest loop 15 s, VM {used:.1f} s, charged {charged} s, mem {mem}")
    assert_clean(job_id)


def test_a_vm_job_over_its_cput_limit_is_killed_by_the_mom(openpbs, workdir):
    job_id = openpbs.submit(workdir, CPU_LOOP.format(secs=600), "-l vmwn=tiny -l cput=10")
    st = openpbs.wait(job_id, timeout=300)
    out, err = openpbs.output(workdir, job_id)
    assert st.get("Exit_status") == JOB_EXEC_KILL_CPUT, (st, out, err)
    assert "done" not in out
    assert _seconds(st["resources_used"]["cput"]) > 10, st["resources_used"]
    assert_clean(job_id)
