"""vmwn under a real Slurm (Debian's slurmctld and slurmd, one host on loopback,
scripts/slurm-up): sbatch --vmwn=ENV runs the batch script, and srun --vmwn=ENV
its program, in the job's own guest through vmwn's SPANK plugin; an unknown
environment, salloc, or srun inside an allocation is refused at submission with
the reason on the user's terminal and no node is drained; a job without --vmwn
runs as if vmwn were not installed.  What every batch system must do (output,
files, signals, scancel, suspend, arrays, refusals) is in tests/test_scenarios.py,
which runs under this cluster too; this module holds what is Slurm's alone."""

import glob
import os
import re
import shlex
import shutil
import subprocess
import tempfile

import pytest

from vmwn.domain import domain_name, guest_hostname
from vmwn.state import safe_name
from vmwn_testlib import install_runtime, needs_image, wait_for_text, wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.integration, needs_image("tiny")]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM_VAR = "/var/lib/vmwn-slurm"
SLURM_ETC = os.path.join(SLURM_VAR, "etc")
SLURM_CONF = os.path.join(SLURM_ETC, "slurm.conf")
PLUGSTACK_DIR = os.path.join(SLURM_ETC, "plugstack.conf.d")
RUNTIME = "/usr/local/lib/vmwn"
STATE_DIR = "/var/lib/vmwn/jobs"
OVERLAY_DIR = "/var/lib/vmwn/overlays"
HOST = os.uname().nodename.split(".")[0]


def run(argv, timeout=120, **kw):
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
                               "SLURM_CONF": SLURM_CONF}, **kw)


class Cluster:
    def __init__(self, user):
        self.user = user

    def as_user(self, command, cwd, timeout=60):
        line = f"cd {shlex.quote(cwd)} && export SLURM_CONF={shlex.quote(SLURM_CONF)} && {command}"
        return run(["su", "-s", "/bin/sh", self.user.pw_name, "-c", line], timeout=timeout)

    def sbatch(self, workdir, script, options="", name="job.sh", umask=None):
        """(sbatch's CompletedProcess, job id or ""); ``umask`` the submitter's (the job's
        under Slurm), else su's."""
        path = os.path.join(workdir, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(script)
        os.chown(path, self.user.pw_uid, self.user.pw_gid)
        os.chmod(path, 0o755)
        mask = "" if umask is None else f"umask {umask:03o} && "
        cp = self.as_user(f"{mask}sbatch --parsable {options} {shlex.quote(name)}", workdir)
        return cp, cp.stdout.strip().split(";")[0] if cp.returncode == 0 else ""

    def submit(self, workdir, script, options="", name="job.sh"):
        cp, job = self.sbatch(workdir, script, options, name)
        assert cp.returncode == 0 and job, f"sbatch failed: {cp.stderr.strip()}"
        return job

    def show(self, job):
        cp = run(["scontrol", "-o", "show", "job", job])
        return dict(re.findall(r"(\w+)=(\S*)", cp.stdout)) if cp.returncode == 0 else {}

    def finish(self, job, timeout=240):
        """The job's exit status once it has ended (ExitCode=STATUS:SIGNAL)."""
        def done():
            st = self.show(job)
            return st if st.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED",
                                                 "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY") \
                else None
        st = wait_until(done, timeout, f"job {job} to end", interval=0.3)
        code, _, sig = st["ExitCode"].partition(":")
        return int(code) if sig in ("", "0") else 256 + int(sig)

    def accounted(self, workdir, job, timeout=60):
        """{JobID: {field: value}} of the job and its steps as ``sacct`` shows them
        to the job's owner, once slurmdbd has the job's end (slurmctld sends it on)."""
        fields = ("JobID", "State", "ExitCode", "TotalCPU", "MaxRSS")

        def ended():
            cp = self.as_user(f"sacct -j {job} -n -P -o {','.join(fields)}", workdir)
            rows = {}
            for line in cp.stdout.splitlines():
                row = dict(zip(fields, line.split("|")))
                rows[row["JobID"]] = row
            st = rows.get(job, {}).get("State", "")
            return rows if st and st.split()[0] not in ("PENDING", "RUNNING", "SUSPENDED",
                                                          "COMPLETING") else None
        return wait_until(ended, timeout, f"sacct to have job {job}'s end", interval=0.3)

    def output(self, workdir, job):
        path = os.path.join(workdir, f"slurm-{job}.out")
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def node_state(self):
        cp = run(["sinfo", "-h", "-n", HOST, "-o", "%T"])
        return cp.stdout.strip()

    def assert_idle(self, timeout=60):
        """The node ends idle (a job may still be completing), never drained."""
        def settled():
            st = self.node_state()
            assert "drain" not in st, f"node {HOST} is {st}"
            return st == "idle"
        wait_until(settled, timeout, f"node {HOST} to be idle", interval=0.2)


