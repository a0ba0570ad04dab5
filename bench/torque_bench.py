"""``make bench`` under the real Torque: what a VM job costs pbs_mom and its submitter.

Measured in one run on the one-host cluster of ``scripts/torque-up``, with vmwn
installed by ``make install`` (tests/torquelib.py):

- how long pbs_mom is blocked per VM job start: the prologue, timed by two
  site steps around vmwn's (``prologue.d/00-bench`` and ``99-bench``);
- how long N VM jobs submitted together take until every one runs its first
  instruction (seen on the host in its ``-k oe`` output file);
- the delay between "guest ready" (the warden's record turning ``running``)
  and the job's first instruction;
- baseline: the same N jobs without a VM, same run;
- what one running VM job costs the node beside its guest: vmwn's processes for it
  (job starter, warden, QEMU launcher, virtiofsd) and their private memory, against
  its QEMU's (bench/jobcost.py).

Prints one table and a summary line.  Usage: ``python bench/torque_bench.py [--jobs N]``.
"""

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(os.path.dirname(HERE), "tests"), os.path.dirname(HERE)]

import torquelib  # noqa: E402

import batchtable  # noqa: E402
import jobcost  # noqa: E402

MEMORY_GOAL_MIB = 15.0  # vmwn's private memory per running VM job

STEPS = os.path.join(torquelib.PBS_HOME, "mom_priv", "prologue.d")
STAMPS = "/var/tmp/vmwn-bench-prologue"
JOB = """#!/bin/sh
echo first-instruction
sleep 2
"""


def _install_timers():
    os.makedirs(STAMPS, exist_ok=True)
    for name, which in (("00-bench", "start"), ("99-bench", "end")):
        path = os.path.join(STEPS, name)
        with open(path, "w") as f:
            f.write(f"#!/bin/sh\ndate +%s.%N > {STAMPS}/\"$1\".{which}\n")
        os.chmod(path, 0o755)


def _remove_timers():
    for name in ("00-bench", "99-bench"):
        try:
            os.unlink(os.path.join(STEPS, name))
        except FileNotFoundError:
            pass


def _stamp(job, which):
    try:
        with open(os.path.join(STAMPS, f"{job}.{which}")) as f:
            return float(f.read())
    except (OSError, ValueError):
        return None


def _ready_times(cluster, jobs, deadline):
    """job -> host time its .o file first showed the first instruction; and the
    time each job's warden record turned 'running' (guest ready)."""
    from vmwn import state
    first, ready = {}, {}
    home = cluster.user.pw_dir
    while len(first) < len(jobs) and time.monotonic() < deadline:
        now = time.time()
        for job in jobs:
            if job not in ready:
                p = os.path.join(torquelib.STATE_DIR, state.safe_name(job), "state.json")
                try:
                    with open(p) as f:
                        if json.load(f).get("phase") == "running":
                            ready[job] = os.stat(p).st_mtime
                except (OSError, ValueError):
                    pass
            if job in first:
                continue
            out = os.path.join(home, f"job.sh.o{job.split('.')[0]}")
            try:
                with open(out, errors="replace") as f:
                    if "first-instruction" in f.read():
                        first[job] = now
            except FileNotFoundError:
                pass
        time.sleep(0.02)
    return first, ready


def run_batch(cluster, workdir, n, options):
    t0 = time.time()
    jobs = [cluster.submit(workdir, JOB, f"-k oe {options}") for _ in range(n)]
    first, ready = _ready_times(cluster, jobs, time.monotonic() + 300)
    for job in jobs:
        cluster.wait(job, timeout=300)
        try:
            os.unlink(os.path.join(cluster.user.pw_dir, f"job.sh.o{job.split('.')[0]}"))
        except FileNotFoundError:
            pass
    blocked = [(_stamp(j, "end") or 0) - (_stamp(j, "start") or 0)
               for j in jobs if _stamp(j, "end") and _stamp(j, "start")]
    all_running = max(first.values()) - t0 if len(first) == n else None
    gaps = [first[j] - ready[j] for j in jobs if j in first and j in ready]
    return {"blocked": blocked, "all_running": all_running, "ready_to_first": gaps}


