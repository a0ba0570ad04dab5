"""What vmwn's OpenPBS hook runs (as root, in vmwn's installed runtime): one action
per call, ``python -I -m vmwn.openpbs.runtime ACTION CONFIG`` with the job's
description as JSON on stdin.  The last line on stdout is what the hook shows
(a refusal at qsub, a line for the daemon's log); the exit status says whether
the hook should accept (0).

- ``check``: is ``env`` configured here?  (queuejob, on the server's host)
- ``begin``: prepare the job's VM and start its warden, like Torque's prologue step:
  the mom waits only for the preparation (well under a second), the guest boots
  in the warden.  A failure that may pass (the site's, or a passing one) exits 1:
  the hook rejects the job and the server requeues it; after [site]
  start_attempts starts, or at once for the owner's mistake, the job is still
  started and fails in the job starter with the reason on its stderr (a refusal
  record).
- ``end``: stop the warden, copy the output back (copy mode), destroy the VM.
- ``suspend``/``resume``: pause or resume the job's domain.
- ``usage``: what each of the given jobs used so far, its VM and its own
  processes on the host, as one JSON line: the hook sets ``resources_used`` from
  it (``exechost_periodic`` and ``execjob_epilogue``), so the mom charges the VM
  to the job and enforces ``cput``/``mem`` on it.  OpenPBS's mom counts a job's
  processes by session only, and QEMU (libvirt's child) is in none of the job's.

The VM's side runs in libvirt's network namespace (vmwn.netns): ``begin`` and
``end`` enter it first, so the forwarded ports, the firewall rules and the
warden's connections are where QEMU's are, whichever namespace the mom runs in.
"""

import json
import os
import sys
import time

from .. import config, errors, logsetup, state
from . import mom, request

# Seconds ``begin`` may take before it gives up (the hook kills it at 50 s and its
# alarm is 60 s): room for the teardown of a failed preparation.
BEGIN_BUDGET = 35.0
HARVEST_MAX_SECONDS = 90.0


def check(cfg, job):
    cfg.env((job.get("env") or "").strip())  # UserError names the configured ones
    return 0


def begin(cfg, job):
    from .. import lifecycle, netns, reap, warden
    job_id = job["job_id"]
    jlog = logsetup.job_logger(__name__, job_id)
    netns.enter_libvirts(cfg.site["libvirt_uri"])
    try:
        spec = request.build(cfg, job)
        jlog.info("environment %s requested", spec.env.name)
        until = time.monotonic() + min(cfg.site["prologue_deadline"], BEGIN_BUDGET)
        st = lifecycle.prepare(cfg, spec, until)
        try:
            pid = warden.spawn(cfg, st, warden.listen(cfg, st))
        except BaseException:
            _destroy(cfg, job_id, jlog)
            raise
        jlog.info("VM %s prepared (%d vCPUs, %d MiB); warden %d boots it", st.domain,
                  spec.vcpus, spec.memory_mib, pid)
    except errors.UserError as e:
        _refuse(cfg, job_id, e, jlog)
    except errors.VmwnError as e:
        # A failure that may pass (the site's, or a passing one): raised again, the
        # hook rejects the job and the server requeues it, until [site]
        # start_attempts; then it is refused like the owner's mistake.
        n = state.failed_start(cfg, job_id, e, cfg.site["start_attempts"], jlog)
        _refuse(cfg, job_id, type(e)(f"the job's virtual machine could not be prepared in "
                                     f"{n} starts; last: {e.problem}", e.fix), jlog)
    finally:
        pbs_home = job.get("pbs_home") or ""
        if pbs_home:
            reap.bounded_reap(cfg, mom.MomJobs(pbs_home).present)
    return 0


def _refuse(cfg, job_id, error, jlog):
    """Let the job start only to fail in the starter with ``error`` on its stderr."""
    jlog.warning("job refused: %s", error.line())
    try:
        state.write_refusal(cfg, job_id, error)
    except OSError as e2:
        raise errors.NodeBroken(f"{error.problem}; and the refusal cannot be recorded "
                                f"({e2.strerror})", error.fix) from None
    state.clear_starts(cfg, job_id)


