"""What vmwn's prologue and epilogue steps share: a safe start, the sister test, exit codes.

pbs_mom starts hook scripts with stdin on /dev/null and, for epilogues, often
with fds 1 and 2 closed; a Python script that opens a file before repairing
that writes its data to whatever landed on fd 1 or 2.  Nothing here imports
more than the standard library and vmwn.errors.
"""

import os
import sys

from ...errors import GuestLost, NodeBroken, SiteError, TransientError, UserError

# What pbs_mom makes of a hook's exit code, per hook (vmwn.errors.exit_code).
EXIT_CODES = {
    # pbs_mom: 0 run, 1 abort the job, 2..255 requeue it.
    # vmwn's prologue refuses the submitter's mistakes through the job starter
    # (the job's .e file); exit 1 is left for a node that cannot even do that.
    # Unanticipated exceptions ("other") are never 1 for the prologue: an accidental
    # abort would throw the user's job away where a requeue retries it.
    "prologue": {UserError: 1, NodeBroken: 1, SiteError: 2, TransientError: 2, GuestLost: 2,
                 "other": 2},
    # A sister's prologue.parallel: any non-zero requeues the job and marks the node
    # down.  A sister whose guest is not up fails the job instead: the mother
    # superior's job starter waits for every guest and names the one missing.
    "prologue.parallel": {UserError: 0, SiteError: 0, TransientError: 0, GuestLost: 0,
                          "other": 0},
    # Epilogue exit codes are only logged on the mother superior; any non-zero is
    # noise in the mom's log, so the epilogue reports through its stderr and exits 0.
    "epilogue": {UserError: 0, SiteError: 0, TransientError: 0, GuestLost: 0, "other": 0},
}

# Set by vmwn's dispatcher to the name pbs_mom ran (prologue, prologue.parallel,
# epilogue, epilogue.parallel), so a step can tell a sister from the mother superior.
HOOK_VARIABLE = "VMWN_HOOK"


def ensure_std_fds():
    """Open /dev/null onto any of fds 0-2 that is closed; give Python streams for them."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            nul = os.open(os.devnull, os.O_RDWR)
            if nul != fd:
                os.dup2(nul, fd)
                os.close(nul)
    if sys.stdin is None:
        sys.stdin = open(0, encoding="utf-8", errors="replace", closefd=False)
    if sys.stdout is None:
        sys.stdout = open(1, "w", encoding="utf-8", errors="replace", closefd=False)
    if sys.stderr is None:
        sys.stderr = open(2, "w", encoding="utf-8", errors="replace", closefd=False)


def setup_logging(cfg=None):
    """Syslog (and the debug log) only: the hook's stderr is the user's .e file."""
    import logging
    from ... import logsetup
    if cfg is None:
        logsetup.setup(stderr=False)
    else:
        logsetup.setup(syslog=cfg.syslog, debug_log=cfg.debug_log, stderr=False)
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.NullHandler())  # not logging's last resort: stderr


def is_sister(environ):
    """True on a sister node (``.parallel`` hooks, or PBS_NODENUM other than 0)."""
    if (environ.get(HOOK_VARIABLE) or "").endswith(".parallel"):
        return True
    return (environ.get("PBS_NODENUM") or "0").strip() not in ("", "0")


def say(line, stream=None):
    """Write one line to the job's .o/.e file; a closed or broken stream is not an error."""
    stream = stream or sys.stderr
    try:
        stream.write(f"vmwn: {line}\n")
        stream.flush()
    except (OSError, ValueError):
        pass


def session_age():
    """Seconds since this hook's session leader (the script pbs_mom started) began.

    pbs_mom's alarm runs from when it started the hook, not from when this step
    began; earlier steps and the dispatcher have already used part of it.
    """
    from ...usage import TICK, start_time
    started = start_time(os.getsid(0))
    try:
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, uptime - started / TICK) if started else 0.0


def alarm_spent(pbs_home, used=None):
    """(seconds pbs_mom's alarm gives a hook, seconds of them this hook has spent).

    The one place both hooks' budgets come from: ``$prologalarm`` (pbs_mom uses it
    for the epilogue too) less the mom's margin, and the age of this hook's session
    (``used`` overrides it); a hook not started under the alarm (run by hand from an
    older session) has spent nothing.
    """
    from .. import pbs
    alarm = pbs.hook_alarm(pbs_home)
    used = session_age() if used is None else used
    return alarm, (0.0 if used >= alarm else used)