def measure_cost(cluster, workdir):
    """vmwn's processes and private memory for one VM job, read while it runs (after its
    first instruction), three readings a second apart: the largest."""
    job = cluster.submit(workdir, "#!/bin/sh\necho first-instruction\nsleep 600\n",
                         "-k oe -l other=vmwn=tiny")
    try:
        first, _ = _ready_times(cluster, [job], time.monotonic() + 300)
        if job not in first:
            return None
        session = int(cluster.stat(job).get("session_id") or 0)
        readings = []
        for _ in range(3):
            readings.append(jobcost.cost(torquelib.STATE_DIR, job,
                                         {session: "job starter"} if session else {}))
            time.sleep(1)
        return max(readings, key=lambda r: r[1])
    finally:
        torquelib.run(["qdel", job], check=False)
        cluster.wait(job, timeout=300)
        try:
            os.unlink(os.path.join(cluster.user.pw_dir, f"job.sh.o{job.split('.')[0]}"))
        except FileNotFoundError:
            pass


def main(argv=None):
    p = argparse.ArgumentParser(prog="bench/torque_bench.py")
    p.add_argument("--jobs", type=int, default=4, help="jobs submitted together (4)")
    args = p.parse_args(argv)
    import pwd
    import tempfile
    user = pwd.getpwnam("vmwntest")
    torquelib.bring_up()
    cluster = torquelib.Cluster(user)
    workdir = tempfile.mkdtemp(prefix="vmwn-bench-", dir=user.pw_dir)
    os.chown(workdir, user.pw_uid, user.pw_gid)
    _install_timers()
    rows = []
    try:
        for n in (1, args.jobs):
            native = run_batch(cluster, workdir, n, "")
            vm = run_batch(cluster, workdir, n, "-l other=vmwn=tiny")
            rows.append((n, native, vm))
        cost = measure_cost(cluster, workdir)
    finally:
        _remove_timers()
        torquelib.take_down()
        import shutil
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(STAMPS, ignore_errors=True)
    print(batchtable.header("measure (real Torque 6.1)"))
    med = batchtable.median
    for n, native, vm in rows:
        print(batchtable.row(f"pbs_mom blocked by the prologue, {n} job(s), median",
                             med(vm["blocked"]), med(native["blocked"])))
        print(batchtable.row(f"{n} job(s) submitted together: all at first instruction",
                             vm["all_running"], native["all_running"] or batchtable.NAN, 2))
        print(batchtable.row(f"guest ready -> first instruction, {n} job(s), median",
                             med(vm["ready_to_first"])))
    if cost:
        count, private, qemu, by_role = cost
        print(f"{'one running VM job: vmwn processes beside its QEMU':<58} {count:>10d}")
        print(f"{'  their private memory (MiB)':<58} {private:>10.1f}")
        for role, mib in sorted(by_role.items(), key=lambda kv: -kv[1]):
            print(f"{'    ' + role:<58} {mib:>10.1f}")
        print(f"{'  its QEMU (the guest) private memory (MiB)':<58} {qemu:>10.1f}")
    worst = max(max(vm["blocked"] or [float("nan")]) for _, _, vm in rows)
    memory = (f" vmwn-private-per-job={cost[1]:.1f}MiB goal<={MEMORY_GOAL_MIB:.0f}MiB "
              f"{'met' if cost[1] <= MEMORY_GOAL_MIB else 'NOT met'} "
              f"processes-per-job={cost[0]}") if cost else " vmwn-private-per-job=NOT MEASURED"
    print(f"torque-bench: mom-blocked-max={worst:.3f}s goal<=1s "
          f"{'met' if worst <= 1.0 else 'NOT met'}{memory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
