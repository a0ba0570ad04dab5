"""Operator commands ``vmwn ps`` and ``vmwn reap``: see and heal this node's VM jobs.

A job's remains are a libvirt domain (found by vmwn's metadata), an overlay in
``overlay_dir`` and a directory in ``state_dir`` (state record, key, seed).
``reap`` removes the remains of jobs that are no longer on this node, judged
from pbs_mom's own job records (``mom_priv/jobs/<prefix>.JB`` or ``.SC``
present means the job is still here) and, where pbs_python is installed, the
server.  Anything younger than a grace period is left alone: its prologue may
still be writing the job record.  The prologue runs a short, non-blocking reap
before it boots a VM, so a node heals itself without an operator.
"""

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import logging.handlers
import os
import shutil
import sys
import time

from . import config as configmod, disk, pbs, state as statemod
from .errors import SiteError, VmwnError

log = logging.getLogger(__name__)

DEFAULT_GRACE = 120.0
# A prologue's reap: at most this long, and never while another process reaps.
PROLOGUE_REAP_SECONDS = 2.0


def register(subparsers):
    p = subparsers.add_parser("ps", help="list vmwn's VMs and job remains on this node",
                              description="List vmwn's domains on this node (from their "
                              "libvirt metadata) and job state records or overlays that "
                              "have no domain.")
    p.add_argument("--json", action="store_true", help="one JSON array instead of a table")
    p.set_defaults(func=ps_command)
    r = subparsers.add_parser("reap", help="remove the VMs and files of jobs that have ended",
                              description="Remove domains, overlays, seeds, keys and state "
                              "of jobs that are no longer on this node (no job record in "
                              "mom_priv/jobs).  One line per thing removed, on stdout and "
                              "in syslog.")
    r.add_argument("--dry-run", action="store_true", help="say what would be removed")
    r.add_argument("--grace", type=float, default=DEFAULT_GRACE, metavar="SECONDS",
                   help=f"leave alone anything younger than this (default {DEFAULT_GRACE:.0f})")
    r.add_argument("--pbs-home", help="Torque's PBS_HOME (default: [site] pbs_home)")
    r.set_defaults(func=reap_command)


# ------------------------------------------------------------------------ ps

@dataclasses.dataclass
class Row:
    job_id: str
    user: str
    env: str
    state: str
    age: float
    port: int
    domain: str


def _domain_state(dom):
    import libvirt
    names = {libvirt.VIR_DOMAIN_RUNNING: "running", libvirt.VIR_DOMAIN_PAUSED: "paused",
             libvirt.VIR_DOMAIN_SHUTDOWN: "shutting-down", libvirt.VIR_DOMAIN_SHUTOFF: "shut-off",
             libvirt.VIR_DOMAIN_CRASHED: "crashed", libvirt.VIR_DOMAIN_BLOCKED: "blocked"}
    try:
        return names.get(dom.state()[0], "other")
    except libvirt.libvirtError:
        return "gone"


def _int(text, default=0):
    try:
        return int(str(text).strip())
    except ValueError:
        return default


def snapshot(cfg, now=None):
    """Rows for every vmwn domain, then state records, orphan dirs and overlays without one."""
    from . import virt
    now = time.time() if now is None else now
    rows, seen_jobs, seen_dirs = [], set(), set()
    conn = virt.connect(cfg.site["libvirt_uri"])
    try:
        for dom, meta in virt.vmwn_domains(conn):
            job_id = meta.get("id", "")
            seen_jobs.add(job_id)
            created = _int(meta.get("created"), 0)
            rows.append(Row(job_id, meta.get("user", ""), meta.get("env", ""),
                            _domain_state(dom), now - created if created else 0.0,
                            _int(meta.get("port")), dom.name()))
    finally:
        conn.close()
    for st in statemod.all_jobs(cfg):
        seen_dirs.add(statemod.safe_name(st.job_id))
        if st.job_id in seen_jobs:
            continue
        rows.append(Row(st.job_id, st.user, st.env, f"no domain (phase {st.phase})",
                        now - st.created, st.port, ""))
    for d in statemod.orphan_dirs(cfg):
        seen_dirs.add(os.path.basename(d))
        rows.append(Row("", "", "", f"no state record: {d}", now - _mtime(d), 0, ""))
    for path in _overlays(cfg):
        if os.path.basename(path)[:-len(".qcow2")] not in seen_dirs:
            rows.append(Row("", "", "", f"overlay without state: {path}",
                            now - _mtime(path), 0, ""))
    return rows


def _age(seconds):
    s = int(max(0, seconds))
    if s >= 86400:
        return f"{s // 86400}d{s // 3600 % 24:02d}h"
    if s >= 3600:
        return f"{s // 3600}h{s // 60 % 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s"


def ps_command(args):
    cfg = configmod.load(args.config)
    rows = snapshot(cfg)
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
        return 0
    head = ("JOB", "USER", "ENV", "STATE", "AGE", "PORT", "DOMAIN")
    table = [head] + [(r.job_id or "-", r.user or "-", r.env or "-", r.state, _age(r.age),
                       str(r.port or "-"), r.domain or "-") for r in rows]
    widths = [max(len(t[i]) for t in table) for i in range(len(head) - 1)]
    for t in table:
        print("  ".join(c.ljust(w) for c, w in zip(t, widths)) + "  " + t[-1])
    return 0


# ---------------------------------------------------------------------- reap

def _mtime(path):
    try:
        return os.lstat(path).st_mtime
    except OSError:
        return time.time()


def _overlays(cfg):
    d = cfg.site["overlay_dir"]
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        return []
    return [os.path.join(d, n) for n in names if n.endswith(".qcow2")]


def _owned_paths(cfg):
    return tuple(os.path.realpath(cfg.site[k]) + "/" for k in ("state_dir", "overlay_dir"))


