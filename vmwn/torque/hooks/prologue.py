"""vmwn's prologue step: boot the job's VM when the job asks for one.

Runs as root on the mother superior, with the prologue's argv and minimal
environment, synchronously inside pbs_mom's job start: so it only prepares the
job's files and forks the job's warden (vmwn.warden), which boots the guest
while pbs_mom goes on.  A job that asks for no environment costs a config read
and nothing else (no libvirt, paramiko or Jinja2).  Exit codes come from
vmwn.errors alone: 0 run (or refused: the starter tells the user why), 2 a
failure that may pass (requeued, at most [site] start_attempts times), always
after removing whatever was half-built.  SIGTERM is only noted (vmwn.interrupt)
and acted on at the next waiting point, or once the warden is in the job's
record: the half-built job is then torn down and requeued like any failure.
"""

import logging
import os
import signal
import time

from ... import config, errors, logsetup
from .. import pbs, request
from . import EXIT_CODES, alarm_spent, ensure_std_fds, is_sister, say, setup_logging

log = logging.getLogger(__name__)

# Seconds kept back from pbs_mom's alarm so that a failed boot can still be
# torn down before the mom SIGKILLs the session.
CLEANUP_RESERVE = 20.0


def deadline(cfg, pbs_home, now=None, used=None):
    """Absolute time.monotonic() by which the VM must be up.

    ``[site] prologue_deadline`` from the start of the hook, and never later than
    pbs_mom's alarm ($prologalarm - 10) less the time teardown needs.  ``used``:
    seconds of the alarm already spent (default: the age of this session, which
    pbs_mom starts for the prologue).
    """
    now = time.monotonic() if now is None else now
    alarm, used = alarm_spent(pbs_home, used)
    budget = min(cfg.site["prologue_deadline"], alarm - CLEANUP_RESERVE) - used
    if budget <= 0:
        raise errors.SiteError(f"no time left to boot a VM within $prologalarm "
                               f"({alarm + pbs.ALARM_MARGIN} s)",
                               "raise $prologalarm in mom_priv/config")
    return now + budget


def _cached(fn):
    box = []

    def get():
        if not box:
            box.append(fn())
        return box[0]
    return get


def run(argv, config_path=None, pbs_home=None, environ=None, state_dir=None):
    """The step's work; raises vmwn errors.  Returns 0 when the job may start.

    A job vmwn will not run (the user's mistake, or too many failed starts)
    is still started: its refusal record makes the job starter print the
    reason on the job's stderr and exit non-zero, so the owner reads why in
    the .e file (after a prologue exit 1 pbs_mom returns no .o/.e at all).
    """
    environ = os.environ if environ is None else environ
    args = pbs.parse_prologue_argv(argv)
    try:
        cfg = config.load(config_path)
    except errors.VmwnError as e:
        return _unconfigured(state_dir, args.job_id, e)
    home = pbs_home or cfg.pbs_home
    variables = _cached(lambda: pbs.job_variables(home, args))
    jlog = logsetup.job_logger(__name__, args.job_id)
    setup_logging(cfg)  # before anything may log: stderr is the job's .e file
    try:
        choice = request.requested_env(cfg, args, variables)
        if choice is None:
            return 0
        if state_dir and os.path.realpath(state_dir) != os.path.realpath(cfg.site["state_dir"]):
            # The job starter would look for this job's VM in the other directory,
            # find none, and run the job on the host.
            return _unconfigured(state_dir, args.job_id, errors.SiteError(
                f"[site] state_dir is {cfg.site['state_dir']}, but vmwn's steps and job "
                f"starter were installed with {state_dir}",
                "install vmwn again after changing state_dir ('make install' or "
                "'vmwn-install install')"))
        jlog.info("environment %s requested by %s", choice.name, choice.source)
        req = request.build(cfg, choice, args, environ, variables)  # checked
    except errors.UserError as e:
        return _refuse(cfg, args.job_id, e, jlog)
    until = deadline(cfg, home)
    from ... import interrupt, lifecycle, netns, reap, warden
    # Where QEMU runs (its forwarded port, a job network's bridge); the mom's own
    # namespace stays this process's origin (a job network's VXLAN socket).
    netns.enter_libvirts(cfg.site["libvirt_uri"])
    with interrupt.noted(signal.SIGTERM):
        try:
            st = lifecycle.prepare(cfg, req, until)
            try:
                pid = warden.spawn(cfg, st, warden.listen(cfg, st))
                interrupt.check()  # the warden is in the record: the teardown stops it
            except BaseException:
                _teardown(cfg, args.job_id)
                raise
            jlog.info("VM %s prepared (%d vCPUs, %d MiB); warden %d boots it",
                      st.domain, req.vcpus, req.memory_mib, pid)
            if is_sister(environ):
                _adopt_when_up(cfg, st, home, jlog)
        except errors.UserError as e:
            return _refuse(cfg, args.job_id, e, jlog)
        except errors.VmwnError as e:
            return _failed(cfg, args.job_id, e, jlog)
        except interrupt.Interrupted as e:
            return _failed(cfg, args.job_id, errors.TransientError(
                f"the prologue was interrupted by {signal.Signals(e.signum).name}",
                "the job is requeued"), jlog)
        finally:
            # Heal the node: remains of jobs that ended without their epilogue (their
            # ports, disk, memory).  Once the warden is on its way, so that the job's
            # boot does not wait for it; a failed start heals before its retry.  Not
            # when pbs_mom asked the prologue to stop.
            if not interrupt.requested():
                held = pbs.MomJobs(home).present  # asks the server from the mom's namespace
                reap.bounded_reap(cfg, lambda job: netns.at_origin(held, job),
                                  batch=request.BATCH)
    return 0