def leftovers(job):
    found = []
    cp = run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"])
    found += [f"domain {n}" for n in cp.stdout.split() if n == domain_name(job)]
    mine = safe_name(job)
    for d in (STATE_DIR, OVERLAY_DIR, os.path.join(STATE_DIR, ".starts")):
        if os.path.isdir(d):
            found += [os.path.join(d, n) for n in os.listdir(d)
                      if n == mine or n.startswith(mine + ".")]
    # the job's cgroups, which slurmstepd removes unless the VM is still in one
    found += glob.glob(f"/sys/fs/cgroup/*/slurm*/uid_*/job_{job}")
    return found


def assert_clean(job, timeout=30):
    left = []

    def clean():
        left[:] = leftovers(job)
        return not left
    try:
        wait_until(clean, timeout, f"job {job}'s remains to go", interval=0.3)
    except AssertionError:
        raise AssertionError(f"left after job {job}: {left}") from None


@pytest.fixture(scope="session")
def slurm(test_user, test_environments):
    if os.geteuid() != 0:
        pytest.skip("the Slurm tests need root (they run slurmctld and slurmd)")
    if not all(shutil.which(p, path="/usr/sbin:/usr/bin") for p in ("slurmctld", "slurmd",
                                                                   "sbatch", "munged")):
        pytest.fail("Slurm is not installed: run 'make deps' (make test does)")
    cp = run([os.path.join(REPO, "scripts", "slurm-up")], timeout=180)
    assert cp.returncode == 0, f"slurm-up failed: {cp.stderr.strip()}"
    try:
        install_runtime()
        cp = run([os.path.join(RUNTIME, "bin", "vmwn-slurm-install"), "install",
                  "--plugstack-dir", PLUGSTACK_DIR], timeout=180)
        assert cp.returncode == 0, f"vmwn-slurm-install failed: {cp.stderr.strip()}"
        # slurmd learns which plugins have a job prolog when it starts (the admin
        # guide's installation step): restart it.
        for script in ("slurm-down", "slurm-up"):
            cp = run([os.path.join(REPO, "scripts", script)], timeout=180)
            assert cp.returncode == 0, f"{script} failed: {cp.stderr.strip()}"
        yield Cluster(test_user)
    finally:
        run([os.path.join(RUNTIME, "bin", "vmwn-slurm-install"), "uninstall",
             "--plugstack-dir", PLUGSTACK_DIR], timeout=120)
        run([os.path.join(REPO, "scripts", "slurm-down")], timeout=300)


@pytest.fixture
def workdir(test_user):
    d = tempfile.mkdtemp(prefix="vmwn-slurm-", dir=test_user.pw_dir)
    os.chown(d, test_user.pw_uid, test_user.pw_gid)
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


JOB = """#!/bin/sh
echo "on $(hostname)"
echo made > made-in-guest
echo to-stderr >&2
exit 3
"""


def test_a_vm_job_keeps_its_exit_status_output_and_files(slurm, workdir):
    job = slurm.submit(workdir, JOB, "--vmwn=tiny")
    status = slurm.finish(job)
    out = slurm.output(workdir, job)
    assert status == 3, (status, out)
    assert f"on {guest_hostname(job)}" in out and "to-stderr" in out, out
    made = os.path.join(workdir, "made-in-guest")
    with open(made, encoding="ascii") as f:
        assert f.read() == "made\n"
    assert os.stat(made).st_uid == slurm.user.pw_uid  # written with the owner's rights
    # sacct (slurmdbd) has the job's status as its owner sees it, as for a native job
    assert slurm.accounted(workdir, job)[job]["ExitCode"] == "3:0"
    assert_clean(job)


