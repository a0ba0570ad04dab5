"""What vmwn's SPANK plugin runs (as the submitting user at sbatch, as root in
slurmstepd), in vmwn's installed runtime: ``python -I -m vmwn.slurm.runtime
ACTION CONFIG KEY=VALUE...``.  The plugin passes the job's values as arguments,
never through a shell; the last line on stdout is what it shows (the refusal at
sbatch), the exit status whether the action succeeded.

- ``check env=ENV``: is ENV configured here?  (sbatch, on the submit host: an
  unknown environment is refused before a job exists, so no node is drained.)
- ``begin job_id=... env=... uid=... gid=... ncpus=... mem_mb=... alloc_mb=...
  workdir=... job_name=... batch=0|1 slurm_conf=PATH``: vmwn.vmjob.begin, in the
  slurmstepd of the job's step.  Every failure becomes a refusal record, which
  the job starter shows on the job's stderr: a failing SPANK call there would
  fail the step in Slurm's terms, and a node must never be drained for a job.
  A failure that may pass (vmwn.vmjob raises it while fewer than ``[site]
  start_attempts`` starts have failed) requeues a batch job (``scontrol requeue``
  with slurmd's config): the record then says so, and Slurm starts the job again
  once its credentials have expired (``AuthInfo=cred_expire``, 120 s by default).
  A job that has its VM already (a further step, ``srun --jobid=N --overlap``)
  gets exit 3: that step's tasks run in the job's guest (the starter's ``step``
  mode), and the step neither makes nor ends a VM.  Before it returns, begin's
  bounded reap removes what Slurm jobs with no slurmstepd left here (vmwn.slurm.stepd).
- ``release job_id=...``: when the task has ended, the VM leaves the task's
  accounting cgroup (vmwn.cgroups), which slurmstepd then removes.
- ``end job_id=...``: vmwn.vmjob.end, when the step ends.
"""

import os
import sys

from .. import config, errors, logsetup, subp
from . import request, stepd


def check(cfg, job):
    cfg.env((job.get("env") or "").strip())  # UserError names the configured ones
    return 0


# begin's exit status when the job already has its VM: the step asking is another
# step of that job (srun --jobid), which runs in that VM and must not end it.
JOINS = 3


def begin(cfg, job):
    from .. import state, vmjob  # here, not above: 'check' runs at every sbatch
    job_id = job.get("job_id") or ""
    if not job_id.isdigit():
        raise errors.SiteError(f"job id {job_id!r} from the SPANK plugin is not a number",
                               "reinstall vmwn's SPANK plugin (vmwn-slurm-install)")
    log = logsetup.job_logger(__name__, job_id)
    if os.path.lexists(state.job_dir(cfg, job_id)):
        log.info("a further step of the job: it runs in the job's virtual machine")
        return JOINS
    try:
        vmjob.begin(cfg, job_id, lambda: request.build(cfg, job), batch=request.BATCH,
                    held=stepd.StepDaemons().present)
    except errors.NodeBroken as e:  # its starts cannot be counted: a requeue could loop
        vmjob.refuse(cfg, job_id, e, log)
    except errors.VmwnError as e:  # may pass, and its starts are below the bound
        if job.get("batch") == "1" and requeue(job_id, job.get("slurm_conf") or "", log):
            # the job's task still starts (and is ended by the requeue): it says why
            state.write_refusal(cfg, job_id, e.restated(
                f"{e.problem}; Slurm starts the job again"))
        else:
            vmjob.refuse(cfg, job_id, e, log)
    return 0


REQUEUE_SECONDS = 20


def requeue(job_id, slurm_conf, log):
    """Ask slurmctld to requeue batch job ``job_id``; True if it took the request."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    if slurm_conf:
        env["SLURM_CONF"] = slurm_conf
    try:
        subp.run(["scontrol", "requeue", job_id], env=env, timeout=REQUEUE_SECONDS)
    except errors.VmwnError as e:
        log.warning("the job could not be requeued, so it fails: %s", e.line())
        return False
    log.info("requeued: Slurm starts the job again")
    return True


def release(cfg, job):
    """The task has ended: the VM leaves its accounting cgroup (back to the root's, as
    pid 1's), so that slurmstepd can remove the job's groups."""
    from .. import cgroups, jobrun, state, usage
    job_id = job.get("job_id") or ""
    if not state.exists(cfg, job_id):
        return 0
    launcher = jobrun.launcher_of(state.load(cfg, job_id))
    if launcher:
        cgroups.join(usage.tree(launcher), 1)
    return 0


def end(cfg, job):
    from .. import vmjob
    vmjob.end(cfg, job.get("job_id") or "")
    return 0


ACTIONS = {"check": check, "begin": begin, "release": release, "end": end}


def parse(args):
    """``KEY=VALUE`` arguments as a dict (a value may hold '=' and any byte)."""
    job = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key.isidentifier():
            raise errors.SiteError(f"the SPANK plugin passed {arg!r}, not KEY=VALUE",
                                   "reinstall vmwn's SPANK plugin (vmwn-slurm-install)")
        job[key] = value
    return job


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    os.umask(0o022)
    try:
        if len(argv) < 2 or argv[0] not in ACTIONS:
            raise errors.SiteError(f"usage: runtime {{{','.join(ACTIONS)}}} CONFIG KEY=VALUE... "
                                   f"(got {' '.join(argv)!r})",
                                   "reinstall vmwn's SPANK plugin (vmwn-slurm-install)")
        job = parse(argv[2:])
        cfg = config.load(argv[1])
        logsetup.setup(syslog=cfg.syslog, debug_log=cfg.debug_log, stderr=False)
        return ACTIONS[argv[0]](cfg, job)
    except BaseException as e:  # noqa: BLE001 - one line for the plugin, never a trace
        if isinstance(e, SystemExit):
            raise
        logsetup.setup(stderr=False)
        if not isinstance(e, errors.VmwnError):
            logsetup.logging.getLogger(__name__).error("runtime failed", exc_info=True)
        line = e.line() if isinstance(e, errors.VmwnError) else f"{type(e).__name__}: {e}"
        print(f"vmwn: {line}", flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
