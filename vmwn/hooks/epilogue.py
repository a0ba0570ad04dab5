"""vmwn's epilogue step: copy the job's output back from its VM, then destroy the VM.

Runs as root on the mother superior after the job (and even when its start
failed).  A job without vmwn state costs one stat.  Whatever happens, the VM is
destroyed and the step exits 0: pbs_mom only logs epilogue failures, so they are
reported on the job's stderr and in syslog instead.
"""

import logging
import os
import sys

from .. import config, errors, logsetup, pbs
from . import ensure_std_fds, is_sister, say, setup_logging

log = logging.getLogger(__name__)


def summary(res, env):
    """The one line appended to the job's .o file."""
    return (f"copied back {res.files} files ({res.bytes} bytes) in {res.seconds:.1f} s "
            f"from environment {env}")


def run(argv, config_path=None, pbs_home=None, environ=None):
    """The step's work.  Returns 0; raises only when no state could be reached."""
    environ = os.environ if environ is None else environ
    args = pbs.parse_epilogue_argv(argv)
    if is_sister(environ):
        return 0
    cfg = config.load(config_path)
    from .. import state
    if not state.exists(cfg, args.job_id):
        return 0
    setup_logging(cfg)
    jlog = logsetup.job_logger(__name__, args.job_id)
    failures = []
    try:
        st = state.load(cfg, args.job_id)
        if st.phase != "running":
            jlog.info("VM never came up (phase %s): nothing to copy back", st.phase)
        else:
            from .. import transfer
            res = transfer.harvest(cfg, st)
            jlog.info("harvested %d files, %d bytes in %.1f s", res.files, res.bytes,
                      res.seconds)
            say(summary(res, st.env), sys.stdout)
    except Exception as e:  # noqa: BLE001 - the VM is destroyed whatever happened
        failures.append(("output not copied back", e))
    try:
        from .. import lifecycle
        lifecycle.destroy(cfg, args.job_id)
    except Exception as e:  # noqa: BLE001
        failures.append(("VM not destroyed", e))
    for what, e in failures:
        line = e.line() if isinstance(e, errors.VmwnError) else f"{type(e).__name__}: {e}"
        jlog.error("%s: %s", what, line, exc_info=not isinstance(e, errors.VmwnError))
        say(f"{what}: {line}")
    return 0


def main(argv, config_path=None, pbs_home=None, environ=None):
    """Entry point of epilogue.d/50-vmwn."""
    ensure_std_fds()
    job_id = argv[1] if len(argv) > 1 else "?"
    try:
        return run(argv[1:], config_path, pbs_home, environ)
    except BaseException as e:  # noqa: BLE001 - report, then exit as the table says
        setup_logging()
        jlog = logsetup.job_logger(__name__, job_id)
        line = e.line() if isinstance(e, errors.VmwnError) else f"{type(e).__name__}: {e}"
        jlog.error("epilogue failed: %s", line, exc_info=not isinstance(e, errors.VmwnError))
        say(f"epilogue: {line}")
        return errors.exit_code("epilogue", e)
