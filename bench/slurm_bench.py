"""``make bench`` under the real Slurm: what a VM job costs slurmd and its submitter.

Measured in one run on the one-host cluster of ``scripts/slurm-up``, with vmwn
installed by ``make install`` and ``vmwn-slurm-install`` (tests/test_slurm.py):

- how long the batch step's slurmstepd is held by vmwn's ``runtime begin`` (the
  plugin logs it: ``vmwn: job N: begin took S s`` in slurmd's log);
- how long ``sbatch`` takes (``--vmwn``: the plugin's ``runtime check``);
- how long N jobs submitted together take until every one runs its first
  instruction (a file the job writes in its working directory: its mtime is the
  host's clock, the guest's write going through virtio-fs);
- baseline: the same N jobs without a VM, same run.

Prints one table and a summary line.  Usage: ``python bench/slurm_bench.py [--jobs N]``.
"""

import argparse
import os
import re
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(os.path.dirname(HERE), "tests"), os.path.dirname(HERE)]

import test_slurm as ts  # noqa: E402

import batchtable  # noqa: E402

SLURMD_LOG = os.path.join(ts.SLURM_VAR, "log", "slurmd.log")
JOB = """#!/bin/sh
echo x > "first.$SLURM_JOB_ID"
sleep 2
"""


def begin_times(jobs):
    try:
        with open(SLURMD_LOG, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return []
    took = dict(re.findall(r"vmwn: job (\d+): begin took ([0-9.]+) s", text))
    return [float(took[j]) for j in jobs if j in took]


def run_batch(cl, workdir, n, options):
    jobs, sbatch, all_running = batchtable.together(
        lambda: cl.submit(workdir, JOB, options), lambda job: cl.finish(job, timeout=300),
        workdir, n)
    return {"held": begin_times(jobs), "sbatch": sbatch, "all_running": all_running}


def main(argv=None):
    p = argparse.ArgumentParser(prog="bench/slurm_bench.py")
    p.add_argument("--jobs", type=int, default=2, help="jobs submitted together (2: the "
                   "node's cores)")
    args = p.parse_args(argv)
    import pwd
    user = pwd.getpwnam("vmwntest")
    for argv, timeout in (([os.path.join(ts.REPO, "scripts", "slurm-up")], 180),
                          (["make", "-C", ts.REPO, "--no-print-directory", "install"], 600),
                          ([os.path.join(ts.RUNTIME, "bin", "vmwn-slurm-install"), "install",
                            "--plugstack-dir", ts.PLUGSTACK_DIR], 180)):
        cp = ts.run(argv, timeout=timeout)
        if cp.returncode != 0:
            raise SystemExit(f"slurm-bench: {' '.join(argv)} failed: "
                             f"{(cp.stderr or cp.stdout).strip()[-500:]}")
    cl = ts.Cluster(user)
    workdir = tempfile.mkdtemp(prefix="vmwn-bench-", dir=user.pw_dir)
    os.chown(workdir, user.pw_uid, user.pw_gid)
    os.chmod(workdir, 0o755)
    rows = []
    try:
        for n in (1, args.jobs):
            native = run_batch(cl, workdir, n, "")
            vm = run_batch(cl, workdir, n, "--vmwn=tiny")
            rows.append((n, native, vm))
    finally:
        ts.run([os.path.join(ts.RUNTIME, "bin", "vmwn-slurm-install"), "uninstall",
                "--plugstack-dir", ts.PLUGSTACK_DIR], timeout=120)
        ts.run([os.path.join(ts.REPO, "scripts", "slurm-down")], timeout=300)
        shutil.rmtree(workdir, ignore_errors=True)
    print(batchtable.header("measure (real Slurm)"))
    med = batchtable.median
    for n, native, vm in rows:
        print(batchtable.row(f"slurmstepd held by vmwn's begin, {n} job(s), median",
                             med(vm["held"])))
        print(batchtable.row(f"sbatch, {n} job(s), median", med(vm["sbatch"]),
                             med(native["sbatch"])))
        print(batchtable.row(f"{n} job(s) submitted together: all at first instruction",
                             vm["all_running"], native["all_running"] or batchtable.NAN, 2))
    worst = max(max(vm["held"] or [float("nan")]) for _, _, vm in rows)
    print(f"slurm-bench: step-held-max={worst:.3f}s goal<=1s "
          f"{'met' if worst <= 1.0 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