def test_an_unknown_environment_is_refused_at_sbatch_in_one_line(slurm, workdir):
    cp, job = slurm.sbatch(workdir, JOB, "--vmwn=nosuch")
    assert cp.returncode != 0 and not job, (cp.stdout, cp.stderr)
    said = [ln for ln in cp.stderr.splitlines() if "vmwn:" in ln]
    assert len(said) == 1, cp.stderr
    assert "unknown vmwn environment 'nosuch'" in said[0] and "tiny" in said[0], said
    slurm.assert_idle()  # nothing reached a node, nothing was drained


def test_an_sbatch_directive_asks_as_the_option_does(slurm, workdir):
    cp, job = slurm.sbatch(workdir, "#!/bin/sh\n#SBATCH --vmwn=nosuch\nhostname\n")
    assert cp.returncode != 0 and not job, (cp.stdout, cp.stderr)
    assert "vmwn: unknown vmwn environment 'nosuch'" in cp.stderr, cp.stderr
    job = slurm.submit(workdir, "#!/bin/sh\n#SBATCH --vmwn=tiny\nhostname\n")
    assert slurm.finish(job) == 0
    out = slurm.output(workdir, job)
    assert guest_hostname(job) in out.splitlines(), out
    assert_clean(job)


def test_a_script_that_is_not_a_shell_script_runs_by_its_own_interpreter(slurm, workdir):
    """As slurmstepd's execve would: the guest's kernel reads the #! line."""
    job = slurm.submit(workdir, '#!/usr/bin/awk -f\nBEGIN { print "awk-ran"; exit 6 }\n',
                       "--vmwn=tiny")
    assert slurm.finish(job) == 6
    assert "awk-ran" in slurm.output(workdir, job).splitlines()
    assert_clean(job)


def test_a_script_whose_interpreter_the_guest_lacks_is_refused_in_one_line(slurm, workdir):
    job = slurm.submit(workdir, "#!/nonexistent/bash\necho ran\n", "--vmwn=tiny")
    assert slurm.finish(job) == 1
    said = [ln for ln in slurm.output(workdir, job).splitlines() if "ran" in ln or
            "interpreter" in ln]
    assert said == ["vmwn: the job script's interpreter /nonexistent/bash does not exist in "
                    "environment tiny: begin the script with one it has (#!/bin/sh) or ask "
                    "for another environment"], said
    assert_clean(job)


def test_a_job_that_exports_nothing_still_runs_in_its_guest(slurm, workdir):
    """sbatch hands its options to the batch step in the job's environment, which
    --export=NONE leaves out: the job prolog's note must still keep it off the host."""
    for export in ("NONE", "FOO=1"):
        job = slurm.submit(workdir, "#!/bin/sh\nhostname\n",
                           f"--vmwn=tiny --export={export}")
        assert slurm.finish(job) == 0
        assert guest_hostname(job) in slurm.output(workdir, job).splitlines(), export
        assert_clean(job)
    assert not os.listdir("/run/vmwn-slurm-jobs")  # each note gone with its job


def test_an_environment_name_that_is_not_one_is_refused_at_sbatch(slurm, workdir):
    cp, job = slurm.sbatch(workdir, JOB, "'--vmwn=$(id)'")
    assert cp.returncode != 0 and not job, (cp.stdout, cp.stderr)
    assert "vmwn: --vmwn needs an environment name" in cp.stderr, cp.stderr


def test_srun_runs_its_program_in_a_guest_as_a_job_of_its_own(slurm, workdir):
    cp = slurm.as_user("srun --vmwn=tiny sh -c 'hostname; exit 4'", workdir, timeout=240)
    assert cp.returncode == 4, (cp.stdout, cp.stderr)
    name = cp.stdout.strip()
    assert re.fullmatch(r"vmwn-[0-9]+-[0-9a-f]+", name) and name != HOST, cp.stdout
    job = name.split("-")[1]
    assert name == guest_hostname(job)
    assert_clean(job)
    slurm.assert_idle()


def test_the_vm_has_the_memory_the_job_asked_for(slurm, workdir):
    """--mem is the VM's memory (the environment's default, 256 MiB, without it): what
    the guest job can use is what its native twin's cgroup would allow it."""
    script = "#!/bin/sh\nawk '/^MemTotal:/ {print $2}' /proc/meminfo\n"
    sizes = {}
    for mem in ("", "--mem=600"):
        job = slurm.submit(workdir, script, f"--vmwn=tiny {mem}", name=f"mem{len(mem)}.sh")
        assert slurm.finish(job) == 0
        lines = slurm.output(workdir, job).splitlines()
        kib = [int(x) for x in lines if x.isdigit()]
        assert len(kib) == 1, lines
        sizes[mem] = kib[0] // 1024
        assert_clean(job)
    # the guest's kernel keeps some for itself: MemTotal is a little under the VM's
    assert 200 <= sizes[""] <= 256 and 520 <= sizes["--mem=600"] <= 600, sizes


