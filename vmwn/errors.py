"""Errors classed by who must act, and the tables that map them to exit codes.

Every failure vmwn anticipates is raised as one of these classes; its text is a
single line naming the problem and what to do.  Entry points never choose exit
codes themselves: they call :func:`exit_code` with their table (a job starter's
and the commands' are here; a batch system's hooks bring theirs).
"""


class VmwnError(Exception):
    """A failure vmwn anticipated.  ``str()`` is one line: problem, then fix."""

    def __init__(self, problem, fix=None):
        self.problem = " ".join(str(problem).split())
        self.fix = " ".join(str(fix).split()) if fix else None
        super().__init__(self.line())

    def line(self):
        return f"{self.problem}: {self.fix}" if self.fix else self.problem

    def restated(self, problem):
        """The same error (class, fix, what else it carries) saying ``problem``; a
        subclass whose constructor takes other arguments (ProcessFailed) is fine."""
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.problem = " ".join(str(problem).split())
        new.args = (new.line(),)
        return new


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

    FIX = "the job's output so far is in its .o/.e files"  # what the job's owner can do


# Exit status of the job starter when its guest is lost mid-job (documented in
# docs/user-guide.md): the job's exit status is unknown, and 0 would be a lie.
GUEST_LOST_STATUS = 253

# The core's tables: outcome class -> exit code.  A batch system's hooks add their
# own (vmwn.torque.hooks.EXIT_CODES: what pbs_mom makes of a hook's exit code) and
# pass them to exit_code; unanticipated exceptions get the "other" entry.
_TABLE = {
    # A job starter's status becomes the job's exit status.
    "starter": {UserError: 1, SiteError: 2, TransientError: 2, GuestLost: GUEST_LOST_STATUS,
                "other": 2},
    # Operator commands (sysexits-like): 2 usage/user, 3 site, 4 transient.
    "cli": {UserError: 2, SiteError: 3, TransientError: 4, GuestLost: 4, "other": 70},
}


def exit_code(table, exc=None):
    """Exit status after ``exc`` (None means success) by ``table``: a name of the
    core's (``"starter"``, ``"cli"``) or a batch system's own table (a dict)."""
    if exc is None:
        return 0
    table = _TABLE[table] if isinstance(table, str) else table
    for cls in type(exc).__mro__:
        if cls in table:
            return table[cls]
    return table["other"]
