"""vmwn's epilogue step: copy the job's output back from its VM, then destroy the VM.

Runs as root on the mother superior after the job (and even when its start
failed).  A job without vmwn state costs one stat.  Whatever happens, the VM is
destroyed and the step exits 0: pbs_mom only logs epilogue failures, so they are
reported on the job's stderr and in syslog instead.
"""

import logging
import os
import sys
import time

from ... import config, errors, logsetup
from .. import pbs
from . import EXIT_CODES, alarm_spent, ensure_std_fds, say, setup_logging

log = logging.getLogger(__name__)


# Seconds kept back from pbs_mom's alarm for destroying the VM after the harvest:
# a killed epilogue would leave the domain to the next reap.
DESTROY_RESERVE = 20.0


def budget(cfg, pbs_home):
    """Seconds the harvest may take: what pbs_mom's alarm leaves, less the destroy's share.

    The site's ``$prologalarm`` is the one bound (no second, hidden cap): a site
    whose jobs write many small files raises it, as the admin guide says.
    """
    alarm, used = alarm_spent(pbs_home or cfg.pbs_home)
    return max(5.0, alarm - used - DESTROY_RESERVE)


def summary(res, env):
    """The one line appended to the job's .o file."""
    return (f"copied back {res.files} files ({res.bytes} bytes) in {res.seconds:.1f} s "
            f"from environment {env}")


def _guest_job_running(st_fields):
    """As the job user: True while the guest job's process group leader still lives."""
    from ...ssh import Guest
    from ...state import JobState
    from shlex import quote
    from ... import guestfiles
    st = JobState.from_json(st_fields)
    pidfile = quote(guestfiles.pidfile(st.control_dir or guestfiles.control_dir(st.user, False)))
    guest = Guest.connect(st, timeout=10)
    try:
        _, out, _ = guest.run(f'p=$(cat {pidfile} 2>/dev/null) && '
                              'kill -0 "$p" 2>/dev/null && echo running', timeout=15)
    finally:
        guest.close()
    return out.strip() == b"running"


def explain_end(cfg, st, exit_status, jlog, timeout=30.0):
    """Tell the user on stderr when the job's end on the host is not its end in the guest.

    pbs_mom reports 0 after its own restart and 256+N when the job starter was
    killed; in both cases the guest job may still be running.  Its output so
    far is copied back next; this line says why the job ended early.
    """
    import dataclasses
    import signal
    if exit_status > 256:
        try:
            name = signal.Signals(exit_status - 256).name
        except ValueError:
            name = f"signal {exit_status - 256}"
        say(f"the job was killed by {name} (exit status {exit_status})")
    if exit_status != 0 and exit_status <= 256:
        return
    from ... import privs
    try:
        running = privs.run_as(st.user, st.uid, st.gid, _guest_job_running,
                               dataclasses.asdict(st), timeout=timeout)
    except errors.VmwnError as e:
        jlog.info("cannot tell whether the guest job still runs: %s", e.line())
        return
    if running:
        jlog.warning("the guest job was still running at exit status %d", exit_status)
        say("the job was still running in its virtual machine when it ended on the host "
            "(pbs_mom restarted or the job starter was killed); it was stopped, its output "
            f"so far is copied back, and the exit status {exit_status} is not the job's own")


def _guest_gone(cfg, st, jlog):
    """True when the guest's domain has stopped and its disk is still there to read."""
    from ... import offline
    try:
        return offline.guest_gone(cfg, st)
    except errors.VmwnError as e:
        jlog.info("cannot tell whether the guest stopped: %s", e.line())
        return False


def recover_offline(cfg, st, jlog):
    """Copy back what the dead guest had written to its disk (before its overlay goes)."""
    from ... import offline
    res = offline.recover(cfg, st)
    jlog.info("recovered %d files, %d bytes in %.1f s from the overlay", res.files,
              res.bytes, res.seconds)
    say(f"the VM was lost; recovered {res.files} files ({res.bytes} bytes) from its disk "
        f"in {res.seconds:.1f} s", sys.stdout)
    if res.files == 0 and not res.problems:
        say("the VM was lost and its disk holds no new or changed output (output written "
            "in its last seconds may not have reached the disk)")
    return res


