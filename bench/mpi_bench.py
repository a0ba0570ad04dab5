"""``make bench`` for jobs on several nodes: MPI between two guests, against native.

One program (a ping-pong between two ranks, built with the host's mpicc in the
test user's home) runs twice in one run, on the two moms of
``scripts/torque-nodes`` (each node a network namespace of its own):

- natively between the two nodes' namespaces (mpirun in one, its daemon
  started in the other by an rsh agent that enters it);
- as a Torque job of ``nodes=2`` in ``debian12``: one guest per node, over the
  job's own network (VXLAN between the nodes).

Prints the round-trip latency of 8 bytes and the bandwidth of 1 MiB messages,
each with its ratio to native, and a summary line.  Under TCG the guest's
numbers are an emulated CPU's.  Both runs yield when idle (``mpi_yield_when_idle``):
two ranks spinning on a two-core host leave the kernel's network softirq to
ksoftirqd, which then runs once a tick, and every native message waited 4 ms
(measured).  Usage: ``python bench/mpi_bench.py``.
"""

import os
import shlex
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [os.path.join(ROOT, "tests"), ROOT]

from vmwn_testlib import IMAGE_DIR, debian_major, install_runtime  # noqa: E402

NODES = os.path.join(ROOT, "scripts", "torque-nodes")
USER = "vmwntest"
PINGPONG = r"""
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#define SMALL 8
#define LARGE (1 << 20)
static double run(char *buf, int bytes, int iters, int rank) {
    MPI_Barrier(MPI_COMM_WORLD);
    double t = MPI_Wtime();
    for (int i = 0; i < iters; i++) {
        if (rank == 0) {
            MPI_Send(buf, bytes, MPI_CHAR, 1, 0, MPI_COMM_WORLD);
            MPI_Recv(buf, bytes, MPI_CHAR, 1, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        } else {
            MPI_Recv(buf, bytes, MPI_CHAR, 0, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            MPI_Send(buf, bytes, MPI_CHAR, 0, 0, MPI_COMM_WORLD);
        }
    }
    return MPI_Wtime() - t;
}
int main(int argc, char **argv) {
    int rank;
    char *buf = calloc(1, LARGE);
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    run(buf, SMALL, 20, rank);  /* warm-up: connections made */
    double small = run(buf, SMALL, 400, rank), large = run(buf, LARGE, 20, rank);
    if (rank == 0) {
        printf("latency_us %.1f\n", small / 400 / 2 * 1e6);
        printf("bandwidth_mibs %.1f\n", 2.0 * 20 * LARGE / large / (1 << 20));
    }
    MPI_Finalize();
    return 0;
}
"""
YIELD = ["--mca", "mpi_yield_when_idle", "1"]
# mpirun's rsh agent for the native run: "AGENT [options] HOST COMMAND..." runs
# COMMAND in HOST's namespaces (scripts/torque-nodes run).
AGENT = """#!/bin/sh
while [ "${1#-}" != "$1" ]; do shift; done
host=$1; shift
exec %s run "$host" sh -c "$*"
"""


def sh(argv, timeout=600, check=True):
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and cp.returncode != 0:
        raise SystemExit(f"mpi-bench: {' '.join(argv[:6])}...: {cp.stderr.strip()[-800:]}")
    return cp


def as_user(command, cwd, host="tqs"):
    return sh([NODES, "run", host, "su", "-s", "/bin/sh", USER, "-c",
               f"cd {shlex.quote(cwd)} && {command}"])


def parse(text):
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        if k in ("latency_us", "bandwidth_mibs"):
            out[k] = float(v)
    return out


def native(workdir):
    agent = os.path.join(workdir, "nsrsh")
    with open(agent, "w") as f:
        f.write(AGENT % shlex.quote(NODES))
    os.chmod(agent, 0o755)
    cp = sh([NODES, "run", "tq2", "mpirun", "--allow-run-as-root", "--mca", "plm_rsh_agent",
             agent, "--host", "tq2,tq1", "-np", "2", *YIELD, os.path.join(workdir, "pingpong")])
    return parse(cp.stdout)


def in_guests(workdir):
    with open(os.path.join(workdir, "job.sh"), "w") as f:
        f.write('cd "$PBS_O_WORKDIR"\nmpirun --hostfile "$PBS_NODEFILE" -np 2 '
                f'{" ".join(YIELD)} ./pingpong\n')
    job = as_user("qsub -l nodes=2:ppn=1 -l other=vmwn=debian12 job.sh", workdir).stdout.strip()
    end = time.monotonic() + 900
    seq = job.split(".")[0]
    out = os.path.join(workdir, f"job.sh.o{seq}")
    while not os.path.exists(out) or not sh([NODES, "run", "tqs", "qstat", "-f", job],
                                             check=False).stdout.count("job_state = C"):
        if time.monotonic() > end:
            raise SystemExit(f"mpi-bench: job {job} did not end in 900 s")
        time.sleep(1)
    with open(out) as f:
        return parse(f.read())


def main(argv=None):
    del argv
    if os.geteuid() != 0 or not shutil.which("mpicc") or \
            not os.path.exists(os.path.join(IMAGE_DIR, "debian12", "disk.qcow2")):
        print("mpi-bench: skipped (needs root, mpicc and the debian12 image)")
        return 0
    if debian_major() != "12":
        print("mpi-bench: skipped (the guest is Debian 12; this host's mpicc is not)")
        return 0
    import pwd
    pw = pwd.getpwnam(USER)
    install_runtime()
    sh([NODES, "up"], timeout=300)
    workdir = os.path.join(pw.pw_dir, f"vmwn-mpi-bench-{os.getpid()}")
    os.makedirs(workdir)
    os.chown(workdir, pw.pw_uid, pw.pw_gid)
    try:
        with open(os.path.join(workdir, "pingpong.c"), "w") as f:
            f.write(PINGPONG)
        sh(["su", "-s", "/bin/sh", USER, "-c",
            f"cd {shlex.quote(workdir)} && mpicc -O2 -o pingpong pingpong.c"])
        base, vm = native(workdir), in_guests(workdir)
    finally:
        sh([NODES, "down"], check=False)
        shutil.rmtree(workdir, ignore_errors=True)
    lat = vm.get("latency_us", float("nan")) / base.get("latency_us", float("nan"))
    bw = vm.get("bandwidth_mibs", float("nan")) / base.get("bandwidth_mibs", float("nan"))
    print(f"{'MPI between two nodes (2 ranks, 1 per node)':<58} {'guests':>10} "
          f"{'native':>10} {'ratio':>7}\n" + "-" * 88)
    print(f"{'round-trip latency / 2, 8 bytes (us)':<58} {vm.get('latency_us', 0):>10.1f} "
          f"{base.get('latency_us', 0):>10.1f} {lat:>7.1f}")
    print(f"{'bandwidth, 1 MiB messages (MiB/s)':<58} {vm.get('bandwidth_mibs', 0):>10.1f} "
          f"{base.get('bandwidth_mibs', 0):>10.1f} {bw:>7.2f}")
    print(f"mpi-bench: latency guest/native={lat:.1f}x bandwidth guest/native={bw:.2f}x "
          "(guests over the job's VXLAN network; TCG here)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
