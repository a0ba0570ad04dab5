"""A VM job is charged and limited by pbs_mom like a native one, under a real Torque 6.1.

Both kinds of job run the same CPU-bound script side by side (the test node
has two slots).  pbs_mom checks limits at each poll ($check_poll_time 10 on
the test node, scripts/torque-up).
"""

import glob
import hashlib
import os
import re
import stat
import time

import pytest

import torquelib
from test_torque import cluster, workdir  # noqa: F401  (fixtures)
from vmwn import state
from vmwn_testlib import IMAGE_DIR, needs_image, wait_until

pytestmark = [pytest.mark.torque, pytest.mark.integration, needs_image("tiny")]

BUSY = "#!/bin/sh\ntimeout {secs} sh -c 'while :; do :; done'\necho done\n"
OTHER_USER = "vmwntest2"
JOB_EXEC_OVERLIMIT_CPUT = -12  # Torque's exit status for a job over its cput
JOB_EXEC_OVERLIMIT_MEM = -10  # ... over its vmem (pbs_job.h)


def cput(st):
    h, m, s = st["resources_used.cput"].split(":")
    return int(h) * 3600 + int(m) * 60 + int(s)


def kib(value):
    assert value.endswith("kb"), value
    return int(value[:-2])


def base_files():
    out = {}
    for p in sorted(glob.glob(os.path.join(IMAGE_DIR, "tiny", "*"))):
        s = os.stat(p)
        with open(p, "rb") as f:
            out[p] = (s.st_uid, s.st_gid, stat.S_IMODE(s.st_mode),
                      hashlib.sha256(f.read()).hexdigest())
    return out


def as_other(command):
    return torquelib.run(["su", "-s", "/bin/sh", OTHER_USER, "-c", command], check=False)


# The work is bounded by CPU time, not by the clock: 'ulimit -t 15' ends the loop
# (SIGXCPU) after 15 s of CPU however busy the machine is, where a 15 s timer would
# give the loop whatever share of a core the machine left it.
# pbs_mom charges what its last sample saw, and it samples at each poll, not when a
# process exits: the job says when its work is done (a file) and then waits for the
# test to release it (another file), which the test does once the server's
# resources_used.cput has stopped growing over two samples.
SETTLED = ("#!/bin/sh\ncd \"$PBS_O_WORKDIR\"\nsh -c 'ulimit -t {secs}; while :; do :; done'\n"
           "touch worked.{tag}\nwhile [ ! -e release.{tag} ]; do sleep 0.2; done\necho done\n")
USED = re.compile(r"the virtual machine used ([0-9.]+) s of CPU")


def settled_cput(cluster, workdir, job, tag, timeout=180):
    """Once the job's work is done, wait until pbs_server's resources_used.cput for it
    is the same in two updates with different walltimes, then release the job."""
    end = time.monotonic() + timeout
    worked = os.path.join(workdir, f"worked.{tag}")
    seen = []  # (walltime, cput) updates since the work ended
    while time.monotonic() < end:
        st = cluster.stat(job)
        assert st.get("job_state") == "R", st
        if os.path.exists(worked):
            now = (st.get("resources_used.walltime"), st.get("resources_used.cput"))
            if not seen or now[0] != seen[-1][0]:
                seen.append(now)
            if len(seen) >= 2 and seen[-1][1] == seen[-2][1]:
                break
        time.sleep(0.5)
    else:
        raise AssertionError(f"{job}: resources_used.cput never settled after its work: {seen}")
    release = os.path.join(workdir, f"release.{tag}")
    with open(release, "w", encoding="ascii"):
        pass
    os.chown(release, cluster.user.pw_uid, cluster.user.pw_gid)


