"""Jobs on several nodes under a real Torque: a guest on every node of the job.

``scripts/torque-nodes`` brings up a server and two moms, each host in network,
UTS and mount namespaces of its own (its own name, address, trqauthd and
PBS_HOME; nothing outside them has an address on their bridge), with vmwn
installed in each mom as a site installs it and a vmwn.conf per node.  The
user submits with qsub from the server's host; what is checked is what the user
sees (the .o/.e files, qstat) and that nothing is left on either node.
"""

import os
import re
import shlex
import shutil
import subprocess

import pytest

from vmwn.domain import guest_hostname

import torquelib
from vmwn_testlib import IMAGE_DIR, debian_major, install_runtime, wait_until

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "torque-nodes")
TOP = "/var/spool/vmwn-torque-nodes"
NODES = ("tq1", "tq2")


def _nodes(*args, check=True, timeout=120):
    cp = subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=timeout)
    if check and cp.returncode != 0:
        raise AssertionError(f"torque-nodes {' '.join(args)}: {cp.stderr.strip()[-1500:]}")
    return cp


def _links(ns_pid=None):
    argv = ["ip", "-o", "link", "show"]
    if ns_pid:
        argv = ["nsenter", "-t", str(ns_pid), "-n"] + argv
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return {ln.split(":")[1].strip().split("@")[0] for ln in out.splitlines()}


class Nodes(torquelib.Cluster):
    """The namespaced cluster, as its job submitter uses it (on the server's host)."""

    def as_user(self, command, cwd, timeout=60):
        line = f"cd {shlex.quote(cwd)} && {command}"
        return _nodes("run", "tqs", "su", "-s", "/bin/sh", self.user.pw_name, "-c", line,
                      check=False, timeout=timeout)

    def qstat(self, *args):
        return _nodes("run", "tqs", "qstat", *args, check=False)

    def remains(self, job_id):
        """What of the job is left on either node: its state, overlay, domains, the
        job network's devices (in libvirt's namespace or the node's)."""
        from vmwn import virt
        found = []
        for i, node in enumerate(NODES):
            home = os.path.join(TOP, node, "vmwn")
            for sub in ("jobs", "overlays"):
                d = os.path.join(home, sub)
                found += [f"{node}: {sub}/{n}" for n in (os.listdir(d) if os.path.isdir(d)
                                                         else []) if not n.startswith(".")]
            with open(os.path.join(TOP, f"{node}.pid")) as f:
                devs = _links(int(f.read()))
            found += [f"{node}: device {d}" for d in devs if d.startswith("vj")]
        found += [f"device {d}" for d in _links() if d.startswith("vj")]
        conn = virt.connect("qemu:///system")
        try:
            found += [f"domain {d.name()}" for d, meta in virt.vmwn_domains(conn)
                      if meta.get("id") == job_id]
        finally:
            conn.close()
        return found


@pytest.fixture(scope="module")
def cluster(test_user):
    if not os.path.exists(os.path.join(torquelib.PREFIX, "sbin", "pbs_mom")):
        pytest.skip("no Torque built (make torque)")
    if not os.path.exists(os.path.join(IMAGE_DIR, "tiny", "initrd.img")):
        pytest.skip("no tiny image (make guest)")
    install_runtime()
    try:
        _nodes("up", timeout=300)
        yield Nodes(test_user)
    finally:
        _nodes("down", check=False)


