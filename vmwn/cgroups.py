"""Linux control groups (v1): moving a job's VM into the CPU accounting group of one
of the job's own processes, so that a batch system that counts a job by its cgroups
(Slurm's jobacct_gather/cgroup) counts the VM's CPU as the job's.

QEMU is libvirtd's child: it starts outside every cgroup of the job.  Only the
``cpuacct`` hierarchy is joined: it holds no limit, and libvirt does not use it
(QEMU sits in its root), so nothing of libvirt's placement changes.  Memory,
cpuset and freezer would carry the job's limits and the batch system's signals
to QEMU; they are left alone (a memory limit sized for the job's processes would
OOM-kill the guest).  A host with cgroup v2 only has no separate accounting
hierarchy to join, and nothing is moved there.
"""

import os

CONTROLLERS = ("cpuacct",)


def mounts(mountinfo="/proc/self/mountinfo"):
    """{controller: mount point} of the cgroup v1 hierarchies mounted here."""
    out = {}
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        pre, sep, post = line.partition(" - ")
        fields, rest = pre.split(), post.split()
        if not sep or len(fields) < 5 or len(rest) < 3 or rest[0] != "cgroup":
            continue
        point = fields[4].replace("\\040", " ")
        for opt in rest[2].split(","):
            if opt not in ("rw", "ro") and ("=" not in opt or opt.startswith("name=")):
                out.setdefault(opt, point)
    return out


def membership(pid, proc="/proc"):
    """{controller: path} of ``pid``'s cgroup v1 groups."""
    out = {}
    try:
        with open(os.path.join(proc, str(pid), "cgroup"), encoding="utf-8",
                  errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        for c in controllers.split(","):
            if c:
                out[c] = path
    return out


def names_job(path, job_id):
    """True when a component of the group ``path`` names job ``job_id``: the id itself,
    or ending in ``_ID`` (Slurm's ``job_12``)."""
    return any(p == job_id or p.endswith("_" + job_id) for p in path.split("/"))


def join(pids, of_pid, job_id=None, controllers=CONTROLLERS, proc="/proc",
         mountinfo="/proc/self/mountinfo"):
    """Move each of ``pids`` into ``of_pid``'s groups of ``controllers``; returns the
    ``cgroup.procs`` files written.  With ``job_id``, only into a group that names the
    job (:func:`names_job`): a process of the same user in another group (another
    job's, a login's) cannot take the VM there.  A pid that has gone is skipped; any
    other failure raises OSError."""
    where = mounts(mountinfo)
    theirs = membership(of_pid, proc)
    done = []
    for c in controllers:
        if c not in where or c not in theirs:
            continue
        if job_id is not None and not names_job(theirs[c], job_id):
            raise OSError(f"cgroup {theirs[c]!r} of pid {of_pid} names no job {job_id}")
        rel = theirs[c].lstrip("/")
        target = os.path.normpath(os.path.join(where[c], rel, "cgroup.procs"))
        if not target.startswith(os.path.join(where[c], "")):
            raise OSError(f"cgroup path {theirs[c]!r} leaves {where[c]}")
        for pid in pids:
            try:
                with open(target, "w", encoding="ascii") as f:
                    f.write(str(pid))
            except ProcessLookupError:
                continue
        done.append(target)
    return done
