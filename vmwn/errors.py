"""Errors classed by who must act, and the one table that maps them to exit codes.

Every failure vmwn anticipates is raised as one of these classes; its text is a
single line naming the problem and what to do.  Entry points never choose exit
codes themselves: they call :func:`exit_code` with the hook they implement.
"""


class VmwnError(Exception):
    """A failure vmwn anticipated.  ``str()`` is one line: problem, then fix."""

    def __init__(self, problem, fix=None):
        self.problem = " ".join(str(problem).split())
        self.fix = " ".join(str(fix).split()) if fix else None
        super().__init__(self.line())

    def line(self):
        return f"{self.problem}: {self.fix}" if self.fix else self.problem


class UserError(VmwnError):
    """The job's submitter must change the request (unknown environment, over limits)."""


class SiteError(VmwnError):
    """The site administrator must act (configuration, images, templates, libvirt)."""


class NodeBroken(SiteError):
    """The site must act, and retrying the job here cannot help even once: the node
    cannot record the job's starts, so a requeue could loop without end."""


class TransientError(VmwnError):
    """Nobody did anything wrong; trying again later may work (guest slow, ports busy)."""


class GuestLost(VmwnError):
    """The job's guest disappeared or stopped answering while the job ran."""


# Exit status of the job starter when its guest is lost mid-job (documented in
# docs/user-guide.md): the job's exit status is unknown, and 0 would be a lie.
GUEST_LOST_STATUS = 253

# The one table: hook -> error class -> exit code.  Unanticipated exceptions get
# the "other" entry, which is never 1 for the prologue: an accidental abort would
# throw the user's job away where a requeue retries it.
_TABLE = {
    # pbs_mom: 0 run, 1 abort the job, 2..255 requeue it.
    # vmwn's prologue refuses the submitter's mistakes through the job starter
    # (the job's .e file); exit 1 is left for a node that cannot even do that.
    "prologue": {UserError: 1, NodeBroken: 1, SiteError: 2, TransientError: 2, GuestLost: 2,
                 "other": 2},
    # Epilogue exit codes are only logged on the mother superior; any non-zero is
    # noise in the mom's log, so the epilogue reports through its stderr and exits 0.
    "epilogue": {UserError: 0, SiteError: 0, TransientError: 0, GuestLost: 0, "other": 0},
    # The starter's status becomes the job's exit status.
    "starter": {UserError: 1, SiteError: 2, TransientError: 2, GuestLost: GUEST_LOST_STATUS,
                "other": 2},
    # Operator commands (sysexits-like): 2 usage/user, 3 site, 4 transient.
    "cli": {UserError: 2, SiteError: 3, TransientError: 4, GuestLost: 4, "other": 70},
}


def exit_code(hook, exc=None):
    """Exit status for ``hook`` after ``exc`` (None means success)."""
    if exc is None:
        return 0
    table = _TABLE[hook]
    for cls in type(exc).__mro__:
        if cls in table:
            return table[cls]
    return table["other"]
