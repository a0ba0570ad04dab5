"""What ``vmwn reap --batch slurm`` asks on a Slurm node (vmwn.commands.operators)."""

from . import stepd


def held(cfg, home=None):
    """``held`` for vmwn.reap: the jobs with a slurmstepd on this node."""
    return stepd.StepDaemons().read().present
