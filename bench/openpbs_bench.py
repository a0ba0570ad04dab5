"""``make bench`` under the real OpenPBS: what a VM job costs pbs_mom and its submitter.

Measured in one run on the one-host complex of ``scripts/openpbs-up``, with vmwn
installed by ``make install`` and ``vmwn-openpbs-install`` (tests/test_openpbs.py):

- how long pbs_mom is held per job start by ``execjob_begin``: two timing hooks
  around vmwn's (``order`` 1 and 1000; vmwn's is 200) stamp the host's clock;
- how long ``qsub`` takes (the server's ``queuejob`` hooks, vmwn's ``check``);
- how long N jobs submitted together take until every one runs its first
  instruction (a file the job writes in its working directory: its mtime is
  the host's clock, the guest's write going through virtio-fs);
- baseline: the same N jobs without a VM, same run.

Prints one table and a summary line.  Usage: ``python bench/openpbs_bench.py [--jobs N]``.
"""

import argparse
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(os.path.dirname(HERE), "tests"), os.path.dirname(HERE)]

import test_openpbs as opbs  # noqa: E402

import batchtable  # noqa: E402

STAMPS = "/var/tmp/vmwn-bench-openpbs"
TIMERS = {"vmwnbench_a": ("start", 1), "vmwnbench_z": ("end", 1000)}
TIMER_HOOK = """import os, time
import pbs
e = pbs.event()
os.makedirs({stamps!r}, exist_ok=True)
with open(os.path.join({stamps!r}, str(e.job.id) + ".{which}"), "w") as f:
    f.write(repr(time.time()))
e.accept()
"""
JOB = """#!/bin/sh
cd "$PBS_O_WORKDIR" && echo x > "first.$PBS_JOBID"
sleep 2
"""


def qmgr(command):
    cp = opbs.pbs("qmgr", "-c", command)
    if cp.returncode != 0:
        raise SystemExit(f"openpbs-bench: qmgr -c {command!r} failed: {cp.stderr.strip()}")


def install_timers(workdir):
    for name, (which, order) in TIMERS.items():
        path = os.path.join(workdir, f"{name}.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(TIMER_HOOK.format(stamps=STAMPS, which=which))
        if opbs.pbs("qmgr", "-c", f"list hook {name}").returncode != 0:
            qmgr(f"create hook {name}")
        qmgr(f"set hook {name} event = execjob_begin")
        qmgr(f"set hook {name} order = {order}")
        qmgr(f"import hook {name} application/x-python default {path}")
        qmgr(f"set hook {name} enabled = true")
    # The server sends hooks to the mom on its own time: the first job must see them.
    hooks = os.path.join(opbs.PBS_HOME, "mom_priv", "hooks")
    opbs.wait_until(lambda: all(os.path.exists(os.path.join(hooks, f"{name}.PY"))
                                for name in TIMERS), 60,
                    "the mom to receive the timing hooks", interval=0.2)


def remove_timers():
    for name in TIMERS:
        opbs.pbs("qmgr", "-c", f"delete hook {name}")


def stamp(job, which):
    try:
        with open(os.path.join(STAMPS, f"{job}.{which}"), encoding="ascii") as f:
            return float(f.read())
    except (OSError, ValueError):
        return None


def run_batch(cx, workdir, n, options):
    """n jobs submitted together: qsub times, the mom's begin times, all running."""
    jobs, qsub, all_running = batchtable.together(
        lambda: cx.submit(workdir, JOB, options), lambda job: cx.wait(job, timeout=300),
        workdir, n)
    held = [stamp(j, "end") - stamp(j, "start") for j in jobs
            if stamp(j, "end") is not None and stamp(j, "start") is not None]
    return {"held": held, "qsub": qsub, "all_running": all_running}


def bring_up(user):
    if not os.path.exists(os.path.join(opbs.PREFIX, "sbin", "pbs_server.bin")):
        opbs.run([os.path.join(opbs.REPO, "scripts", "build-openpbs")], timeout=1800,
                 check=True)
    opbs.run([os.path.join(opbs.REPO, "scripts", "openpbs-up")], timeout=300, check=True)
    opbs.run(["make", "-C", opbs.REPO, "--no-print-directory", "install"], timeout=600,
             check=True)
    opbs.run(opbs.in_ns(os.path.join(opbs.RUNTIME, "bin", "vmwn-openpbs-install"), "install",
                        "--pbs-exec", opbs.PREFIX, "--pbs-home", opbs.PBS_HOME),
             timeout=120, check=True)
    opbs.wait_for_mom_hook()
    return opbs.Complex(user)


def take_down():
    opbs.run(opbs.in_ns(os.path.join(opbs.RUNTIME, "bin", "vmwn-openpbs-install"),
                        "uninstall", "--pbs-exec", opbs.PREFIX, "--pbs-home", opbs.PBS_HOME),
             timeout=120)
    opbs.run([os.path.join(opbs.REPO, "scripts", "openpbs-down")], timeout=300)


def main(argv=None):
    p = argparse.ArgumentParser(prog="bench/openpbs_bench.py")
    p.add_argument("--jobs", type=int, default=2, help="jobs submitted together (2: the "
                   "node's cores)")
    args = p.parse_args(argv)
    import pwd
    user = pwd.getpwnam("vmwntest")
    cx = bring_up(user)
    workdir = tempfile.mkdtemp(prefix="vmwn-bench-", dir=user.pw_dir)
    os.chown(workdir, user.pw_uid, user.pw_gid)
    os.chmod(workdir, 0o755)
    rows = []
    try:
        install_timers(workdir)
        for n in (1, args.jobs):
            native = run_batch(cx, workdir, n, "")
            vm = run_batch(cx, workdir, n, "-l vmwn=tiny")
            rows.append((n, native, vm))
    finally:
        remove_timers()
        take_down()
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(STAMPS, ignore_errors=True)
    print(batchtable.header("measure (real OpenPBS)"))
    med = batchtable.median
    for n, native, vm in rows:
        print(batchtable.row(f"pbs_mom held by execjob_begin, {n} job(s), median",
                             med(vm["held"]), med(native["held"])))
        print(batchtable.row(f"qsub (queuejob hooks), {n} job(s), median",
                             med(vm["qsub"]), med(native["qsub"])))
        print(batchtable.row(f"{n} job(s) submitted together: all at first instruction",
                             vm["all_running"], native["all_running"] or batchtable.NAN, 2))
    worst = max(max(vm["held"] or [float("nan")]) for _, _, vm in rows)
    print(f"openpbs-bench: mom-held-max={worst:.3f}s goal<=1s "
          f"{'met' if worst <= 1.0 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
