"""What ``vmwn reap --batch torque`` asks on a Torque node (vmwn.commands.operators)."""

from . import pbs


def held(cfg, pbs_home=None):
    """``held`` for vmwn.reap: pbs_mom's job files (and the server, where pbs_python is
    installed), read now: a wrong PBS_HOME is refused before anything is judged."""
    return pbs.MomJobs(pbs_home or cfg.pbs_home).read().present