@pytest.mark.exclusive  # CPU time: alone, so no other lane takes the CPU it measures
def test_vm_job_is_charged_its_cpu_time_and_its_state_is_its_owners(cluster, workdir):
    before = base_files()
    native = cluster.submit(workdir, SETTLED.format(secs=15, tag="native"), name="native.sh")
    vm = cluster.submit(workdir, SETTLED.format(secs=15, tag="vm"), "-l other=vmwn=tiny",
                        name="vm.sh")
    cluster.wait(vm, states=("R",), timeout=120)
    jdir = state.job_dir_in(torquelib.STATE_DIR, vm)
    wait_until(lambda: os.path.exists(os.path.join(jdir, "state.json")), 10,
               "the prologue to write the job's state record")
    r = as_other(f"cat {jdir}/state.json")
    assert r.returncode != 0 and "Permission denied" in r.stderr, r
    r = as_other(f"ls {jdir}")
    assert r.returncode != 0 and "Permission denied" in r.stderr, r
    settled_cput(cluster, workdir, native, "native")
    settled_cput(cluster, workdir, vm, "vm")
    st_native, st_vm = cluster.wait(native), cluster.wait(vm)
    assert st_native["exit_status"] == "0" and st_vm["exit_status"] == "0", (st_native, st_vm)
    assert 13 <= cput(st_native) <= 17, st_native["resources_used.cput"]
    out, err = cluster.wait_output(workdir, vm, name="vm.sh")
    assert out == "done\n"
    # The guest's 15 s of CPU are guest time, which runs with the clock: what QEMU
    # took of the host for them depends on what else the host ran.  The job is
    # charged what QEMU took, as vmwn measured it when the job ended.
    m = USED.search(err)
    assert m, err
    used = float(m.group(1))
    assert used >= 5, err  # the guest's loop ran in QEMU
    assert abs(cput(st_vm) - used) <= max(3, used * 0.1), (st_vm["resources_used.cput"], err)
    # Memory is the VM's too: its resident guest memory and QEMU's address space.
    assert kib(st_vm["resources_used.mem"]) > 100 * 1024 > kib(st_native["resources_used.mem"])
    assert kib(st_vm["resources_used.vmem"]) > 1024 * 1024, st_vm["resources_used.vmem"]
    assert f"{vm};Task adopted" in cluster.mom_log()
    assert base_files() == before  # owner, mode and content of kernel, initrd and disk
    assert torquelib.wait_clean(vm) == []


@pytest.mark.exclusive  # CPU time
def test_cput_limit_stops_a_vm_job_as_it_stops_a_native_one(cluster, workdir):
    native = cluster.submit(workdir, BUSY.format(secs=120), "-l cput=00:00:10", name="native.sh")
    vm = cluster.submit(workdir, BUSY.format(secs=120), "-l cput=00:00:10,other=vmwn=tiny",
                        name="vm.sh")
    for job, name in ((native, "native.sh"), (vm, "vm.sh")):
        st = cluster.wait(job, timeout=150)
        assert int(st["exit_status"]) == JOB_EXEC_OVERLIMIT_CPUT, st
        assert cput(st) < 60, st["resources_used.cput"]  # stopped, not run to its end
        out, err = cluster.wait_output(workdir, job, name=name)
        assert "job killed: cput" in err and "exceeded limit 10" in err, err
        assert "done" not in out
    assert torquelib.wait_clean(vm) == []


def test_vmem_limit_sees_the_vm(cluster, workdir):
    """vmem is the VM's address space (guest memory and QEMU's): a limit below it stops
    the VM job at the first poll, while the same script runs natively within it."""
    # The native job lives through two polls ($check_poll_time 10); the VM job would
    # run longer, but is stopped at the first poll after its start.
    native = cluster.submit(workdir, BUSY.format(secs=25), "-l vmem=700mb", name="native.sh")
    vm = cluster.submit(workdir, BUSY.format(secs=60), "-l vmem=700mb,other=vmwn=tiny",
                        name="vm.sh")
    st = cluster.wait(vm, timeout=150)
    assert int(st["exit_status"]) == JOB_EXEC_OVERLIMIT_MEM, st
    _, err = cluster.wait_output(workdir, vm, name="vm.sh")
    assert "job killed: vmem" in err and "exceeded limit" in err, err
    st = cluster.wait(native, timeout=150)
    assert st["exit_status"] == "0", st
    assert torquelib.wait_clean(vm) == []


def test_network_policy_under_pbs_mom(cluster, workdir):
    """The prologue runs with pbs_mom's environment (PATH=/bin:/usr/bin): no-loopback
    must still be enforced, and open must still reach the host's loopback."""
    import socket
    import threading
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    port = srv.getsockname()[1]
    seen = []

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"pong\n")
                seen.append(conn.recv(16))
    threading.Thread(target=serve, daemon=True).start()
    script = (f"#!/bin/sh\nif echo ping | nc -w 3 10.0.2.2 {port}; then echo REACHED; "
              "else echo BLOCKED; fi\n")
    try:
        closed = cluster.submit(workdir, script, "-l other=vmwn=tinynolo", name="nolo.sh")
        opened = cluster.submit(workdir, script, "-l other=vmwn=tiny", name="open.sh")
        for job, name, expect in ((closed, "nolo.sh", "BLOCKED"), (opened, "open.sh", "REACHED")):
            st = cluster.wait(job, timeout=150)
            out, err = cluster.wait_output(workdir, job, name=name)
            assert st["exit_status"] == "0" and expect in out, (st, out, err)
        assert len(seen) == 1, seen  # only the open guest's connection arrived
    finally:
        srv.close()
    assert torquelib.wait_clean(closed) == [] and torquelib.wait_clean(opened) == []
