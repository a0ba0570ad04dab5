"""From a Slurm batch job (as vmwn's SPANK plugin describes it) to a checked JobSpec.

The environment is the job's ``--vmwn`` option.  vCPUs are the CPUs Slurm gave
the job on this node (``S_JOB_NCPUS``); memory is ``--mem`` when the job asked
for it (``SLURM_MEM_PER_NODE``, in MiB, never above what Slurm allocated:
the variable is the job's own), else the environment's default: a job that
asked for nothing must not get the whole node's memory as its VM's.  The group
is the job's (``S_JOB_GID``).
"""

import grp
import os
import pwd

from .. import spec
from ..errors import SiteError, UserError

# The batch system recorded with each job (its reap judges only its own).
BATCH = "slurm"


def _number(text, what, fix):
    t = str(text or "").strip()
    if not t:
        return None
    if not t.isdigit() or int(t) < 1:
        raise UserError(f"{what} {text!r} is not a positive number", fix)
    return int(t)


def build(cfg, job):
    """``job``: the plugin's description (job_id, env, uid, gid, ncpus, mem_mb,
    workdir, job_name).  Returns a checked JobSpec (``UserError``/``SiteError``)."""
    job_id = job.get("job_id") or ""
    env = cfg.env((job.get("env") or "").strip())
    ncpus = _number(job.get("ncpus"), "the job's CPUs", "ask for --cpus-per-task=N")
    memory_mib = _number(job.get("mem_mb"), "--mem", "ask for --mem=N[M|G]")
    alloc = _number(job.get("alloc_mb"), "the job's allocated memory", "ask for --mem=N[M|G]")
    if memory_mib and alloc and memory_mib > alloc:  # the variable is the job's own
        memory_mib = alloc
    vcpus, memory = spec.size(cfg, env, job_id, cores=ncpus, given=ncpus,
                              memory_mib=memory_mib)
    try:
        user = pwd.getpwuid(int(job.get("uid") or -1)).pw_name
    except (KeyError, ValueError, OverflowError):
        raise SiteError(f"the job's uid {job.get('uid')!r} is unknown on this node",
                        "make the node's passwd agree with slurmctld's") from None
    try:
        group = grp.getgrgid(int(job.get("gid") or -1)).gr_name
    except (KeyError, ValueError, OverflowError):
        group = ""  # the user's primary group
    pw, gid, group = spec.account(user, group)
    workdir = job.get("workdir") or pw.pw_dir
    if not os.path.isabs(workdir):
        raise UserError(f"SLURM_SUBMIT_DIR {workdir!r} is not an absolute path",
                        "submit from an absolute working directory")
    workdir = os.path.normpath(workdir)
    return spec.JobSpec(job_id=job_id, user=user, uid=pw.pw_uid, gid=gid, group=group,
                        job_name=job.get("job_name") or "", env=env, vcpus=vcpus,
                        memory_mib=memory, workdir=workdir, host_workdir=workdir, queue="",
                        batch=BATCH)
