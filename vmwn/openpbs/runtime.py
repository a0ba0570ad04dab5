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

from .. import config, errors, logsetup, state
from . import mom, request


def check(cfg, job):
    cfg.env((job.get("env") or "").strip())  # UserError names the configured ones
    return 0


def begin(cfg, job):
    """vmwn.vmjob.begin: a failure that may pass is raised (exit 1): the hook rejects
    the job and the server requeues it."""
    from .. import vmjob  # here, not above: 'check' runs at every qsub and stays light
    pbs_home = job.get("pbs_home") or ""
    vmjob.begin(cfg, job["job_id"], lambda: request.build(cfg, job), batch=request.BATCH,
                held=mom.MomJobs(pbs_home).present if pbs_home else None)
    return 0


def end(cfg, job):
    from .. import vmjob
    vmjob.end(cfg, job["job_id"])
    return 0


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
