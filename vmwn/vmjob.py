"""A VM job's start and end on its node, for batch systems whose hooks call vmwn's
runtime as root (OpenPBS's ``execjob_*`` hooks, Slurm's SPANK plugin).

:func:`begin` prepares the job's VM and starts its warden, which boots it while
the batch daemon goes on.  The owner's mistake becomes a refusal record (the
batch system's job starter then fails the job with the reason on its stderr); a
failure that may pass is raised again, so that the batch system starts the job
again, until ``[site] start_attempts``, and is then refused with the count.
:func:`end` stops the warden, copies the output back (copy mode) and destroys
the VM; it is idempotent.  Each batch system's package says how a job is read
(``build``), which jobs its daemon still holds (``held``, for the reap) and what
a raised error does there.
"""

import logging
import os
import time

from . import errors, lifecycle, logsetup, netns, offline, reap, state, transfer, warden

log = logging.getLogger(__name__)

# Seconds begin may take before it gives up, when the batch system bounds its hook
# (OpenPBS kills the runtime at 50 s): room for the teardown of a failed preparation.
BEGIN_BUDGET = 35.0
HARVEST_MAX_SECONDS = 90.0


def begin(cfg, job_id, build, held=None, budget=BEGIN_BUDGET, batch=None):
    """Prepare ``job_id``'s VM from ``build()`` (a checked JobSpec, or UserError /
    SiteError / TransientError) and spawn its warden.  ``held(job_id)``: the batch
    daemon still holds that job (the bounded reap spares it); None skips the reap.
    ``batch``: the batch system's name; its reap leaves other batch systems' jobs alone."""
    jlog = logsetup.job_logger(__name__, job_id)
    netns.enter_libvirts(cfg.site["libvirt_uri"])
    try:
        spec = build()
        jlog.info("environment %s requested", spec.env.name)
        until = time.monotonic() + min(cfg.site["prologue_deadline"], budget)
        st = lifecycle.prepare(cfg, spec, until)
        try:
            pid = warden.spawn(cfg, st, warden.listen(cfg, st))
        except BaseException:
            destroy(cfg, job_id, jlog)
            raise
        jlog.info("VM %s prepared (%d vCPUs, %d MiB); warden %d boots it", st.domain,
                  spec.vcpus, spec.memory_mib, pid)
    except errors.UserError as e:
        refuse(cfg, job_id, e, jlog)
    except errors.VmwnError as e:
        n = state.failed_start(cfg, job_id, e, cfg.site["start_attempts"], jlog)
        refuse(cfg, job_id, e.restated(f"the job's virtual machine could not be prepared "
                                       f"in {n} starts; last: {e.problem}"), jlog)
    finally:
        if held is not None:
            reap.bounded_reap(cfg, held, batch=batch)


def refuse(cfg, job_id, error, jlog):
    """Let the job start only to fail in its starter with ``error`` on its stderr."""
    jlog.warning("job refused: %s", error.line())
    try:
        state.write_refusal(cfg, job_id, error)
    except OSError as e2:
        raise errors.NodeBroken(f"{error.problem}; and the refusal cannot be recorded "
                                f"({e2.strerror})", error.fix) from None
    state.clear_starts(cfg, job_id)


def end(cfg, job_id, harvest_seconds=HARVEST_MAX_SECONDS):
    """Stop the job's warden, copy its output back (copy mode), destroy its VM."""
    if state.remove_lone_refusal(cfg.site["state_dir"], job_id):
        return  # refused before anything was made (the starter told its owner why)
    if not os.path.lexists(state.job_dir(cfg, job_id)):
        return  # nothing made: a start begin failed keeps its count for the next
    state.clear_starts(cfg, job_id)  # it got through begin: a rerun counts afresh
    netns.enter_libvirts(cfg.site["libvirt_uri"])
    jlog = logsetup.job_logger(__name__, job_id)
    if state.exists(cfg, job_id):
        try:
            st = state.load(cfg, job_id)
            if warden.stop(st):  # the job has ended: no boot, pause or resume from here on
                st = state.load(cfg, job_id)
            if st.phase == "running" and st.data == "copy":
                _copy_back(cfg, st, jlog, harvest_seconds)
        except Exception as e:  # noqa: BLE001 - the VM is destroyed whatever happened
            jlog.error("output not copied back: %s", line(e),
                       exc_info=not isinstance(e, errors.VmwnError))
    destroy(cfg, job_id, jlog)


def _copy_back(cfg, st, jlog, seconds):
    try:
        res = transfer.harvest(cfg, st, timeout=seconds)
    except (errors.GuestLost, errors.TransientError) as e:
        if not offline.guest_gone(cfg, st):
            raise
        jlog.info("guest gone (%s); reading its disk", e.line())
        res = offline.recover(cfg, st)
    jlog.info("copied back %d files, %d bytes in %.1f s", res.files, res.bytes, res.seconds)


def destroy(cfg, job_id, jlog):
    try:
        lifecycle.destroy(cfg, job_id)
    except Exception as e:  # noqa: BLE001 - reported; 'vmwn reap' finishes it
        jlog.error("VM not destroyed: %s", line(e), exc_info=not isinstance(e, errors.VmwnError))
        raise


def line(e):
    return e.line() if isinstance(e, errors.VmwnError) else f"{type(e).__name__}: {e}"
