"""The job's program under Slurm when it asks for vmwn: vmwn's SPANK plugin execs
this (as the job's user, in the job's task) in the program's place.

argv is ``[starter, "batch", SCRIPT, ARGS...]`` for a batch job: what slurmstepd
would have executed, the job script it wrote (``SlurmdSpoolDir/jobNNNNN/
slurm_script``) and its arguments; the script is read here and runs in the guest
as it would have on the host (its ``#!`` line decides).  ``[starter, "exec",
PROGRAM, ARGS...]`` is a job srun made itself: the program runs in the guest.
``[starter, "step", PROGRAM, ARGS...]`` is a further step of a job that has its
guest (``srun --jobid=N --overlap``): the program runs in that guest as one more
task of the job, with srun's stdin, and the step neither starts nor ends the VM.
Each runs through vmwn.jobrun; the starter ends as the guest job ended, so
Slurm records the same ExitCode (and the signal of a job killed by one).  A job
sent here never runs on the host: without a VM prepared for it, it fails with
the reason on its stderr.
"""

import os
import stat
import sys

from .. import jobrun

SCRIPT_NAME = "slurm_script"
MODES = ("batch", "exec", "step")


def main(argv=None, config_path=None, state_dir=None):
    """Entry point; returns the job's exit status (or dies of the job's signal).
    ``config_path`` and ``state_dir`` are baked in at install time."""
    argv = list(sys.argv if argv is None else argv)
    cfg = None
    job_id = os.environ.get("SLURM_JOB_ID") or ""
    try:
        from .. import config
        from ..errors import SiteError
        if len(argv) < 3 or argv[1] not in MODES:
            raise SiteError("vmwn's Slurm job starter was called without a mode and the "
                            "job's program", "reinstall vmwn's SPANK plugin "
                            "(vmwn-slurm-install)")
        if not job_id.isdigit():
            raise SiteError("the job starter has no SLURM_JOB_ID", "run it only from slurmstepd")
        cfg = config.load(config_path or config.DEFAULT_PATH)
        state_dir = state_dir or cfg.site["state_dir"]
        sock = jobrun.vm_socket(state_dir, job_id, "the site should check vmwn's SPANK "
                                "plugin (plugstack.conf) and the node's syslog")
        return _run_vm(cfg, job_id, argv[1], argv[2], argv[3:], sock)
    except BaseException as exc:  # noqa: BLE001 - nothing may reach the user's output raw
        return jobrun.fail(exc, cfg, job_id, jobrun.starter_logging)


def read_script(path):
    """The job script slurmstepd wrote, as bytes (``UserError`` when it is not one)."""
    from ..errors import UserError
    if os.path.basename(path) != SCRIPT_NAME or not os.path.isabs(path):
        raise UserError(f"the batch job's program {path!r} is not a job script Slurm wrote",
                        "submit the job with sbatch")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UserError(f"the job script {path} is not a regular file",
                                "submit the job with sbatch")
            script = f.read(jobrun.STDIN_MAX + 1)
    except OSError as e:
        raise UserError(f"cannot read the job script {path}: {e.strerror}",
                        "submit the job with sbatch") from None
    if len(script) > jobrun.STDIN_MAX:
        raise UserError(f"the job script {path} is larger than 64 MiB",
                        "keep data out of the job script")
    return script


def _run_vm(cfg, job_id, mode, program, args, sock_path):
    from .. import logsetup
    jobrun.starter_logging(cfg)
    log = logsetup.job_logger(__name__, job_id)
    environ = dict(os.environ)
    common = dict(host_workdir=environ.get("SLURM_SUBMIT_DIR"), log=log,
                  adopt=lambda st, wsock: _charge(wsock, log))
    if mode == "exec":
        return jobrun.ended(jobrun.run(cfg, job_id, sock_path, "exec", [program, *args],
                                       environ, **common), log)
    if mode == "step":  # the VM's usage is the job's, told by the job's own task
        task = f"step{environ.get('SLURM_STEP_ID', '')}.{environ.get('SLURM_LOCALID', '0')}"
        return jobrun.ended(jobrun.run(cfg, job_id, sock_path, "task", [program, *args],
                                       environ, task_num=task, stdin=True, **common),
                            log, usage=False)
    script = read_script(program)
    # The script is exec'd in the guest (/bin/sh -c 'exec "$0" "$@"' SCRIPT ARGS), so
    # its kernel reads the #! line as slurmstepd's execve would have.
    return jobrun.ended(jobrun.run(cfg, job_id, sock_path, "batch", ["/bin/sh"],
                                   environ, script=script, how="exec", args=args,
                                   interpreter=interpreter(script), **common), log)


def _charge(wsock, log):
    """Slurm counts a job by its cgroups (jobacct_gather/cgroup): the warden moves the
    VM into this task's accounting cgroup, so the VM's CPU is the job's."""
    if jobrun.join_cgroups(wsock):
        log.info("the VM joined the task's accounting cgroup")
    else:
        log.warning("the VM could not join the task's accounting cgroup (the node's "
                    "syslog says why): Slurm does not count its CPU")


def interpreter(script):
    """The program a script's ``#!`` line names (sbatch takes no script without one)."""
    if not script.startswith(b"#!"):
        return "/bin/sh"
    words = script[2:].split(b"\n", 1)[0].split()
    return os.fsdecode(words[0]) if words else "/bin/sh"


if __name__ == "__main__":
    sys.exit(main())