def end(cfg, job):
    from .. import netns, warden
    job_id = job["job_id"]
    where = cfg.site["state_dir"]
    if state.remove_lone_refusal(where, job_id):
        return 0  # refused before anything was made (the starter told its owner why)
    if not os.path.lexists(state.job_dir(cfg, job_id)):
        return 0  # nothing made: a start begin failed keeps its count for the next
    state.clear_starts(cfg, job_id)  # it got through begin: a rerun counts afresh
    netns.enter_libvirts(cfg.site["libvirt_uri"])
    jlog = logsetup.job_logger(__name__, job_id)
    if state.exists(cfg, job_id):
        try:
            st = state.load(cfg, job_id)
            if warden.stop(st):  # the job has ended: no boot, pause or resume from here on
                st = state.load(cfg, job_id)
            if st.phase == "running" and st.data == "copy":
                _copy_back(cfg, st, jlog)
        except Exception as e:  # noqa: BLE001 - the VM is destroyed whatever happened
            jlog.error("output not copied back: %s", _line(e),
                       exc_info=not isinstance(e, errors.VmwnError))
    _destroy(cfg, job_id, jlog)
    return 0


def _copy_back(cfg, st, jlog):
    from .. import offline, transfer
    try:
        res = transfer.harvest(cfg, st, timeout=HARVEST_MAX_SECONDS)
    except (errors.GuestLost, errors.TransientError) as e:
        if not offline.guest_gone(cfg, st):
            raise
        jlog.info("guest gone (%s); reading its disk", e.line())
        res = offline.recover(cfg, st)
    jlog.info("copied back %d files, %d bytes in %.1f s", res.files, res.bytes, res.seconds)


def _destroy(cfg, job_id, jlog):
    from .. import lifecycle
    try:
        lifecycle.destroy(cfg, job_id)
    except Exception as e:  # noqa: BLE001 - reported; 'vmwn reap' finishes it
        jlog.error("VM not destroyed: %s", _line(e), exc_info=not isinstance(e, errors.VmwnError))
        raise


def pause(cfg, job, paused):
    from .. import virt
    st = state.load(cfg, job["job_id"])
    conn = virt.connect(cfg.site["libvirt_uri"])
    try:
        virt.set_paused(conn, st.domain, paused)
    finally:
        conn.close()
    logsetup.job_logger(__name__, st.job_id).info("domain %s %s", st.domain,
                                                  "paused" if paused else "resumed")
    return 0


def usage_of(cfg, job):
    """``{"jobs": {JOB_ID: SESSION_ID}}`` -> ``{JOB_ID: {"cput": s, "mem_kb": KiB}}``
    for each job whose VM is still there (a job without one is left out)."""
    from .. import jobrun, usage
    out = {}
    for job_id, sid in (job.get("jobs") or {}).items():
        try:
            if not state.exists(cfg, job_id):
                continue
            launcher = jobrun.launcher_of(state.load(cfg, job_id))
        except (errors.VmwnError, OSError, ValueError):
            continue
        vm = usage.of_vm(launcher) if launcher else None
        if vm is None:
            continue
        cpu, rss = usage.of_session(int(sid or 0))
        out[job_id] = {"cput": int(vm.cpu_seconds + cpu),
                       "mem_kb": vm.peak_bytes // 1024 + rss}
    print(json.dumps(out, sort_keys=True), flush=True)
    return 0


ACTIONS = {"check": check, "begin": begin, "end": end,
           "suspend": lambda cfg, job: pause(cfg, job, True),
           "resume": lambda cfg, job: pause(cfg, job, False), "usage": usage_of}


def _line(e):
    return e.line() if isinstance(e, errors.VmwnError) else f"{type(e).__name__}: {e}"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    os.umask(0o022)
    try:
        if len(argv) != 2 or argv[0] not in ACTIONS:
            raise errors.SiteError(f"usage: runtime {{{','.join(ACTIONS)}}} CONFIG (got "
                                   f"{' '.join(argv)!r})", "reinstall vmwn's OpenPBS hooks")
        try:
            job = json.loads(sys.stdin.read(1 << 20) or "{}")
        except ValueError as e:
            raise errors.SiteError(f"the hook's job description is not JSON ({e})",
                                   "reinstall vmwn's OpenPBS hooks") from None
        cfg = config.load(argv[1])
        logsetup.setup(syslog=cfg.syslog, debug_log=cfg.debug_log, stderr=False)
        return ACTIONS[argv[0]](cfg, job)
    except BaseException as e:  # noqa: BLE001 - one line for the hook, never a trace
        if isinstance(e, SystemExit):
            raise
        logsetup.setup(stderr=False)
        if not isinstance(e, errors.VmwnError):
            logsetup.logging.getLogger(__name__).error("runtime failed", exc_info=True)
        print(f"vmwn: {_line(e)}", flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
