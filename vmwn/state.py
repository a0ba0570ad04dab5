"""Per-job state records: what teardown needs, on disk, so any process can finish a job.

Layout: ``STATE_DIR/<safe job name>/state.json`` (root-owned, 0600, written
atomically) beside the job's private key (0600, owned by the job's user) and
its cloud-init seed.  The directory is the unit of cleanup: removing it removes
every per-job file that is not a libvirt domain or an overlay.
"""

import dataclasses
import hashlib
import json
import os
import re
import shutil
import stat
import time

from .errors import NodeBroken, SiteError, VmwnError


class NoSuchJob(SiteError):
    """The job has no vmwn state on this node (it never asked for a VM, or is gone)."""


_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_name(job_id):
    """A file- and domain-name-safe form of a Torque job id, unique per job id.

    Torque ids look like ``123.srv.example.org`` or ``123[4].srv``; anything
    outside [A-Za-z0-9._-] is replaced, and a short hash keeps distinct ids
    distinct after replacement and truncation.
    """
    if not job_id or "\0" in job_id:
        raise SiteError(f"invalid job id {job_id!r}", "check the hook's argv")
    digest = hashlib.sha256(job_id.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    head = _SAFE.sub("_", job_id)[:40].lstrip(".") or "job"
    return f"{head}-{digest}"


@dataclasses.dataclass
class JobState:
    job_id: str
    domain: str
    env: str
    user: str
    uid: int
    gid: int
    group: str
    bind_address: str
    port: int
    host_key_public: str
    key_path: str
    workdir: str
    host_workdir: str
    output_dir: str
    overlay: str
    seed: str
    console_log: str
    uuid: str = ""
    created: float = dataclasses.field(default_factory=time.time)
    phase: str = "creating"
    vcpus: int = 1
    memory_mib: int = 0
    job_name: str = ""
    warden_pid: int = 0
    warden_start: int = 0
    boot_seconds: float = 0.0
    boot_attempts: int = 0
    # How the job's files reach the guest ('mounted' or 'copy'), the shares
    # (share.Share as dicts) and the guest directory for vmwn's control files.
    data: str = "copy"
    shares: list = dataclasses.field(default_factory=list)
    control_dir: str = ""
    # The leader of QEMU's session (vmwn's launcher), which the starter has
    # pbs_mom adopt into the job; its start time tells a reused pid apart.
    vm_pid: int = 0
    vm_start: int = 0
    # The warm generation (vmwn/warm.py) the guest was restored from; "" for a cold boot.
    warm: str = ""
    # The batch system that started the job (spec.JobSpec.batch): another
    # batch system's reap on the same node leaves the job alone.
    batch: str = ""
    # A job that spans nodes: this node's part of its network (vmwn.jobnet.Net),
    # and every node's [node, guest host name], the mother superior's first.
    jobnet: dict = dataclasses.field(default_factory=dict)
    guests: list = dataclasses.field(default_factory=list)

    @classmethod
    def from_json(cls, data):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def root_dir(cfg):
    """The state directory of a configuration, or ``cfg`` itself when it is one (a
    path string): the prologue counts and refuses starts even when vmwn.conf cannot
    be read, in the directory installed with its step."""
    return cfg if isinstance(cfg, str) else cfg.site["state_dir"]


def job_dir(cfg, job_id):
    return job_dir_in(root_dir(cfg), job_id)


def job_dir_in(state_dir, job_id):
    """The job's directory under ``state_dir`` (for the starter, which has no config)."""
    return os.path.join(state_dir, safe_name(job_id))


def state_path(cfg, job_id):
    return os.path.join(job_dir(cfg, job_id), "state.json")


def exists(cfg, job_id):
    return os.path.exists(state_path(cfg, job_id))


def ensure_root(cfg):
    """Create STATE_DIR 0711: users may reach their own job's key, but not list others'.

    An existing directory must be root's and writable by nobody else: every
    job's records and keys would otherwise be at the mercy of its owner.
    """
    d = root_dir(cfg)
    os.makedirs(d, mode=0o711, exist_ok=True)
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise SiteError(f"state directory {d} is not a directory owned by uid {os.geteuid()} "
                        "and writable only by it",
                        f"chown root {d} && chmod 0711 {d}")
    if stat.S_IMODE(st.st_mode) & 0o111 != 0o111:
        os.chmod(d, 0o711)  # made under pbs_mom's umask 077: job users must reach their job
    return d


def make_job_dir(cfg, job_id):
    ensure_root(cfg)
    d = job_dir(cfg, job_id)
    os.makedirs(d, mode=0o711, exist_ok=True)
    os.chmod(d, 0o711)  # never the caller's umask: the job user reaches its key and socket
    return d


def load(cfg, job_id):
    p = state_path(cfg, job_id)
    try:
        with open(p, encoding="utf-8") as f:
            return JobState.from_json(json.load(f))
    except FileNotFoundError:
        raise NoSuchJob(f"job {job_id} has no vmwn state in {root_dir(cfg)}",
                        "nothing to do unless the job asked for a VM") from None
    except (ValueError, TypeError) as e:
        raise SiteError(f"state record {p} is corrupt ({e})",
                        "run 'vmwn reap' to clean up the job") from None


def save(cfg, st):
    """Write the record atomically: a reader sees the old or the new record, never half."""
    d = make_job_dir(cfg, st.job_id)
    final = os.path.join(d, "state.json")
    tmp = final + ".tmp"
    data = json.dumps(dataclasses.asdict(st), indent=1, sort_keys=True).encode()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)  # root's alone: the starter gets its part from the warden
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise SiteError(f"cannot write state record {final}: {e.strerror}",
                        f"free space or fix permissions in {root_dir(cfg)}") from None