def test_srun_gives_its_program_the_users_stdin_to_its_end(slurm, workdir):
    """As for a native srun: task 0 reads srun's stdin, and sees its end of file."""
    cp = slurm.as_user("printf 'one\\ntwo\\n' | srun --vmwn=tiny sh -c 'cat; echo eof-seen'",
                       workdir, timeout=240)
    assert cp.returncode == 0, (cp.stdout, cp.stderr)
    assert cp.stdout == "one\ntwo\neof-seen\n", (cp.stdout, cp.stderr)
    # More than the channel's windows hold, through a program that writes as it
    # reads: the relay must take the guest's output while its input waits.
    cp = slurm.as_user("head -c 16777216 /dev/zero | srun --vmwn=tiny cat | wc -c", workdir,
                       timeout=300)
    assert cp.returncode == 0 and cp.stdout.split() == ["16777216"], (cp.stdout, cp.stderr)


def test_a_further_step_of_a_running_vm_job_runs_in_its_guest(slurm, workdir):
    """srun --jobid=N --overlap (how a user looks into a running job): the step's
    program runs in the job's guest with srun's stdin, its exit status is the step's
    in sacct, and the step neither makes nor ends the VM: the job goes on."""
    script = ("#!/bin/sh\necho up\nwhile [ ! -e stop ]; do sleep 0.2; done\n"
              "cat from-step\nexit 3\n")
    job = slurm.submit(workdir, script, "--vmwn=tiny")
    wait_for_text(os.path.join(workdir, f"slurm-{job}.out"), "up", 240,
                  "the job to run in its guest")
    try:
        cp = slurm.as_user(f"srun --jobid={job} --overlap hostname", workdir, timeout=120)
        assert cp.returncode == 0 and cp.stdout == guest_hostname(job) + "\n", \
            (cp.stdout, cp.stderr)
        cp = slurm.as_user(f"printf 'in\\n' | srun --jobid={job} --overlap sh -c "
                           "'cat > from-step; cat from-step; exit 4'", workdir, timeout=120)
        assert cp.returncode == 4 and cp.stdout == "in\n", (cp.stdout, cp.stderr)
        assert slurm.show(job).get("JobState") == "RUNNING"  # the steps ended no VM
    finally:
        with open(os.path.join(workdir, "stop"), "w", encoding="ascii"):
            pass
    assert slurm.finish(job) == 3
    lines = slurm.output(workdir, job).splitlines()
    assert lines[lines.index("up") + 1] == "in", lines  # the step's file, read by the script
    rows = slurm.accounted(workdir, job)
    assert rows[job]["ExitCode"] == "3:0", rows
    steps = {k: v["ExitCode"] for k, v in rows.items() if re.fullmatch(rf"{job}\.[0-9]+", k)}
    assert sorted(steps.values()) == ["0:0", "4:0"], rows
    assert_clean(job)
    slurm.assert_idle()


def test_salloc_srun_in_an_allocation_and_several_tasks_are_refused(slurm, workdir):
    cp = slurm.as_user("salloc --vmwn=tiny true", workdir)
    assert cp.returncode != 0 and "vmwn: --vmwn runs a job of its own" in cp.stderr, cp.stderr
    cp = slurm.as_user("salloc sh -c 'srun --vmwn=tiny hostname'", workdir, timeout=120)
    assert cp.returncode != 0, (cp.stdout, cp.stderr)
    assert "vmwn: srun --vmwn runs a job of its own, not a step of job" in cp.stderr
    assert HOST not in cp.stdout  # never ran
    cp = slurm.as_user("srun --vmwn=tiny -n 2 hostname", workdir, timeout=120)
    assert cp.returncode != 0 and HOST not in cp.stdout, (cp.stdout, cp.stderr)
    assert "vmwn: a VM job runs one task per node" in cp.stderr, cp.stderr
    slurm.assert_idle()


