"""OpenPBS: vmwn's hooks for a real OpenPBS complex (see vmwn/openpbs/hook.py).

Like ``vmwn.torque``, this package reads a job in its batch system's terms and
hands the VM machinery a checked ``spec.JobSpec``; the job itself runs through
the batch-neutral ``vmwn.jobrun``.  It imports nothing of ``vmwn.torque``.
"""