def remove(cfg, job_id):
    """Remove the job's directory (state, key, seed); True if something was there."""
    d = job_dir(cfg, job_id)
    if not os.path.lexists(d):
        return False
    _empty_users_files(d)
    shutil.rmtree(d, ignore_errors=True)
    if os.path.lexists(d):
        raise SiteError(f"cannot remove {d}", "remove it by hand")
    return True


def _empty_users_files(d):
    """Truncate the files in ``d`` that the job's user owns (seed, key): the user
    could have hard-linked them elsewhere, where removing ``d`` would not reach."""
    from .disk import empty
    try:
        names = os.listdir(d)
    except OSError:
        return
    for n in names:
        p = os.path.join(d, n)
        try:
            if os.lstat(p).st_uid != 0:
                empty(p)
        except OSError:
            continue


def _job_dirs(cfg):
    try:
        names = sorted(os.listdir(root_dir(cfg)))
    except FileNotFoundError:
        return []
    return [os.path.join(root_dir(cfg), n) for n in names
            if not n.startswith(".") and os.path.isdir(os.path.join(root_dir(cfg), n))]


# ---------------------------------------------------------------- refusals
# A job the node will not run gets a refusal record instead of a VM: the
# prologue then lets pbs_mom start the job, and the job starter prints the
# reason on the job's stderr and exits non-zero.  (A prologue exit 1 would
# leave the reason in the mom's spool, where the user never sees it.)
REFUSAL_NAME = "refused"


# The job's warden listens here (vmwn.warden); its existence marks a VM job for
# the job starter, which must decide cheaply (stdlib only) for every job.
WARDEN_SOCKET = "warden.sock"


def warden_socket(state_dir, job_id):
    return os.path.join(job_dir_in(state_dir, job_id), WARDEN_SOCKET)


def refusal_path(state_dir, job_id):
    return os.path.join(job_dir_in(state_dir, job_id), REFUSAL_NAME)


