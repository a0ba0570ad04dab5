"""Slurm: vmwn's SPANK plugin (vmwn_spank.c) and what it runs.

``sbatch --vmwn=ENV`` (or ``#SBATCH --vmwn=ENV``) asks for a VM.  The plugin
checks the environment at submission (``runtime check``), prepares the VM in
the batch step's slurmstepd (``runtime begin``), execs vmwn's Slurm job starter
in the batch script's place, and ends the VM when the step ends (``runtime
end``).  Like ``vmwn.torque`` and ``vmwn.openpbs``, this package reads a job in
its batch system's terms and hands the core a checked ``spec.JobSpec``; the job
itself runs through the batch-neutral ``vmwn.jobrun``.
"""
