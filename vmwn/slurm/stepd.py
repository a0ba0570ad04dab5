"""Which Slurm jobs are still on this node: those with a slurmstepd here.

slurmd runs one slurmstepd per step of a job on each of its nodes (the
``extern`` step of the allocation with ``PrologFlags=Contain``, the batch step,
srun's steps), and each names itself ``slurmstepd: [JOB.STEP]`` (its command
line, as ``ps`` shows it).  vmwn's ``begin`` runs in the batch step's
slurmstepd, and the plugin ends the VM when that step ends, so a job with a vmwn
record here and no slurmstepd has ended without its end (a slurmstepd killed, a
node rebooted under its job): ``held`` for vmwn.reap.  Local and cheap, as
Torque's and OpenPBS's moms' job files are: no daemon is asked.
"""

import os
import re

# slurmstepd's title; a step of an array or heterogeneous job names its own job id
_TITLE = re.compile(rb"slurmstepd: \[(\d+)\.")


class StepDaemons:
    """The job ids of this node's slurmstepd processes, read once, when asked."""

    def __init__(self, proc="/proc"):
        self.proc = proc
        self.jobs = None

    def read(self):
        jobs = set()
        for name in os.listdir(self.proc):
            if not name.isdigit():
                continue
            try:
                with open(os.path.join(self.proc, name, "cmdline"), "rb") as f:
                    m = _TITLE.match(f.read(128))
            except OSError:  # gone meanwhile
                continue
            if m:
                jobs.add(m.group(1).decode("ascii"))
        self.jobs = jobs
        return self

    def present(self, job_id):
        if self.jobs is None:
            self.read()
        return job_id in self.jobs
