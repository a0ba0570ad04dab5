"""From an OpenPBS job (as vmwn's hook describes it) to a checked JobSpec.

The environment is the job's ``vmwn`` resource (``qsub -l vmwn=ENV``; the submit
hook turns ``-v VMWN_ENV=ENV`` into it, and a queue's ``resources_default.vmwn``
is OpenPBS's own way to give a default).  vCPUs are the job's ``ncpus`` (what the
scheduler gave it on this host), memory its ``mem`` when it asks for one.
"""

import os
import re

from .. import spec
from ..errors import UserError

# The batch system recorded with each job (its reap judges only its own).
BATCH = "openpbs"

RESOURCE = "vmwn"
ENV_VARIABLE = "VMWN_ENV"
MIB = 1 << 20
_UNITS = {"": 1, "b": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "tb": 1 << 40,
          "pb": 1 << 50, "w": 8, "kw": 8 << 10, "mw": 8 << 20, "gw": 8 << 30, "tw": 8 << 40}


def size_bytes(text):
    """An OpenPBS size (``512mb``, ``2gb``, ``100kb``, ``1024``) in bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmgtp]?[bw]?)\s*", str(text).lower())
    if not m or m.group(2) not in _UNITS:
        raise UserError(f"-l mem={text} is not a size", "ask for mem=N[kb|mb|gb]")
    return int(m.group(1)) * _UNITS[m.group(2)]


def _positive(text, name):
    t = str(text or "").strip()
    if not t:
        return None
    if not t.isdigit() or int(t) < 1:
        raise UserError(f"-l {name}={text} is not a positive number", f"ask for {name}=N")
    return int(t)


def build(cfg, job):
    """``job``: the hook's description (job_id, env, user, group, job_name, queue,
    ncpus, mem, workdir).  Returns a checked JobSpec (``UserError``/``SiteError``)."""
    job_id = job.get("job_id") or ""
    env = cfg.env((job.get("env") or "").strip())
    ncpus = _positive(job.get("ncpus"), "ncpus")
    mem = job.get("mem") or ""
    memory_mib = max(1, -(-size_bytes(mem) // MIB)) if mem.strip() else None
    vcpus, memory = spec.size(cfg, env, job_id, cores=ncpus, given=ncpus,
                              memory_mib=memory_mib)
    user = job.get("user") or ""
    pw, gid, group = spec.account(user, job.get("group") or "")
    workdir = job.get("workdir") or pw.pw_dir
    if not os.path.isabs(workdir):
        raise UserError(f"PBS_O_WORKDIR {workdir!r} is not an absolute path",
                        "submit from an absolute working directory")
    workdir = os.path.normpath(workdir)
    return spec.JobSpec(job_id=job_id, user=user, uid=pw.pw_uid, gid=gid, group=group,
                        job_name=job.get("job_name") or "", env=env, vcpus=vcpus,
                        memory_mib=memory, workdir=workdir, host_workdir=workdir,
                        queue=job.get("queue") or "", batch=BATCH)