def slurm_seconds(text):
    """Slurm's [DD-][HH:]MM:SS[.mmm] in seconds."""
    days, _, rest = text.rpartition("-")
    parts = [float(p) for p in rest.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0.0)
    return (int(days) if days else 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]


VM_CPU = 6  # host CPU seconds, at least, for the guest's 12 s loop (see below)


@pytest.mark.exclusive  # CPU time: alone, so no other lane takes the CPU it measures
def test_the_vms_cpu_is_the_jobs_in_slurms_accounting(slurm, workdir):
    """jobacct_gather/cgroup counts what the batch task's accounting cgroup used: the
    VM joined it (the starter itself uses well under a second: 0.15-0.2 s measured).
    The guest's 12 s are its own clock's: under TCG on a loaded host the guest's
    kernel charges its loop for time the vCPU thread was not running (measured with
    an image build beside it: 11.2 s on the host), so the host is asked for half."""
    script = ("#!/bin/sh\nsh -c 'ulimit -t 12; while :; do :; done'\necho burnt > burnt\n"
              "while [ ! -e stop ]; do sleep 0.2; done\nexit 3\n")
    job = slurm.submit(workdir, script, "--vmwn=tiny")
    wait_for_text(os.path.join(workdir, "burnt"), "burnt", 240, "the guest's 12 s CPU loop")

    def counted():
        cp = slurm.as_user(f"sstat -a -j {job} -n -P -o JobID,TRESUsageInTot", workdir)
        for line in cp.stdout.splitlines():
            step, _, tres = line.partition("|")
            m = re.search(r"(?:^|,)cpu=([^,]+)", tres)
            if step.endswith(".batch") and m and slurm_seconds(m.group(1)) >= VM_CPU:
                return slurm_seconds(m.group(1))
        return None
    cpu = wait_until(counted, 60, f"sstat to count the VM's {VM_CPU} s of CPU in the batch "
                     "step", interval=1.0)
    with open(os.path.join(workdir, "stop"), "w", encoding="ascii"):
        pass
    assert slurm.finish(job) == 3
    # and once the job has ended, sacct charges the job the VM's CPU
    rows = slurm.accounted(workdir, job)
    total = slurm_seconds(rows[job]["TotalCPU"])
    assert rows[job]["ExitCode"] == "3:0", rows
    assert total >= VM_CPU, rows
    print(f"batch step charged {cpu:.0f} s for the guest's 12 s loop (sstat), "
          f"job {total:.0f} s (sacct TotalCPU)")
    assert_clean(job)


def test_vmwn_reap_for_slurm_spares_a_running_job_and_removes_one_whose_slurmstepd_is_gone(
        slurm, workdir):
    """`vmwn reap --batch slurm` on the node: a running VM job has its slurmstepd (as
    slurmd names them) and stays; the record of a job whose end never ran goes."""
    from vmwn import config
    from test_operators import OLD, fake_job
    vmwn = os.path.join(RUNTIME, "bin", "vmwn")
    job = slurm.submit(workdir, "#!/bin/sh\necho up\nsleep 300\n", "--vmwn=tiny")
    wait_for_text(os.path.join(workdir, f"slurm-{job}.out"), "up", 240, "the job to run")
    gone = fake_job(config.load(config.DEFAULT_PATH), "999990", created=OLD, batch="slurm")
    try:
        # a dry run at no grace judges everything and removes nothing (the other lanes'
        # young jobs are safe): the running job is held by its slurmstepd alone
        cp = run([vmwn, "reap", "--batch", "slurm", "--grace", "0", "--dry-run"])
        assert cp.returncode == 0, cp.stderr
        assert "of job 999990 (its job is no longer on this node)" in cp.stdout, cp.stdout
        assert f"of job {job} " not in cp.stdout, cp.stdout
        cp = run([vmwn, "reap", "--batch", "slurm"])
        assert cp.returncode == 0, cp.stderr
        assert not os.path.exists(os.path.dirname(gone.key_path)), cp.stdout
        assert os.path.exists(os.path.join(STATE_DIR, safe_name(job)))
    finally:
        run(["scancel", job])
        shutil.rmtree(os.path.dirname(gone.key_path), ignore_errors=True)
        if os.path.exists(gone.overlay):
            os.unlink(gone.overlay)
    slurm.finish(job)
    assert_clean(job)
