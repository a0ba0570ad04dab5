"""Run by scripts/debian13-smoke-inside, in its Debian 13 root, once its Torque runs
with vmwn installed: USER submits two jobs from its home with ``qsub -l
other=vmwn=ENV``, one for each data mode (MOUNTED's and COPY's environments).
Each prints its host name and kernel, writes a file and the hostile tree
(tests/hostile_tree.py) in its submission directory, and exits 3.  Each must end
with exit status 3 in qstat, its output and files in that directory owned by
USER, every byte of the tree back, and nothing of it left in vmwn's state
directory or libvirt.  One verdict line per job; exit 0 when all hold.
Standard library and vmwn only (the root has no pytest).

    python3 tests/debian13_torque.py CONFIG USER MOUNTED COPY
"""

import os
import pwd
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hostile_tree import HOSTILE_TREE, problems  # noqa: E402
from smokelib import leftovers, poll, read_text  # noqa: E402
from vmwn import config  # noqa: E402

JOB = ('#!/bin/sh\ncd "$PBS_O_WORKDIR" || exit 9\necho "host $(hostname) kernel $(uname -r)"\n'
       "echo made-in-the-guest > result.txt\n" + HOSTILE_TREE + "exit 3\n")


def _as(user, argv, cwd):
    return subprocess.run(argv, cwd=cwd, user=user.pw_uid, group=user.pw_gid,
                          extra_groups=[], env={"PATH": os.environ["PATH"], "HOME": user.pw_dir,
                                                "USER": user.pw_name, "LOGNAME": user.pw_name},
                          capture_output=True, text=True, timeout=60)


def _qstat(job):
    """{attribute: value} of ``job`` from ``qstat -f -1`` ({} once the server has none)."""
    cp = subprocess.run(["qstat", "-f", "-1", job], capture_output=True, text=True,
                        timeout=60)
    return dict(m.groups() for m in re.finditer(r"^\s+(\S+) = (.*)$", cp.stdout, re.M))


def main(argv=None) -> int:
    conf, user, *envs = argv if argv is not None else sys.argv[1:]
    cfg = config.load(conf)
    user = pwd.getpwnam(user)
    jobs = []
    for env in envs:
        d = tempfile.mkdtemp(prefix=f"d13-{env}-", dir=user.pw_dir)
        os.chown(d, user.pw_uid, user.pw_gid)
        os.chmod(d, 0o755)
        with open(os.path.join(d, "job.sh"), "w") as f:
            f.write(JOB)
        cp = _as(user, ["qsub", "-N", "d13", "-l", f"other=vmwn={env}", "job.sh"], d)
        if cp.returncode != 0:
            print(f"torque {env}: qsub failed: {cp.stderr.strip()}", flush=True)
            return 1
        jobs.append((env, d, cp.stdout.strip()))
    ended = poll(lambda: all(_qstat(j).get("job_state") == "C" for _, _, j in jobs), 900)
    rc = 0
    for env, d, job in jobs:
        seq = job.split(".")[0]
        st = _qstat(job)
        out = os.path.join(d, f"d13.o{seq}")
        poll(lambda: os.path.exists(out), 60)
        found = [] if ended else [f"job {job} did not end in 900 s ({st.get('job_state')})"]
        text = read_text(out)
        if st.get("exit_status") != "3":
            err = read_text(os.path.join(d, f"d13.e{seq}")).strip()[-300:] or "no .e"
            found.append(f"exit_status {st.get('exit_status')}, not 3 ({err})")
        guest = re.search(r"^host (\S+) kernel (\S+)$", text, re.M)
        if not guest or guest.group(1) == os.uname().nodename:
            found.append(f"the job did not run in a guest: {text[:200]!r}")
        result = os.path.join(d, "result.txt")
        if not os.path.exists(result) or open(result).read() != "made-in-the-guest\n" or \
                os.stat(result).st_uid != user.pw_uid:
            found.append("result.txt is not the job's")
        if os.path.exists(out) and os.stat(out).st_uid != user.pw_uid:
            found.append(f"{out} is not {user.pw_name}'s")
        if not found:
            found += problems(os.path.join(os.fsencode(d), b"out"), user.pw_uid, user.pw_gid,
                              copied=cfg.env(env).data == "copy")
        found += [f"{p} is left" for p in leftovers(cfg, job)]
        what = f"{guest.group(1)}, kernel {guest.group(2)}, " if guest else ""
        print(f"torque {env} ({cfg.env(env).data}): {what}exit 3, file and tree: "
              + ("; ".join(found) if found else "ok"), flush=True)
        rc |= bool(found)
    return rc


if __name__ == "__main__":
    sys.exit(main())
