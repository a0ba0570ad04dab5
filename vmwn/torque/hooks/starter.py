"""pbs_mom's ``$job_starter``: run the job in its VM, or exactly as the mom would have.

argv is ``[starter, shell]`` (batch), ``[starter, shell, -c, cmd]`` (``qsub -I
-x``) or ``[starter, task_argv...]`` (TM tasks); it runs as the job user.  A job
without a VM (no state record) is exec'd at once, stdin untouched; that path
imports nothing but the configuration and state modules.  A VM job's script
is the ``.SC`` file named on stdin (or stdin itself); vmwn.jobrun runs it in the
guest.  What is Torque's stays here: these argv conventions, the mom's job
files, ``tm_adopt`` of the VM's anchor (pbs_mom then charges QEMU to the job),
and pbs_mom's exit-code contract (a status of 256+N for a job killed by signal
N, which the starter reproduces by dying of N; pbs_mom restarting mid-job).
pbs_mom repeats a signal within milliseconds (kill_task); ``qsig -s suspend``
(SIGTSTP) and ``resume`` (SIGCONT) pause and resume the whole VM.
"""

import os
import sys


def main(argv=None, config_path=None, state_dir=None, pbs_home=None):
    """Entry point; returns the job's exit status (or dies of the job's signal).

    ``config_path``, ``state_dir`` and ``pbs_home`` are baked in at install
    time (None: from the configuration).  The environment is the job's own
    (``qsub -v``), so it never chooses them: a job could otherwise name a state_dir without its record
    and run on the host instead of in its VM.  Whether the job has a VM is
    told by its directory in the state directory alone, so a job without one
    runs natively even when vmwn.conf is missing or broken.
    """
    argv = list(sys.argv if argv is None else argv)
    rest = argv[1:]
    cfg = None
    try:
        if not rest:
            from ...errors import SiteError
            raise SiteError("the job starter was called without the job's shell or command",
                            "set $job_starter in mom_priv/config to this program only")
        job_id = os.environ.get("PBS_JOBID")
        if job_id:
            from ... import state
            if state_dir is None:
                from ... import config
                cfg = config.load(config_path or config.DEFAULT_PATH)
                state_dir = cfg.site["state_dir"]
            refusal = state.read_refusal(state_dir, job_id)
            if refusal is not None:
                from ...wardenclient import answer_error
                raise answer_error(refusal)
            sock = state.warden_socket(state_dir, job_id)
            if os.path.exists(sock):
                if cfg is None:
                    from ... import config
                    cfg = config.load(config_path or config.DEFAULT_PATH)
                return _run_vm(cfg, job_id, rest, sock, pbs_home or cfg.site["pbs_home"])
            wanted = os.environ.get("VMWN_ENV", "").strip()
            if wanted:
                from ...errors import UserError
                raise UserError(f"the job asks for environment {wanted!r} in VMWN_ENV, but "
                                "this node's prologue did not see that request, so the job "
                                "was not run", f"submit with -l other=vmwn={wanted} (or ask "
                                "the site to install vmwn's submit filter)")
        return _exec_native(rest)
    except BaseException as exc:  # noqa: BLE001 - nothing may reach the user's .e file raw
        from ... import jobrun
        from . import setup_logging
        return jobrun.fail(exc, cfg, os.environ.get("PBS_JOBID"), setup_logging)


# What pbs_mom writes and returns itself when it cannot exec a job's shell
# (TMomFinalizeChild, Torque 6.1 src/resmom/start_exec.c): a job without a VM
# fails exactly as on a node without vmwn.
NATIVE_EXEC_FAILED = 254


def _exec_native(rest):
    """Replace this process by the job, as the mom would have started it."""
    try:
        os.execvp(rest[0], rest)
    except OSError:
        line = b"PBS: exec of shell '%s' failed\n" % os.fsencode(rest[0])[:256]
        try:
            os.write(2, line)
        except OSError:
            pass
        return NATIVE_EXEC_FAILED