@pytest.fixture
def workdir(test_user):
    """A directory in the user's home (every node's guest mounts the home)."""
    d = os.path.join(test_user.pw_dir, f"vmwn-nodes-{os.getpid()}")
    os.makedirs(d, exist_ok=True)
    os.chown(d, test_user.pw_uid, test_user.pw_gid)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _conf(node, text):
    """A drop-in in one node's vmwn.conf.d (the next job reads it)."""
    path = os.path.join(TOP, node, "etc", "vmwn", "vmwn.conf.d", "60-test.conf")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def test_a_job_on_two_nodes_runs_in_a_guest_on_each(cluster, workdir):
    job = cluster.submit(workdir, """\
cat "$PBS_NODEFILE"
for h in $(sort -u "$PBS_NODEFILE"); do ssh "$h" 'echo "$(hostname) $(id -un) $(pwd)"'; done
ssh "$(tail -n 1 "$PBS_NODEFILE")" "echo from the sister > $PBS_O_WORKDIR/sister.txt"
exit 3
""", "-l nodes=2:ppn=1 -l other=vmwn=tiny")
    st = cluster.wait(job, timeout=300)
    out, err = cluster.wait_output(workdir, job)
    assert st.get("exit_status") == "3", (st, out, err)
    names = [guest_hostname(job, i) for i in range(2)]
    lines = out.splitlines()
    # The node file names the guests, the mother superior's first, as the hosts were.
    assert lines[:2] == names, (st["exec_host"], out, err)
    home = cluster.user.pw_dir
    for name in names:  # each guest, reached by name as the job's user, in its home
        assert f"{name} {cluster.user.pw_name} {home}" in lines
    with open(os.path.join(workdir, "sister.txt")) as f:  # the sister's guest mounts it too
        assert f.read() == "from the sister\n"
    assert os.stat(os.path.join(workdir, "sister.txt")).st_uid == cluster.user.pw_uid
    wait_until(lambda: not cluster.remains(job), 30, f"nothing of {job} left")


def test_qdel_mid_run_ends_the_job_on_both_nodes_and_leaves_nothing(cluster, workdir):
    job = cluster.submit(workdir, """\
sister=$(tail -n 1 "$PBS_NODEFILE")
ssh "$sister" "sleep 600" &
echo running > "$PBS_O_WORKDIR/started"
sleep 600
""", "-l nodes=2:ppn=1 -l other=vmwn=tiny")
    wait_until(lambda: os.path.exists(os.path.join(workdir, "started")), 240,
               "the job running in its guests")
    assert cluster.remains(job)  # both guests are up
    cp = cluster.as_user(f"qdel {job}", workdir)
    assert cp.returncode == 0, cp.stderr
    cluster.wait(job, timeout=120)
    wait_until(lambda: not cluster.remains(job), 60, f"nothing of {job} left")


def test_a_sister_whose_guest_does_not_boot_fails_the_job_once_naming_it(cluster, workdir):
    """tq1's 'tinysis' never boots (its init is missing); tq2's is tiny.  Whichever
    is the sister, the job fails once, with the node and the reason on its .e."""
    good = ("[env tinysis]\ndescription = tiny\n" + torquelib.TINY.replace(
        "memory = 256M\n", "memory = 256M\nboot_timeout = 20\n"))
    stuck = good.replace("quiet", "quiet rdinit=/nonexistent panic=0")
    paths = [_conf("tq1", stuck), _conf("tq2", good)]
    try:
        job = cluster.submit(workdir, "echo ran\n", "-l nodes=2:ppn=1 -l other=vmwn=tinysis")
        st = cluster.wait(job, timeout=300)
        out, err = cluster.wait_output(workdir, job)
    finally:
        for p in paths:
            os.unlink(p)
    assert "ran" not in out
    first = st["exec_host"].split("+")[0].split("/")[0]
    if first == "tq2":  # tq1 is the sister: its guest never answers
        assert st.get("exit_status") not in ("0", None), st
        assert "the job's guest on node tq1 did not answer over the job's network" in err, err
    else:  # tq1 is the mother superior: its own guest fails to boot, the job with it
        assert st.get("exit_status") not in ("0", None), st
        assert "vmwn:" in err, err
    wait_until(lambda: not cluster.remains(job), 60, f"nothing of {job} left")



HELLO = r"""
#include <mpi.h>
#include <stdio.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int rank, size; char host[256];
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    gethostname(host, sizeof host);
    printf("hello from rank %d of %d on %s\n", rank, size, host);
    MPI_Finalize();
    return 0;
}
"""

