"""vmwn's prologue step: boot the job's VM when the job asks for one.

Runs as root on the mother superior, with the prologue's argv and minimal
environment.  A job that asks for no environment costs a config read and
nothing else (no libvirt, paramiko or Jinja2).  Exit codes come from
vmwn.errors alone: 0 run, 1 the user's mistake (the job is aborted and the
one-line reason lands in the user's .e file), 2 anything else (requeued),
always after removing whatever was half-built.
"""

import logging
import os
import signal
import time

from .. import config, errors, logsetup, pbs, request
from . import ensure_std_fds, is_sister, say, setup_logging, session_age

log = logging.getLogger(__name__)

# Seconds kept back from pbs_mom's alarm so that a failed boot can still be
# torn down before the mom SIGKILLs the session.
CLEANUP_RESERVE = 20.0


class Interrupted(errors.TransientError):
    """The prologue received SIGTERM while it worked."""


def _on_sigterm(signo, frame):
    raise Interrupted("the prologue was interrupted by SIGTERM", "the job is requeued")


def deadline(cfg, pbs_home, now=None):
    """Absolute time.monotonic() by which the VM must be up.

    ``[site] prologue_deadline`` from the start of the hook, and never later than
    pbs_mom's alarm ($prologalarm - 10) less the time teardown needs.
    """
    now = time.monotonic() if now is None else now
    alarm = pbs.prologalarm(pbs_home) - pbs.ALARM_MARGIN
    used = session_age()
    if used >= alarm:
        used = 0.0  # not started by pbs_mom's alarm (run by hand from a long-lived shell)
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


def run(argv, config_path=None, pbs_home=None, environ=None):
    """The step's work; raises vmwn errors.  Returns 0 when the job may start."""
    environ = os.environ if environ is None else environ
    args = pbs.parse_prologue_argv(argv)
    if is_sister(environ):
        return 0  # multi-node requests are refused on the mother superior
    cfg = config.load(config_path)
    home = pbs_home or cfg.pbs_home
    variables = _cached(lambda: pbs.job_variables(home, args))
    choice = request.requested_env(cfg, args, variables)
    if choice is None:
        return 0
    setup_logging(cfg)
    jlog = logsetup.job_logger(__name__, args.job_id)
    jlog.info("environment %s requested by %s", choice.name, choice.source)
    req = request.build(cfg, choice, args, environ, variables)
    until = deadline(cfg, home)
    signal.signal(signal.SIGTERM, _on_sigterm)
    from .. import lifecycle, operators
    # Heal the node first: remains of jobs that ended without their epilogue.
    operators.bounded_reap(cfg, home)
    try:
        st = lifecycle.create(cfg, req, until)
        jlog.info("VM %s up: %d vCPUs, %d MiB, %.1f s before the deadline",
                  st.domain, req.vcpus, req.memory_mib, until - time.monotonic())
    except BaseException:
        # create removes what it built when it fails itself; destroy is
        # idempotent and covers anything failing after create returned.
        _teardown(cfg, args.job_id)
        raise
    return 0


def _teardown(cfg, job_id):
    from .. import lifecycle
    try:
        lifecycle.destroy(cfg, job_id)
    except Exception as e:  # noqa: BLE001 - reported; the requeue goes ahead
        logsetup.job_logger(__name__, job_id).error("teardown after failure: %s", e,
                                                     exc_info=True)


def main(argv, config_path=None, pbs_home=None, environ=None):
    """Entry point of prologue.d/50-vmwn: every outcome becomes a deliberate exit code."""
    ensure_std_fds()
    job_id = argv[1] if len(argv) > 1 else "?"
    try:
        return run(argv[1:], config_path, pbs_home, environ)
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
        return errors.exit_code("prologue", e)
