"""What the VM machinery is given for one job: a JobSpec, checked when it is made.

A batch system's package (``vmwn.torque``) reads a job's request in its own
terms and builds a JobSpec; lifecycle takes it as it is.  Everything that could
not safely reach a guest (account names, the working directory's path) or does
not fit the environment or the node (vCPUs, memory) is refused here, once, so
that no JobSpec exists that was not checked.
"""

import dataclasses
import grp
import logging
import os
import pwd
import re

from .errors import SiteError, UserError

log = logging.getLogger(__name__)

USER_RE = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")
NODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.:_-]{0,252}$")
_SYSTEM_DIRS = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/proc",
                "/root", "/run", "/sbin", "/sys", "/usr", "/var")


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """A checked request: everything lifecycle.create needs besides the config.

    Constructing one checks it (``UserError`` or ``SiteError``, naming what to
    change).  Sizes are checked by :func:`size` before, against the limits.
    """
    job_id: str
    user: str
    uid: int
    gid: int
    group: str
    job_name: str
    env: object  # config.Environment
    vcpus: int
    memory_mib: int
    workdir: str
    host_workdir: str
    queue: str = ""
    # The batch system whose job this is: its reap judges only its own jobs
    # (a node moving from one batch system to another runs both).
    batch: str = ""
    # A job that spans nodes: all of them, in the job's order, this one being
    # nodes[node_index].  Its guests share a network of their own (vmwn.jobnet).
    nodes: tuple = ()
    node_index: int = 0

    def __post_init__(self):
        if not USER_RE.match(self.user) or not USER_RE.match(self.group):
            raise SiteError(f"user/group name {self.user!r}/{self.group!r} cannot be used "
                            "in a guest",
                            "vmwn supports POSIX portable account names (a-z 0-9 _ . -)")
        if self.uid <= 0 or self.gid < 0:
            raise UserError("jobs of root cannot run in a vmwn guest", "submit as a normal user")
        wd = self.workdir
        if (not wd.startswith("/") or os.path.normpath(wd) != wd.rstrip("/") or "\0" in wd
                or any(ord(c) < 32 or ord(c) == 127 for c in wd) or len(wd) > 1024):
            raise UserError(f"working directory {wd!r} is not a plain absolute path",
                            "submit from a directory whose path has no control characters")
        if wd == "/" or any(wd == d or wd.startswith(d + "/") for d in _SYSTEM_DIRS):
            raise UserError(f"working directory {wd} is a system directory in the guest",
                            "submit from your home, /tmp or a project directory")
        if self.nodes and not (0 <= self.node_index < len(self.nodes)
                               and all(NODE_RE.match(n) for n in self.nodes)):
            raise SiteError(f"job {self.job_id}'s nodes {list(self.nodes)!r} (this one "
                            f"#{self.node_index}) cannot be used", "report this as a bug in vmwn")
        if self.vcpus < 1 or self.memory_mib < 1:
            raise SiteError(f"job {self.job_id} was sized to {self.vcpus} vCPUs and "
                            f"{self.memory_mib} MiB", "report this as a bug in vmwn")


def size(cfg, env, job_id, cores=None, given=None, memory_mib=None):
    """(vCPUs, MiB) for a job that asks for ``cores`` and ``memory_mib`` (None: did
    not say) and holds ``given`` cores on this node (None: unknown).

    The guest gets the cores the scheduler gave the job, never more; memory is at
    least the environment's default (what its image needs to boot).  Asking for
    more than the environment or the node allows is the user's mistake; an
    environment whose default does not fit the node is the site's.
    """
    vcpus = given or (cores if cores is not None else env.vcpus)
    if given and cores is not None and cores > given:
        log.info("job %s asks for %d cores but holds %d on this node; the guest gets %d",
                 job_id, cores, given, given)
    mem = max(memory_mib, env.memory_mib) if memory_mib else env.memory_mib
    vcpu_limits = [(env.max_vcpus, f"max_vcpus of environment {env.name}"),
                   (cfg.max_vcpus_node, "the node's max_vcpus")]
    for limit, what in vcpu_limits:
        if vcpus > limit:
            raise UserError(f"the job asks for {vcpus} cores but {what} is {limit}",
                            f"ask for at most {min(x for x, _ in vcpu_limits)} cores")
    mem_limits = [(env.max_memory_mib, f"max_memory of environment {env.name}"),
                  (cfg.max_memory_node_mib, "the node's max_memory")]
    for limit, what in mem_limits:
        if mem > limit:
            if memory_mib is None or memory_mib <= limit:
                raise SiteError(f"environment {env.name} needs {mem} MiB but {what} is "
                                f"{limit} MiB", "raise max_memory or lower the "
                                "environment's memory")
            raise UserError(f"the job asks for {mem} MiB of memory but {what} is "
                            f"{limit} MiB", f"ask for at most "
                            f"{min(x for x, _ in mem_limits)}mb")
    return vcpus, mem


def account(user, group):
    """The job's account on this node: (passwd entry, gid, group name), the group
    being ``group``, or the user's primary group when ``group`` is empty (named by
    its number when the node has no name for it).  The batch server knows the
    job's user and group; a node that does not is the site's to fix."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise SiteError(f"job user {user!r} is unknown on this node",
                        "make the node's passwd agree with the server's") from None
    gid = pw.pw_gid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise SiteError(f"job group {group!r} is unknown on this node",
                            "make the node's group file agree with the server's") from None
        return pw, gid, group
    try:
        return pw, gid, grp.getgrgid(gid).gr_name
    except KeyError:
        return pw, gid, str(gid)
