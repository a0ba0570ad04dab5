"""From a parsed Torque job to a vmwn request: which environment, how many vCPUs, how much memory.

The environment comes from ``-l other=vmwn=NAME`` (the only place a user can
put a free-form request that pbs_mom passes to the prologue), else from
``VMWN_ENV`` in the job's Variable_List, else from the queue's default in
``[site] queue_defaults``.  Sizes come from what Torque allocated on this node;
asking for more than the environment or the node allows is the user's mistake.
"""

import dataclasses
import os
import socket

from .. import spec
from . import pbs
from ..errors import SiteError, TransientError, UserError

# The batch system recorded with each job (its reap judges only its own).
BATCH = "torque"

ENV_VARIABLE = "VMWN_ENV"
OTHER_PREFIX = "vmwn="
MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Choice:
    """The environment a job asked for, and where the request came from."""
    name: str
    source: str


def requested_env(cfg, args, variables):
    """The job's environment request, or None for a plain host job.

    ``variables`` is a callable returning the job's Variable_List; it is only
    called when argv does not already answer the question.
    """
    other = pbs.parse_resources(args.resources).get("other", "")
    if other.startswith(OTHER_PREFIX):
        name = other[len(OTHER_PREFIX):].strip()
        if not name:
            raise UserError("-l other=vmwn= names no environment",
                            "ask for -l other=vmwn=NAME")
        return Choice(name, "-l other")
    name = (variables().get(ENV_VARIABLE) or "").strip()
    if name:
        return Choice(name, ENV_VARIABLE)
    name = cfg.site["queue_defaults"].get(args.queue)
    if name:
        return Choice(name, f"default of queue {args.queue}")
    return None


def _positive_int(text, name):
    t = str(text).strip()
    if not t.isdigit() or int(t) < 1:
        raise UserError(f"-l {name}={text} is not a positive number", f"ask for {name}=N")
    return int(t)


def cores(resources, environ):
    """Cores the job holds on this node, or None when the job does not say.

    ``nodes=N:ppn=M``, ``ncpus=N`` and ``procs=N`` all count; the largest wins
    (a job on several nodes: the most any of its nodes asks for).
    """
    counts = []
    nodes = resources.get("nodes")
    if nodes:
        parts = pbs.parse_nodes(nodes)
        if parts:
            counts.append(max(p.ppn for p in parts))
    for name in ("ncpus", "procs"):
        if resources.get(name):
            counts.append(_positive_int(resources[name], name))
    return max(counts) if counts else None


def node_count(resources, environ):
    """How many nodes the job spans: what the server gave it, else what it asked for."""
    given = (environ.get("PBS_NUM_NODES") or "").strip()
    if given.isdigit() and int(given) > 0:
        return int(given)
    return sum(p.count for p in pbs.parse_nodes(resources.get("nodes", ""))) or 1


def job_nodes(job_id, environ, here=None):
    """(the job's hosts, the mother superior first; this host's index among them).

    The server's ``exec_host`` (pbs_python) names them on every node; the
    mother superior's node file does too, where the server cannot be asked.
    """
    hosts = pbs.server_exec_hosts(job_id)
    if not hosts and environ.get("PBS_NODEFILE"):
        try:
            with open(environ["PBS_NODEFILE"], encoding="utf-8", errors="replace") as f:
                hosts = pbs.exec_hosts("+".join(f.read(1 << 20).split()))
        except OSError:
            hosts = None
    if not hosts:
        raise TransientError(f"cannot tell the nodes of job {job_id}: the server did not "
                             "answer", "check that pbs_python on the node reaches pbs_server")
    here = (here or socket.gethostname()).split(".")[0]
    for i, host in enumerate(hosts):
        if host.split(".")[0] == here:
            return tuple(hosts), i
    raise SiteError(f"this node ({here}) is not among job {job_id}'s nodes "
                    f"{' '.join(hosts)}", "give the node the host name its server knows it by")


def allocated_cores(environ):
    """Cores the scheduler gave the job on this node, or None when nothing says.

    Measured under Torque 6.1: the prologue's environment has PBS_NODEFILE but
    none of PBS_NP / PBS_NUM_PPN, so the node file decides: one line per slot,
    this node's name on the lines that are this node's (the first line names
    the mother superior).
    """
    for name in ("PBS_NUM_PPN", "PBS_NP"):
        v = (environ.get(name) or "").strip()
        if v.isdigit() and int(v) > 0:
            return int(v)
    path = environ.get("PBS_NODEFILE")
    if not path:
        return None
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            hosts = [ln.strip() for ln in f.read(1 << 20).splitlines() if ln.strip()]
    except OSError:
        return None
    if not hosts:
        return None
    here = (environ.get("PBS_MSHOST") or hosts[0]).strip()
    return sum(1 for h in hosts if h == here) or None


def memory_mib(resources, ncores):
    """Memory the job asked for in MiB (``mem``, else ``pmem`` x cores), or None."""
    if resources.get("mem"):
        b = pbs.size_bytes(resources["mem"])
    elif resources.get("pmem"):
        b = pbs.size_bytes(resources["pmem"]) * ncores
    else:
        return None
    return max(1, -(-b // MIB))


def workdir_cut_at_comma(path):
    """True when ``path`` is missing because Torque cut PBS_O_WORKDIR at a comma
    (it splits Variable_List at commas): a sibling is named ``<base>,...``."""
    parent, base = os.path.split(path.rstrip("/"))
    try:
        os.lstat(path)
        return False
    except FileNotFoundError:
        pass
    except OSError:
        return False  # root may not see into it (root-squashed NFS): not ours to judge
    try:
        return any(n.startswith(base + ",") for n in os.listdir(parent or "/"))
    except OSError:
        return False


def build(cfg, choice, args, environ, variables):
    """Read a job's request against its environment and this node; return a checked
    JobSpec (``UserError``/``SiteError`` naming what to change)."""
    env = cfg.env(choice.name)
    res = pbs.parse_resources(args.resources)
    n = cores(res, environ)
    vcpus, mem = spec.size(cfg, env, args.job_id, cores=n, given=allocated_cores(environ),
                           memory_mib=memory_mib(res, n or 1))
    pw, gid, group = spec.account(args.user, args.group)
    workdir = environ.get("PBS_O_WORKDIR") or variables().get("PBS_O_WORKDIR") or pw.pw_dir
    if not os.path.isabs(workdir):
        raise UserError(f"PBS_O_WORKDIR {workdir!r} is not an absolute path",
                        "submit from an absolute working directory")
    workdir = os.path.normpath(workdir)
    if workdir_cut_at_comma(workdir):
        raise UserError(f"the job's working directory {workdir} does not exist: Torque cuts "
                        "PBS_O_WORKDIR at a comma",
                        "submit from a directory whose path has no comma")
    nodes, index = (), 0
    if node_count(res, environ) > 1:
        if env.data != "mounted":  # a sister's output would have no way back
            raise UserError(f"a job on several nodes needs its files mounted, but "
                            f"environment {env.name} copies them (data = {env.data})",
                            "ask for an environment with data = mounted")
        nodes, index = job_nodes(args.job_id, environ)
    return spec.JobSpec(job_id=args.job_id, user=args.user, uid=pw.pw_uid, gid=gid,
                        group=group, job_name=args.job_name,
                        env=env, vcpus=vcpus, memory_mib=mem, workdir=workdir,
                        host_workdir=workdir, queue=args.queue,
                        batch=BATCH, nodes=nodes, node_index=index)