def write_refusal(cfg, job_id, error):
    """Record why ``job_id`` is refused (``error`` is a VmwnError); world-readable, root's."""
    d = make_job_dir(cfg, job_id)
    data = json.dumps({"kind": type(error).__name__, "problem": error.problem,
                       "fix": error.fix}).encode()
    tmp = os.path.join(d, REFUSAL_NAME + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o644)
    os.rename(tmp, os.path.join(d, REFUSAL_NAME))


def remove_lone_refusal(state_dir, job_id):
    """Remove the job's directory if it holds a refusal record and nothing else (a
    job refused before anything was made for it); True if it did."""
    d = job_dir_in(state_dir, job_id)
    try:
        if os.listdir(d) != [REFUSAL_NAME]:
            return False
        os.unlink(os.path.join(d, REFUSAL_NAME))
        os.rmdir(d)
    except FileNotFoundError:
        return False
    return True


def read_refusal(state_dir, job_id):
    """The refusal record as a dict, or None."""
    try:
        with open(refusal_path(state_dir, job_id), encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"kind": "SiteError", "problem": "this node refused the job",
                "fix": "ask the site why (its refusal record is unreadable)"}


# ---------------------------------------------------------------- start counts
# A batch system restarts a job whose start failed at once (Torque's pbs_server
# without limit, OpenPBS's up to 20 times); vmwn counts the starts of each job
# and refuses it after [site] start_attempts.
STARTS_DIR = ".starts"


def failed_start(where, job_id, error, limit, log):
    """Count one more failed start of the job in ``where`` (a configuration, or the
    state directory itself): re-raise ``error`` (the batch system starts the job
    again) while there were fewer than ``limit``, else return the count.  A start
    that cannot be counted raises NodeBroken: without a count there is no bound on
    the restarts."""
    try:
        n = count_start(where, job_id)
    except (OSError, VmwnError) as e:
        why = e.problem if isinstance(e, VmwnError) else (e.strerror or str(e))
        raise NodeBroken(f"{error.problem}; and the job's starts cannot be counted ({why})",
                         error.fix) from None
    if n < limit:
        log.warning("start %d of %d failed: %s", n, limit, error.line())
        raise error
    return n


def _starts_path(cfg, job_id):
    return os.path.join(root_dir(cfg), STARTS_DIR, safe_name(job_id))


def count_start(cfg, job_id):
    """Record one more failed start of ``job_id``; returns how many there were."""
    d = os.path.join(ensure_root(cfg), STARTS_DIR)
    os.makedirs(d, mode=0o700, exist_ok=True)
    p = _starts_path(cfg, job_id)
    try:
        with open(p, encoding="ascii") as f:
            n = int(f.read().strip() or 0)
    except (OSError, ValueError):
        n = 0
    n += 1
    fd = os.open(p + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, str(n).encode())
    finally:
        os.close(fd)
    os.rename(p + ".tmp", p)
    return n


def clear_starts(cfg, job_id):
    try:
        os.unlink(_starts_path(cfg, job_id))
    except FileNotFoundError:
        pass


def stale_starts(cfg, older_than):
    """Start-count files not touched for ``older_than`` seconds (their jobs are gone)."""
    d = os.path.join(root_dir(cfg), STARTS_DIR)
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return []
    now = time.time()
    out = []
    for n in names:
        p = os.path.join(d, n)
        try:
            if now - os.lstat(p).st_mtime > older_than:
                out.append(p)
        except FileNotFoundError:
            pass
    return out


def all_jobs(cfg):
    """Every readable state record on this node."""
    out = []
    for d in _job_dirs(cfg):
        try:
            with open(os.path.join(d, "state.json"), encoding="utf-8") as f:
                out.append(JobState.from_json(json.load(f)))
        except (OSError, ValueError, TypeError):
            continue
    return out


def orphan_dirs(cfg):
    """Job directories without a readable state record (a prologue died early)."""
    return [d for d in _job_dirs(cfg) if not os.path.exists(os.path.join(d, "state.json"))]
