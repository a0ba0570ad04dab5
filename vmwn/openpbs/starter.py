"""The job's program under OpenPBS when it asks for vmwn: vmwn's ``execjob_launch``
hook makes the mom start this (as the job's user) in the job's place.

argv is ``[starter, "batch", SHELL]`` for a script job, whose stdin holds the
script's path as the mom wrote it for the shell (``PBS_HOME/mom_priv/jobs/ID.SC``,
one line), or ``[starter, "exec", PROGRAM, ARGS...]`` for ``qsub -- PROGRAM
ARGS``; an interactive job (``qsub -I``) has a terminal on stdin.  The job runs
in its guest through vmwn.jobrun; the starter ends as the guest job ended, so
the mom records the same Exit_status (256+N for a job killed by signal N).  A
job the hook sent here never runs on the host: without a VM prepared for it,
it fails with the reason on its stderr.
"""

import os
import sys

from .. import jobrun

MODES = ("batch", "exec")


def main(argv=None, config_path=None, state_dir=None, pbs_home=None):
    """Entry point; returns the job's exit status (or dies of the job's signal).
    ``config_path``, ``state_dir`` and ``pbs_home`` are baked in at install time."""
    argv = list(sys.argv if argv is None else argv)
    cfg = None
    job_id = os.environ.get("PBS_JOBID") or ""
    try:
        from .. import config
        from ..errors import SiteError
        if len(argv) < 3 or argv[1] not in MODES:
            raise SiteError("vmwn's OpenPBS job starter was called without a mode and the "
                            "job's program", "reinstall vmwn's OpenPBS hooks "
                            "(vmwn-openpbs-install)")
        if not job_id:
            raise SiteError("the job starter has no PBS_JOBID", "run it only from the mom")
        cfg = config.load(config_path or config.DEFAULT_PATH)
        state_dir = state_dir or cfg.site["state_dir"]
        sock = jobrun.vm_socket(state_dir, job_id, "the site should check vmwn's "
                                "execjob_begin hook (qmgr -c 'list hook vmwn') and the "
                                "node's syslog")
        return _run_vm(cfg, job_id, argv[1], argv[2:], sock, pbs_home)
    except BaseException as exc:  # noqa: BLE001 - nothing may reach the user's .e file raw
        return jobrun.fail(exc, cfg, job_id, jobrun.starter_logging)


def _run_vm(cfg, job_id, how_started, rest, sock_path, pbs_home):
    from .. import logsetup
    from . import mom
    jobrun.starter_logging(cfg)
    log = logsetup.job_logger(__name__, job_id)
    environ = dict(os.environ)
    script = args = how = None
    if how_started == "exec":
        mode = "exec"
    elif environ.get("PBS_ENVIRONMENT") == "PBS_INTERACTIVE" or os.isatty(0):
        mode = "interactive"
    else:
        mode = "batch"
        home = pbs_home or cfg.site["pbs_home"]
        script, args, how = jobrun.read_script(
            mom.unescape_script_line(jobrun.read_stdin()),
            lambda path: mom.is_job_script(home, path),
            "reinstall vmwn's OpenPBS hooks (vmwn-openpbs-install)")
    return jobrun.ended(jobrun.run(cfg, job_id, sock_path, mode, rest, environ,
                                   script=script, how=how, args=args,
                                   nodefile_var="PBS_NODEFILE",
                                   host_workdir=environ.get("PBS_O_WORKDIR"), log=log), log)


if __name__ == "__main__":
    sys.exit(main())