# A token goes round the ring ROUNDS times one way, then as many the other way;
# each rank adds its rank + 1 as it passes.  Rank 0 prints the sums.
RING = r"""
#include <mpi.h>
#include <stdio.h>
#define ROUNDS 100
int main(int argc, char **argv) {
    int rank, size; long token;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    for (int dir = 1; dir >= -1; dir -= 2) {
        int next = (rank + dir + size) % size, prev = (rank - dir + size) % size;
        token = 0;
        for (int r = 0; r < ROUNDS; r++) {
            if (rank == 0) {
                token += 1;
                MPI_Send(&token, 1, MPI_LONG, next, 0, MPI_COMM_WORLD);
                MPI_Recv(&token, 1, MPI_LONG, prev, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            } else {
                MPI_Recv(&token, 1, MPI_LONG, prev, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
                token += rank + 1;
                MPI_Send(&token, 1, MPI_LONG, next, 0, MPI_COMM_WORLD);
            }
        }
        if (rank == 0) printf("ring %s %ld\n", dir > 0 ? "forward" : "backward", token);
    }
    MPI_Finalize();
    return 0;
}
"""


def test_mpi_hello_and_ring_across_two_debian12_guests(cluster, workdir):
    """Programs built with the host's mpicc in the user's home run across the
    job's two guests: a line from each rank, and a token round the ring both ways."""
    if not os.path.exists(os.path.join(IMAGE_DIR, "debian12", "disk.qcow2")):
        pytest.skip("no debian12 image (make guest)")
    if not shutil.which("mpicc"):
        pytest.skip("no mpicc on this host (make deps installs libopenmpi-dev)")
    if debian_major() != "12":
        pytest.skip("the guest is Debian 12: a program built on this host would not run there")
    for name, text in (("hello", HELLO), ("ring", RING)):
        path = os.path.join(workdir, f"{name}.c")
        with open(path, "w") as f:
            f.write(text)
        os.chown(path, cluster.user.pw_uid, cluster.user.pw_gid)
        cp = torquelib.run(["su", "-s", "/bin/sh", cluster.user.pw_name, "-c",
                            f"cd {shlex.quote(workdir)} && mpicc -O2 -o {name} {name}.c"],
                           check=False)
        assert cp.returncode == 0, cp.stderr
    job = cluster.submit(workdir, """\
cd "$PBS_O_WORKDIR"
mpirun --hostfile "$PBS_NODEFILE" -np 2 ./hello | sort
mpirun --hostfile "$PBS_NODEFILE" -np 2 ./ring
""", "-l nodes=2:ppn=1 -l other=vmwn=debian12")
    st = cluster.wait(job, timeout=900)
    out, err = cluster.wait_output(workdir, job)
    assert st.get("exit_status") == "0", (st, out, err)
    names = [guest_hostname(job, i) for i in range(2)]
    lines = out.splitlines()
    assert lines[:2] == [f"hello from rank {r} of 2 on {names[r]}" for r in range(2)], (out, err)
    # Forward: each round adds 1 (rank 0) + 2 (rank 1); backward the same.
    assert lines[2:4] == ["ring forward 300", "ring backward 300"], (out, err)
    wait_until(lambda: not cluster.remains(job), 60, f"nothing of {job} left")


def test_each_nodes_mom_charges_its_own_guest(cluster, workdir):
    """The sister's guest burns CPU while the mother superior's waits: the job's
    cput holds the sister's VM too, beyond what the first VM used (its .e line).
    The moms poll every 10 s ($check_poll_time): the job outlives a poll after
    the loop."""
    job = cluster.submit(workdir, """\
sister=$(tail -n 1 "$PBS_NODEFILE")
ssh "$sister" 'i=0; while [ $i -lt 1500000 ]; do i=$((i+1)); done; echo looped'
sleep 15
""", "-l nodes=2:ppn=1 -l other=vmwn=tiny")
    st = cluster.wait(job, timeout=300)
    out, err = cluster.wait_output(workdir, job)
    assert st.get("exit_status") == "0" and "looped" in out, (st, out, err)
    first = re.search(r"the virtual machine used ([0-9.]+) s of CPU", err)
    assert first, err
    h, m, s = (int(x) for x in st["resources_used.cput"].split(":"))
    cput = h * 3600 + m * 60 + s
    # Without the sister's adoption the job's cput is the first VM's, to the second.
    assert cput - float(first.group(1)) >= 3, (st["resources_used.cput"], err)
    wait_until(lambda: not cluster.remains(job), 60, f"nothing of {job} left")
