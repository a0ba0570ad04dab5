"""Run by scripts/debian13-smoke-inside, in its Debian 13 root, once its Slurm (Debian
13's, scripts/slurm-up) runs with vmwn's SPANK plugin installed: what issue-level
users do first, as USER from its home.

- ``sbatch --vmwn=ENV job.sh`` (prints its host name, writes a file, exits 3) runs
  in the job's guest; its output and file are in the submission directory, owned by
  USER; scontrol and sacct show ``ExitCode 3:0``;
- ``sbatch --vmwn=nosuch`` is refused at submission with the reason;
- ``srun --vmwn=ENV hostname`` prints the guest's name (three jobs);
- the node is idle (never drained) after each, and nothing of the jobs is left in
  vmwn's state directory or libvirt.

One verdict line per check; exit 0 when all hold.  Standard library and vmwn only.

    python3 tests/debian13_slurm.py CONFIG SLURM_CONF USER ENV
"""

import os
import pwd
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from smokelib import leftovers, poll, read_text  # noqa: E402
from vmwn import config  # noqa: E402
from vmwn.domain import guest_hostname  # noqa: E402

JOB = '#!/bin/sh\necho "on $(hostname)"\necho made > made-in-guest\nexit 3\n'


class Slurm:
    def __init__(self, conf, user):
        self.conf, self.user = conf, user
        self.env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", "SLURM_CONF": conf}

    def run(self, argv, timeout=120):
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, env=self.env)

    def as_user(self, argv, cwd, timeout=300):
        u = self.user
        return subprocess.run(argv, cwd=cwd, user=u.pw_uid, group=u.pw_gid, extra_groups=[],
                              capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL,
                              env={**self.env, "HOME": u.pw_dir, "USER": u.pw_name,
                                   "LOGNAME": u.pw_name})

    def show(self, job):
        cp = self.run(["scontrol", "-o", "show", "job", job])
        return dict(re.findall(r"(\w+)=(\S*)", cp.stdout)) if cp.returncode == 0 else {}

    def node(self):
        return self.run(["sinfo", "-h", "-o", "%T"]).stdout.strip()


def _settled(sl):
    """'' once the node is idle; what it is instead (drained at once, or not idle)."""
    def probe():
        st = sl.node()
        return st if "drain" in st or st == "idle" else None
    st = poll(probe, 60) or sl.node()
    return "" if st == "idle" else f"the node is {st!r}, not idle"


def sbatch_job(sl, cfg, env, d):
    with open(os.path.join(d, "job.sh"), "w") as f:
        f.write(JOB)
    cp = sl.as_user(["sbatch", "--parsable", f"--vmwn={env}", "job.sh"], d)
    if cp.returncode != 0:
        return [f"sbatch failed: {cp.stderr.strip()}"]
    job = cp.stdout.strip().split(";")[0]
    ended = poll(lambda: sl.show(job).get("JobState") in (
        "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"), 600)
    st = sl.show(job)
    out = read_text(os.path.join(d, f"slurm-{job}.out"))
    found = [] if ended else [f"job {job} did not end ({st.get('JobState')})"]
    if st.get("ExitCode") != "3:0":
        found.append(f"scontrol: ExitCode {st.get('ExitCode')}, not 3:0: {out.strip()[-300:]!r}")
    if f"on {guest_hostname(job)}" not in out:
        found.append(f"the job did not run in its guest: {out[:200]!r}")
    made = os.path.join(d, "made-in-guest")
    if read_text(made) != "made\n" or os.stat(made).st_uid != sl.user.pw_uid:
        found.append("made-in-guest is not the job's")

    def accounted():
        cp = sl.as_user(["sacct", "-j", job, "-n", "-P", "-X", "-o", "State,ExitCode"], d, 60)
        row = cp.stdout.strip().split("|")
        return row if row[0] and row[0].split()[0] not in (
            "PENDING", "RUNNING", "COMPLETING") else None
    row = poll(accounted, 60)
    if not row or row[1] != "3:0":
        found.append(f"sacct: {row}, not ExitCode 3:0")
    return found + _after(sl, cfg, job)


def _after(sl, cfg, job):
    """What is wrong once a job has ended: a node not idle, the job's remains."""
    found = [x for x in (_settled(sl),) if x]
    if not poll(lambda: not leftovers(cfg, job), 30):
        found += [f"{p} is left" for p in leftovers(cfg, job)]
    return found


def refused(sl, d):
    cp = sl.as_user(["sbatch", "--parsable", "--vmwn=nosuch", "job.sh"], d)
    found = [] if cp.returncode != 0 else [f"sbatch --vmwn=nosuch was taken: job {cp.stdout}"]
    if "nosuch" not in cp.stderr:
        found.append(f"the refusal does not name the environment: {cp.stderr.strip()!r}")
    found += [x for x in (_settled(sl),) if x]
    return found


def srun_hostnames(sl, cfg, env, d, jobs=3):
    """``jobs`` srun jobs one after the other: without cgroups here Slurm ends a step
    by killing every descendant of its slurmstepd, which caught vmwn's teardown
    half-way in 8 jobs of 10 until the job epilog finished it."""
    found = []
    for _ in range(jobs):
        found += srun_hostname(sl, cfg, env, d)
    return found


def srun_hostname(sl, cfg, env, d):
    cp = sl.as_user(["srun", f"--vmwn={env}", "hostname"], d, 600)
    name = cp.stdout.strip()
    found = [] if cp.returncode == 0 else [f"srun exited {cp.returncode}: {cp.stderr.strip()}"]
    if not re.fullmatch(r"vmwn-[0-9]+-[0-9a-f]+", name) or \
            name != guest_hostname(name.split("-")[1]):
        return found + [f"srun printed {name!r}, not its guest's name"]
    return found + _after(sl, cfg, name.split("-")[1])


def main(argv=None) -> int:
    conf, slurm_conf, user, env = argv if argv is not None else sys.argv[1:]
    cfg = config.load(conf)
    sl = Slurm(slurm_conf, pwd.getpwnam(user))
    d = tempfile.mkdtemp(prefix="d13-slurm-", dir=sl.user.pw_dir)
    os.chown(d, sl.user.pw_uid, sl.user.pw_gid)
    os.chmod(d, 0o755)
    version = sl.run(["sinfo", "-V"]).stdout.strip()
    rc = 0
    checks = ((f"sbatch --vmwn={env}, exit 3, file, sacct", sbatch_job, (sl, cfg, env, d)),
              ("sbatch --vmwn=nosuch refused at submission", refused, (sl, d)),
              (f"srun --vmwn={env} hostname, 3 jobs", srun_hostnames, (sl, cfg, env, d)))
    for what, check, args in checks:
        found = check(*args)
        print(f"slurm ({version}) {what}: " + ("; ".join(found) if found else "ok"), flush=True)
        rc |= bool(found)
    return rc


if __name__ == "__main__":
    sys.exit(main())
