"""Removing what ended jobs left on this node: domains, overlays, state, start counts.

A job's remains are a libvirt domain (found by vmwn's metadata), an overlay in
``overlay_dir`` and a directory in ``state_dir`` (state record, key, seed).
The batch system says which jobs it still holds here (``held``: for Torque,
pbs_mom's own job files and the server, ``vmwn.torque.pbs.MomJobs``); the
remains of any other job are removed.  Anything younger than a grace period
is left alone: its prologue may still be writing the job record.  The
prologue runs a short, non-blocking reap before it boots a VM
(:func:`bounded_reap`), so a node heals itself without an operator;
``vmwn reap`` (``commands/operators.py``) runs the same pass in full.
"""

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import time

from . import disk, state as statemod
from .errors import VmwnError

log = logging.getLogger(__name__)

DEFAULT_GRACE = 120.0
# A prologue's reap: at most this long, and never while another process reaps.
PROLOGUE_REAP_SECONDS = 2.0


def as_int(text, default=0):
    """A number from domain metadata, which anyone with libvirt access may have written."""
    try:
        return int(str(text).strip())
    except ValueError:
        return default


def mtime(path):
    """A path's age reference; a path that vanished counts as new (left alone)."""
    try:
        return os.lstat(path).st_mtime
    except OSError:
        return time.time()


def overlays(cfg):
    """Every overlay in overlay_dir, whichever job made it."""
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

    def __init__(self, cfg, held, grace=DEFAULT_GRACE, dry_run=False, deadline=None,
                 say=None, batch=None):
        """``held(job_id)``: True while the batch system still holds the job here.
        ``batch``: that batch system's name; a job another batch system started
        (its state record says so) is that one's to judge.  None judges every job."""
        self.cfg, self.held, self.grace, self.batch = cfg, held, grace, batch
        self.dry_run, self.deadline = dry_run, deadline
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
        done, foreign = set(), set()
        for st in statemod.all_jobs(self.cfg):
            if self._out_of_time():
                return self.lines
            if self.batch and st.batch and st.batch != self.batch:
                foreign.add(st.job_id)
                continue
            if self.held(st.job_id) or not self._old(st.created):
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
                if not job_id or job_id in done or job_id in foreign or self.held(job_id):
                    continue
                if not self._old(as_int(meta.get("created"), 0)):
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
            if self._old(mtime(d)):
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
        for path in overlays(self.cfg):
            if self._out_of_time():
                return self.lines
            if disk.owner_stem(path) in live or not self._old(mtime(path)):
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


def bounded_reap(cfg, held, seconds=PROLOGUE_REAP_SECONDS, grace=DEFAULT_GRACE, batch=None):
    """The prologue's reap: at most ``seconds``, skipped while another process reaps.

    Returns the lines of what was removed; never raises a vmwn error (a failed
    reap must not cost the job its start).
    """
    try:
        with _try_lock(cfg) as mine:
            if not mine:
                log.info("reap skipped: another process is reaping")
                return []
            return Reaper(cfg, held, grace=grace, batch=batch,
                          deadline=time.monotonic() + seconds).run()
    except (VmwnError, OSError) as e:
        log.warning("reap before boot failed: %s", e.line() if isinstance(e, VmwnError) else e)
        return []