def _adopt_when_up(cfg, st, pbs_home, jlog):
    """On a sister, where no job starter runs: a detached child waits for the guest
    (as a further task, so that its end never ends the job), then has this node's
    pbs_mom count the VM as the job's (``tm_adopt``, as the job's user, from the
    mom's network namespace), so each node's mom charges its own guest."""
    from ... import jobrun, state, wardenclient
    sock = state.warden_socket(cfg.site["state_dir"], st.job_id)
    child = os.fork()
    if child:
        os.waitpid(child, 0)  # it leaves at once, its child detached
        return
    code = 1
    try:
        os.setsid()
        if os.fork():
            code = 0
            return
        nul = os.open(os.devnull, os.O_RDWR)  # pbs_mom's pipes are the prologue's alone
        for fd in (0, 1, 2):
            os.dup2(nul, fd)
        os.close(nul)
        from ... import netns
        answer, wsock = wardenclient.wait_answer(sock)
        if answer.get("ready"):
            wsock.sendall(b"task\n")
            from .starter import adopt_vm
            import types
            rec = types.SimpleNamespace(**answer["record"])
            netns.back_to_origin()
            # The job's cookie, which pbs_mom checks when given one (root reads it).
            record = pbs.read_job_record(pbs.job_record_path(pbs_home, st.job_id))
            cookie = record.attributes.get("cookie", "").strip() if record else ""
            from ... import privs
            privs.drop_to(rec.user, rec.uid, rec.gid)
            if cookie:
                os.environ["PBS_JOBCOOKIE"] = cookie
            adopt_vm(st.job_id, rec, jlog)
            jobrun.running(wsock)  # the sister's warden becomes its keeper
        wsock.close()
        code = 0
    except BaseException as e:  # noqa: BLE001 - a detached child: log, never raise
        jlog.error("the sister's VM was not adopted into the job: %s", e)
    finally:
        os._exit(code)


def _failed(cfg, job_id, error, jlog):
    """A start that failed: requeued (``error`` raised) while it may still pass, else
    refused; returns 0."""
    n = _counted(cfg, job_id, error, cfg.site["start_attempts"], jlog)
    return _refuse(cfg, job_id, error.restated(
        f"the job's virtual machine could not be prepared in {n} starts; "
        f"last: {error.problem}"), jlog)


def _unconfigured(state_dir, job_id, error):
    """vmwn.conf cannot be read, or names another state directory than the one the
    steps were installed with, so nothing says how this job should run: requeue
    it (the site may be fixing the file), counted in the state directory installed
    with the step, and after the default start_attempts refuse it.  The job
    starter needs no configuration to tell the job's owner why; without a count
    pbs_server would restart the job at once, for ever (measured: 2580 starts).
    """
    setup_logging()
    jlog = logsetup.job_logger(__name__, job_id)
    where = state_dir or config.SITE_KEYS["state_dir"].default
    _counted(where, job_id, error, config.SITE_KEYS["start_attempts"].default, jlog)
    return _refuse(where, job_id, errors.SiteError(
        f"this node's vmwn configuration cannot be used, so the job was not run "
        f"({error.problem})", error.fix), jlog)


def _counted(where, job_id, error, limit, jlog):
    """Count one more failed start (vmwn.state.failed_start): re-raises ``error`` (a
    requeue) while there were fewer than ``limit``, else returns the count."""
    from ... import state
    return state.failed_start(where, job_id, error, limit, jlog)


def _refuse(cfg, job_id, error, jlog):
    """Let the job start only to fail with ``error`` shown to its owner; returns 0.
    ``cfg`` is the configuration, or the state directory itself (see _unconfigured).

    A node that cannot record the refusal aborts the job instead (exit 1): its
    reason then stays in pbs_mom's spool, but the job never loops.
    """
    from ... import state
    jlog.warning("job refused: %s", error.line())
    try:
        state.write_refusal(cfg, job_id, error)
    except (OSError, errors.VmwnError) as e:
        raise errors.NodeBroken(f"{error.problem}; and the refusal cannot be recorded "
                                f"({_why(e)})", error.fix) from None
    state.clear_starts(cfg, job_id)
    return 0


def _why(e):
    return e.problem if isinstance(e, errors.VmwnError) else (e.strerror or str(e))


def _teardown(cfg, job_id):
    from ... import lifecycle
    try:
        lifecycle.destroy(cfg, job_id)
    except Exception as e:  # noqa: BLE001 - reported; the requeue goes ahead
        logsetup.job_logger(__name__, job_id).error("teardown after failure: %s", e,
                                                     exc_info=True)


def main(argv, config_path=None, pbs_home=None, environ=None, state_dir=None):
    """Entry point of prologue.d/50-vmwn: every outcome becomes a deliberate exit code."""
    ensure_std_fds()
    os.umask(0o022)  # pbs_mom hands the prologue the job's umask (077 by default)
    job_id = argv[1] if len(argv) > 1 else "?"
    try:
        return run(argv[1:], config_path, pbs_home, environ, state_dir)
    except BaseException as e:  # noqa: BLE001 - no exception may exit 1 by accident
        setup_logging()
        jlog = logsetup.job_logger(__name__, job_id)
        if isinstance(e, errors.VmwnError):
            jlog.warning("prologue failed: %s", e.line())
            say(e.line())
        else:
            jlog.error("prologue failed unexpectedly", exc_info=True)
            say(f"internal error in the prologue ({type(e).__name__}: {e}); "
                "see the node's syslog")
        return errors.exit_code(
            EXIT_CODES["prologue.parallel" if is_sister(environ or os.environ) else "prologue"],
            e)