def run(argv, config_path=None, pbs_home=None, environ=None, state_dir=None):
    """The step's work.  Returns 0; raises only when no state could be reached."""
    environ = os.environ if environ is None else environ
    args = pbs.parse_epilogue_argv(argv)
    try:
        cfg, broken = config.load(config_path), None
    except errors.VmwnError as e:
        cfg, broken = None, e
    from ... import state
    # The state directory the steps were installed with (the configuration's when
    # run without one): where the prologue records a refusal, even one made
    # without a usable configuration.
    where = state_dir or (cfg.site["state_dir"] if cfg else
                          config.SITE_KEYS["state_dir"].default)
    if state.remove_lone_refusal(where, args.job_id):
        state.clear_starts(where, args.job_id)
        return 0  # refused before anything was made (the starter told its owner why)
    if cfg is None:
        if not os.path.lexists(state.job_dir_in(where, args.job_id)):
            return 0  # no VM; a requeued job's start count is kept for its next start
        raise broken  # a VM needs the configuration to be torn down: 'vmwn reap' after the fix
    if not os.path.lexists(state.job_dir(cfg, args.job_id)):
        return 0  # no VM; a start count of a requeued job is kept for its next start
    setup_logging(cfg)
    from ... import netns
    netns.enter_libvirts(cfg.site["libvirt_uri"])  # where the guest's port and devices are
    state.clear_starts(cfg, args.job_id)
    if not state.exists(cfg, args.job_id):
        from ... import lifecycle
        refused = state.read_refusal(cfg.site["state_dir"], args.job_id) is not None
        lifecycle.destroy(cfg, args.job_id)
        if not refused:  # the job starter told the owner about a refusal already
            # A prologue killed before its first state record left a key and seed.
            say("the job's virtual machine was never started; its remains were removed")
        return 0
    jlog = logsetup.job_logger(__name__, args.job_id)
    failures = []
    try:
        st = state.load(cfg, args.job_id)
        from ... import warden
        if warden.stop(st):  # the job has ended: no boot, pause or resume from here on
            st = state.load(cfg, args.job_id)
        if st.phase != "running":
            jlog.info("VM never came up (phase %s): nothing to copy back", st.phase)
            if args.session_id <= 0:  # else the job starter told why already
                say(f"the job's virtual machine never came up (it stopped while "
                    f"{st.phase}); what it made was removed")
        else:
            end = time.monotonic() + budget(cfg, pbs_home)
            explain_end(cfg, st, args.exit_status, jlog,
                        timeout=max(1.0, min(30.0, (end - time.monotonic()) / 4)))
            if st.data == "mounted":
                jlog.info("the job's directories were mounted: nothing to copy back")
                res = None
            else:
                res = _copy_back(cfg, st, end, jlog)
            for problem in (res.problems if res else ()):
                say(f"not copied back: {problem}")
    except Exception as e:  # noqa: BLE001 - the VM is destroyed whatever happened
        failures.append(("output not copied back", e))
    try:
        from ... import lifecycle
        lifecycle.destroy(cfg, args.job_id)
    except Exception as e:  # noqa: BLE001
        failures.append(("VM not destroyed", e))
    for what, e in failures:
        line = e.line() if isinstance(e, errors.VmwnError) else f"{type(e).__name__}: {e}"
        jlog.error("%s: %s", what, line, exc_info=not isinstance(e, errors.VmwnError))
        say(f"{what}: {line}")
    return 0


def _copy_back(cfg, st, end, jlog):
    """Copy mode: harvest from the running guest, or read a lost guest's disk."""
    from ... import transfer
    if _guest_gone(cfg, st, jlog):  # lost before the job ended, or paused on a full disk
        return recover_offline(cfg, st, jlog)
    try:
        res = transfer.harvest(cfg, st, timeout=max(1.0, end - time.monotonic()))
    except (errors.GuestLost, errors.TransientError) as e:
        if not _guest_gone(cfg, st, jlog):
            raise
        jlog.info("guest gone (%s); reading its disk", e.line())
        return recover_offline(cfg, st, jlog)
    jlog.info("harvested %d files, %d bytes in %.1f s", res.files, res.bytes, res.seconds)
    say(summary(res, st.env), sys.stdout)
    return res


def main(argv, config_path=None, pbs_home=None, environ=None, state_dir=None):
    """Entry point of epilogue.d/50-vmwn."""
    ensure_std_fds()
    job_id = argv[1] if len(argv) > 1 else "?"
    try:
        return run(argv[1:], config_path, pbs_home, environ, state_dir)
    except BaseException as e:  # noqa: BLE001 - report, then exit as the table says
        setup_logging()
        jlog = logsetup.job_logger(__name__, job_id)
        line = e.line() if isinstance(e, errors.VmwnError) else f"{type(e).__name__}: {e}"
        jlog.error("epilogue failed: %s", line, exc_info=not isinstance(e, errors.VmwnError))
        say(f"epilogue: {line}")
        return errors.exit_code(EXIT_CODES["epilogue"], e)
