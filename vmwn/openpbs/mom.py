"""OpenPBS's pbs_mom, as vmwn sees it: its job files and which jobs it still holds.

Measured (OpenPBS 23.06, ``PBS_HOME/mom_priv/jobs``, 0700 root, searchable): a
running job has ``<jobid>.JB`` (its record) and ``<jobid>.SC`` (its script,
chowned to the job's user while it runs); a script job's shell is started with
the script's path as one line on stdin (``SHELL_INVOKE``; array ids have their
brackets escaped with backslashes).  Long ids use a shortened file prefix, so a
job counts as held while any record shares its sequence number.
"""

import os

from .. import jobrun
from ..errors import SiteError

RECORD = ".JB"
SCRIPT = ".SC"


def jobs_dir(pbs_home):
    return os.path.join(pbs_home, "mom_priv", "jobs")


def unescape_script_line(data):
    """The mom's stdin line with the brackets of an array job's id unescaped."""
    return data.replace(b"\\[", b"[").replace(b"\\]", b"]")


def is_job_script(pbs_home, path):
    """True for an existing regular file ``<jobs_dir>/NAME.SC``: what the mom names on
    the job shell's stdin."""
    return jobrun.is_spool_file(jobs_dir(pbs_home), SCRIPT, path)


class MomJobs:
    """Which jobs the mom still holds (``held`` for vmwn.reap), read once, when asked."""

    def __init__(self, pbs_home):
        self.dir = jobs_dir(pbs_home)
        self.names = None

    def read(self):
        """Read the directory now (``SiteError`` if it is missing); returns self."""
        try:
            self.names = [n for n in os.listdir(self.dir) if n.endswith(RECORD)]
        except FileNotFoundError:
            raise SiteError(f"{self.dir} does not exist, so vmwn cannot tell which "
                            "jobs are still on this node",
                            "pass the mom's PBS_HOME (pbs.conf)") from None
        return self

    def present(self, job_id):
        if self.names is None:
            self.read()
        if job_id + RECORD in self.names:
            return True
        seq = job_id.split(".", 1)[0].split("[", 1)[0]
        return any(n.split(".", 1)[0].split("[", 1)[0] == seq for n in self.names)