def _domain_is_ours(dom, cfg, roots):
    """True when a domain's disks or console live in this configuration's directories.

    libvirt is shared by everything on the host; a domain made under another
    vmwn configuration (another state_dir) is that configuration's to reap.
    """
    from . import virt
    return any(os.path.realpath(p).startswith(roots) for p in virt.domain_files(dom))


# A requeued job restarts within seconds; a start count this old has lost its job.
STARTS_MAX_AGE = 86400.0


class Reaper:
    """One pass over the node; every removal is logged and returned as a line."""

    def __init__(self, cfg, pbs_home=None, grace=DEFAULT_GRACE, dry_run=False,
                 deadline=None, say=None):
        self.cfg, self.grace, self.dry_run, self.deadline = cfg, grace, dry_run, deadline
        self.mom = pbs.MomJobs(pbs_home or cfg.pbs_home)
        self.say = say or (lambda line: None)
        self.lines = []
        self.now = time.time()

    def _out_of_time(self):
        return self.deadline is not None and time.monotonic() >= self.deadline

    def _report(self, what, why):
        line = f"{'would remove' if self.dry_run else 'removed'} {what} ({why})"
        self.lines.append(line)
        log.info("reap: %s", line)
        self.say(line)

    def _old(self, t):
        return self.now - t >= self.grace

    def run(self):
        from . import lifecycle, virt
        done = set()
        for st in statemod.all_jobs(self.cfg):
            if self._out_of_time():
                return self.lines
            if self.mom.present(st.job_id) or not self._old(st.created):
                continue
            self._job(lifecycle, st.job_id, "its job is no longer on this node")
            done.add(st.job_id)
        conn = virt.connect(self.cfg.site["libvirt_uri"])
        try:
            roots = _owned_paths(self.cfg)
            for dom, meta in virt.vmwn_domains(conn):
                if self._out_of_time():
                    return self.lines
                job_id = meta.get("id", "")
                if not job_id or job_id in done or self.mom.present(job_id):
                    continue
                if not self._old(_int(meta.get("created"), 0)):
                    continue
                if not _domain_is_ours(dom, self.cfg, roots) and \
                        not statemod.exists(self.cfg, job_id):
                    continue
                self._job(lifecycle, job_id, "domain of a job that does not exist here")
                done.add(job_id)
        finally:
            conn.close()
        live = {statemod.safe_name(st.job_id) for st in statemod.all_jobs(self.cfg)}
        for d in statemod.orphan_dirs(self.cfg):
            if self._out_of_time():
                return self.lines
            if self._old(_mtime(d)):
                if not self.dry_run:
                    shutil.rmtree(d, ignore_errors=True)
                self._report(f"state directory {d}", "no state record")
            else:
                live.add(os.path.basename(d))
        for path in statemod.stale_starts(self.cfg, STARTS_MAX_AGE):
            if not self.dry_run:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            self._report(f"start count {path}", "untouched for a day")
        for path in _overlays(self.cfg):
            if self._out_of_time():
                return self.lines
            if os.path.basename(path)[:-len(".qcow2")] in live or not self._old(_mtime(path)):
                continue
            if not self.dry_run:
                disk.remove(path)
            self._report(f"overlay {path}", "no job owns it")
        return self.lines

    def _job(self, lifecycle, job_id, why):
        if self.dry_run:
            self._report(f"domain, overlay and state of job {job_id}", why)
            return
        try:
            removed = lifecycle.destroy(self.cfg, job_id)
        except VmwnError as e:
            log.error("reap of job %s failed: %s", job_id, e.line())
            self.say(f"could not remove job {job_id}: {e.line()}")
            return
        for what in removed:
            self._report(f"{what} of job {job_id}", why)


def _syslog_handler(cfg):
    if not cfg.site["syslog"] or not os.path.exists("/dev/log"):
        return None
    try:
        h = logging.handlers.SysLogHandler(address="/dev/log",
                                           facility=logging.handlers.SysLogHandler.LOG_DAEMON)
    except OSError:
        return None
    h.setLevel(logging.INFO)
    h.setFormatter(logging.Formatter("vmwn[%(process)d]: %(message)s"))
    return h


def reap_command(args):
    cfg = configmod.load(args.config)
    handler = _syslog_handler(cfg)
    if handler:
        log.addHandler(handler)
    try:
        lines = Reaper(cfg, pbs_home=args.pbs_home, grace=args.grace, dry_run=args.dry_run,
                       say=lambda line: print(line, flush=True)).run()
    finally:
        if handler:
            log.removeHandler(handler)
            handler.close()
    if not lines:
        print("nothing to reap", file=sys.stderr)
    return 0


@contextlib.contextmanager
def _try_lock(cfg):
    """Yield True while holding the node's reap lock, False when another process has it."""
    # The lock is the state root directory itself: no lock file to leave behind.
    fd = os.open(statemod.ensure_root(cfg), os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                yield False
                return
            raise
        yield True
    finally:
        os.close(fd)


def bounded_reap(cfg, pbs_home=None, seconds=PROLOGUE_REAP_SECONDS, grace=DEFAULT_GRACE):
    """The prologue's reap: at most ``seconds``, skipped while another process reaps.

    Returns the lines of what was removed; never raises a vmwn error (a failed
    reap must not cost the job its start).
    """
    try:
        with _try_lock(cfg) as mine:
            if not mine:
                log.info("reap skipped: another process is reaping")
                return []
            return Reaper(cfg, pbs_home=pbs_home, grace=grace,
                          deadline=time.monotonic() + seconds).run()
    except (VmwnError, OSError) as e:
        log.warning("reap before boot failed: %s", e.line() if isinstance(e, VmwnError) else e)
        return []
