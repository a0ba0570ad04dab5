"""Run by scripts/debian13-smoke-inside, in its Debian 13 root: warm starts on QEMU 10,
libvirt 11 and the Rust virtiofsd.

- MOUNTED (warm = on, mounted mode) is prepared, then two jobs restore it: each must
  be restored (not booted), have its working directory hot-plugged and mounted (a
  file written in the guest is on the host at once, the job's), its clock within
  1 s of the host's and a machine-id and random bytes of its own.
- COPY (warm = on, copy mode) is prepared on a QEMU that maps a read-only file
  private: two jobs restored together map the prepared memory itself, and their
  pages of it are shared (each QEMU's mapping of it has shared pages); what each
  holds for itself is printed against a guest of BOOTED (the same, cold).
Nothing of any job may be left.  One line of verdict each; exit 0 when all hold.
Standard library and vmwn only (the root has no pytest).

    python3 tests/debian13_warm.py CONFIG MOUNTED COPY BOOTED
"""

import os
import shutil
import sys
import tempfile
import time

from vmwn import config, lifecycle, state, usage, warm
from vmwn.spec import JobSpec
from vmwn.ssh import Guest

UID, GID = 4242, 4343  # a job user with no account here, as on a node without NSS
PROBE = ("echo made-in-guest > out; "
         "adjtimex | awk '/tv_sec/ { s = $2 } /tv_usec/ { printf \"%d.%06d\\n\", s, $2 }'; "
         "cat /etc/machine-id; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo")


def start(cfg, env, job, workdir):
    spec = JobSpec(job_id=job, user="alice", uid=UID, gid=GID, group="lab",
                   job_name="warm", env=env, vcpus=1, memory_mib=env.memory_mib,
                   workdir=workdir, host_workdir=workdir if env.data == "mounted" else "/nonexistent")
    return lifecycle.create(cfg, spec, time.monotonic() + env.boot_timeout + 30)


def probe(st, workdir, found):
    """(machine-id, random bytes) of the job's guest; what is wrong goes to ``found``."""
    with Guest.connect(st) as g:
        before = time.time()
        status, out, err = g.run(f"cd '{workdir}' && {PROBE}", timeout=60)
        after = time.time()
    if status != 0:
        found.append(f"{st.job_id}: the probe exited {status}: "
                     f"{err.decode(errors='replace')[-200:]}")
        return None
    clock, machine_id, rnd = out.decode().split()
    if not before - 0.5 < float(clock) < after + 0.5:  # the host's time, not the RTC's
        found.append(f"{st.job_id}: the guest's clock is {float(clock) - after:+.2f} s off")
    return machine_id, rnd


def own_mib(st):
    """What the job's QEMU holds for itself: anonymous memory and its memfds."""
    return usage.own_memory(usage.qemu_of(st.vm_pid)) / (1 << 20)


def shared_pages_of(st, path):
    """kB of the mapping of ``path`` in the job's QEMU that other processes map too."""
    qemu, total, inside = usage.qemu_of(st.vm_pid), 0, False
    with open(f"/proc/{qemu}/smaps", encoding="utf-8", errors="replace") as f:
        for line in f:
            if "-" in line.split(" ", 1)[0]:
                inside = line.rstrip().endswith(path)
            elif inside and line.startswith(("Shared_Clean:", "Shared_Dirty:")):
                total += int(line.split()[1])
    return total


def mounted(cfg, env, found):
    ids = []
    for i in range(2):
        workdir = tempfile.mkdtemp(prefix="vmwn-warm-", dir="/tmp")
        os.chown(workdir, UID, GID)
        job = f"14.{os.getpid()}.{i}.warm"
        try:
            st = start(cfg, env, job, workdir)
            try:
                if not st.warm:
                    found.append(f"{job} booted cold")
                ids.append(probe(st, workdir, found))
            finally:
                lifecycle.destroy(cfg, job)
            path = os.path.join(workdir, "out")
            if not os.path.isfile(path) or os.stat(path).st_uid != UID:
                found.append(f"{job}: the file written in the guest is not on the host as "
                             "the job's")
            if os.path.lexists(state.job_dir(cfg, job)):
                found.append(f"{state.job_dir(cfg, job)} is left")
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    if None not in ids and (ids[0][0] == ids[1][0] or ids[0][1] == ids[1][1]):
        found.append("two restored jobs share a machine-id or random bytes")


def copied(cfg, env, booted, found):
    """Two restored together: their memory; one booted: its memory."""
    gen = warm.current(cfg, env)
    if warm.restore_by(gen.path, []) != "map":
        found.append("this QEMU cannot map the prepared memory private ('rom')")
        return ""
    jobs, sts = [f"15.{os.getpid()}.{i}.warm" for i in range(2)], []
    try:
        for job in jobs:
            sts.append(start(cfg, env, job, "/tmp"))
        for st in sts:
            if not st.warm:
                found.append(f"{st.job_id} booted cold")
            probe(st, "/tmp", found)
        shared = [shared_pages_of(st, os.path.realpath(gen.ram)) for st in sts]
        if not all(shared):
            found.append(f"the restored guests share no page of the prepared memory {shared}")
        own = [own_mib(st) for st in sts]
    finally:
        for job in jobs:
            lifecycle.destroy(cfg, job)
    job = f"16.{os.getpid()}.booted"
    try:
        st = start(cfg, booted, job, "/tmp")
        base = own_mib(st)
    finally:
        lifecycle.destroy(cfg, job)
    for j in jobs + [job]:
        if os.path.lexists(state.job_dir(cfg, j)):
            found.append(f"{state.job_dir(cfg, j)} is left")
    return (f"its own memory {max(own):.0f} MiB per restored guest, {base:.0f} MiB booted "
            f"({max(own) / base:.2f}), {min(shared) >> 10} MiB of the prepared memory shared")


def main(argv=None) -> int:
    conf, mnt_name, copy_name, booted_name = (argv if argv is not None else sys.argv[1:])[:4]
    cfg = config.load(conf)
    rc = 0
    for name in (mnt_name, copy_name):
        env, found, said = cfg.env(name), [], ""
        try:
            cost = warm.prepare(cfg, env, say=lambda line: None)
            if env.data == "mounted":
                mounted(cfg, env, found)
            else:
                said = copied(cfg, env, cfg.env(booted_name), found)
        finally:
            warm.drop(cfg, env.name)
        print(f"warm {name} ({env.data}): "
              + ("; ".join(found) if found else
                 f"2 restored, {cost['ram_bytes'] >> 20} MiB memory, "
                 f"{cost['state_bytes'] >> 10} KiB state{', ' + said if said else ''}: ok"),
              flush=True)
        rc |= 1 if found else 0
    return rc


if __name__ == "__main__":
    sys.exit(main())
