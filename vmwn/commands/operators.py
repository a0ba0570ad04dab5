"""Operator commands ``vmwn ps`` and ``vmwn reap``: see and heal this node's VM jobs.

``reap --batch NAME`` asks that batch system which of its jobs are still on this
node (``vmwn.NAME.node.held``: for Torque pbs_mom's own job records,
``mom_priv/jobs/<prefix>.JB`` or ``.SC``, and, where pbs_python is installed,
the server; for OpenPBS the mom's records; for Slurm the jobs' slurmstepd) and
removes the remains of every other of its jobs (``vmwn.reap``); another batch
system's jobs are that one's to judge.  A batch system is a package of vmwn
with a ``node`` module: adding one changes nothing here.
"""

import dataclasses
import importlib
import json
import logging
import logging.handlers
import os
import sys
import time

from .. import config as configmod, disk, reap, state as statemod

DEFAULT_BATCH = "torque"  # vmwn's first, whose jobs' records may name no batch system

log = logging.getLogger(__name__)


def register(subparsers):
    p = subparsers.add_parser("ps", help="list vmwn's VMs and job remains on this node",
                              description="List vmwn's domains on this node (from their "
                              "libvirt metadata) and job state records or overlays that "
                              "have no domain.")
    p.add_argument("--json", action="store_true", help="one JSON array instead of a table")
    p.set_defaults(func=ps_command)
    r = subparsers.add_parser("reap", help="remove the VMs and files of jobs that have ended",
                              description="Remove domains, overlays, seeds, keys and state "
                              "of the batch system's jobs that are no longer on this node "
                              "(Torque and OpenPBS: no job record in mom_priv/jobs; Slurm: "
                              "no slurmstepd).  One line per thing removed, on stdout and "
                              "in syslog.")
    r.add_argument("--batch", choices=batch_systems(), default=DEFAULT_BATCH,
                   help="whose jobs to judge (default %(default)s); jobs another batch "
                   "system started are left to it")
    r.add_argument("--dry-run", action="store_true", help="say what would be removed")
    r.add_argument("--grace", type=float, default=reap.DEFAULT_GRACE, metavar="SECONDS",
                   help=f"leave alone anything younger than this (default {reap.DEFAULT_GRACE:.0f})")
    r.add_argument("--pbs-home", help="the mom's PBS_HOME (torque: default [site] pbs_home; "
                   "openpbs: PBS_HOME of /etc/pbs.conf)")
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


def snapshot(cfg, now=None):
    """Rows for every vmwn domain, then state records, orphan dirs and overlays without one."""
    from .. import virt
    now = time.time() if now is None else now
    rows, seen_jobs, seen_dirs = [], set(), set()
    conn = virt.connect(cfg.site["libvirt_uri"])
    try:
        for dom, meta in virt.vmwn_domains(conn):
            job_id = meta.get("id", "")
            seen_jobs.add(job_id)
            created = reap.as_int(meta.get("created"), 0)
            rows.append(Row(job_id, meta.get("user", ""), meta.get("env", ""),
                            _domain_state(dom), now - created if created else 0.0,
                            reap.as_int(meta.get("port")), dom.name()))
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
        rows.append(Row("", "", "", f"no state record: {d}", now - reap.mtime(d), 0, ""))
    for path in reap.overlays(cfg):
        if disk.owner_stem(path) not in seen_dirs:
            rows.append(Row("", "", "", f"overlay without state: {path}",
                            now - reap.mtime(path), 0, ""))
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

def batch_systems():
    """The batch systems vmwn has an adapter for: its packages with a ``node`` module."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return sorted(n for n in os.listdir(root)
                  if n.isidentifier() and os.path.isfile(os.path.join(root, n, "node.py")))


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
        # Read at once: a wrong PBS_HOME is refused even with nothing to judge.
        held = importlib.import_module(f"vmwn.{args.batch}.node").held(cfg, args.pbs_home)
        lines = reap.Reaper(cfg, held, grace=args.grace, dry_run=args.dry_run,
                            say=lambda line: print(line, flush=True), batch=args.batch).run()
    finally:
        if handler:
            log.removeHandler(handler)
            handler.close()
    if not lines:
        print("nothing to reap", file=sys.stderr)
    return 0