# ------------------------------------------------------------------ the VM path

def read_job_script(pbs_home, data):
    """Interpret the job starter's stdin (vmwn.jobrun.read_script): only one line
    naming an existing regular file ``<pbs_home>/mom_priv/jobs/*.SC`` is a script
    path (pbs_mom's; -F arguments after it)."""
    from ... import jobrun
    from .. import pbs
    return jobrun.read_script(data, lambda path: pbs.is_job_script(pbs_home, path),
                              "check the mom's job_starter", "-F arguments",
                              "fix the quoting of qsub -F")


def _mode(rest, environ):
    if environ.get("PBS_ENVIRONMENT") == "PBS_INTERACTIVE" or os.isatty(0):
        return "interactive"
    if environ.get("PBS_TASKNUM", "1") not in ("", "1"):
        return "task"
    if len(rest) == 3 and rest[1] == "-c":
        return "command"
    return "batch"

def _run_vm(cfg, job_id, rest, sock_path, pbs_home):
    from ... import jobrun, logsetup
    from . import setup_logging
    setup_logging(cfg)
    log = logsetup.job_logger(__name__, job_id)
    mom = os.getppid()
    environ = dict(os.environ)
    mode = _mode(rest, environ)
    script = args = how = None
    if mode == "batch":
        script, args, how = read_job_script(pbs_home, jobrun.read_stdin())
    kind, value, st = jobrun.run(
        cfg, job_id, sock_path, mode, rest, environ, script=script, how=how, args=args,
        nodefile_var="PBS_NODEFILE", task_num=environ.get("PBS_TASKNUM", "0"),
        host_workdir=environ.get("PBS_O_WORKDIR"),
        adopt=lambda st, wsock: adopt_vm(job_id, st, log), log=log)
    if mode != "task":
        jobrun.report_usage(st, log)
    if os.getppid() != mom and mode != "task":
        # pbs_mom restarted while the job ran: the new mom re-adopts the job by its
        # session and records exit status 0 when that session ends (measured).
        what = f"signal {value}" if kind == "signal" else f"exit status {value}"
        jobrun.say(f"the job ended with {what}; pbs_mom restarted while it ran and may "
                   "record another exit status")
        # The new mom also re-adopted the VM's anchor session and would wait for it
        # for ever; the old one would have ended it with the job.
        _release_anchor(st, log)
    if kind == "signal":
        sys.stdout.flush()
        jobrun.die_of(value)
    return value


def adopt_vm(job_id, st, log):
    """Have pbs_mom count the VM as the job's: it then charges QEMU's CPU time and
    memory to the job and checks cput and vmem on it (vmwn.emulator says how).  A
    failure is the site's to fix and does not stop the job."""
    from ... import emulator, jobrun, usage
    from .. import pbs
    launcher = jobrun.launcher_of(st)
    anchor = emulator.anchor_of(launcher, usage.children) if launcher else 0
    if not anchor:
        log.error("the VM's processes are unknown or gone (launcher %s); pbs_mom will "
                  "not charge the VM to the job", getattr(st, "vm_pid", 0))
        return
    try:
        pbs.adopt(job_id, anchor)
    except pbs.AdoptFailed as e:
        log.error("%s", e.line())
        return
    used = usage.of_vm(launcher)
    log.info("pbs_mom adopted the VM's session %d (%.1f s of CPU so far, its boot)", anchor,
             used.cpu_seconds if used else 0.0)


def _release_anchor(st, log):
    import signal
    from ... import emulator, jobrun, usage
    launcher = jobrun.launcher_of(st)
    if not launcher:
        return
    anchor = emulator.anchor_of(launcher, usage.children)
    if anchor:
        try:
            os.kill(anchor, signal.SIGTERM)
        except ProcessLookupError:
            return
        log.info("ended the VM's anchor %d: pbs_mom restarted during the job", anchor)


if __name__ == "__main__":
    sys.exit(main())
