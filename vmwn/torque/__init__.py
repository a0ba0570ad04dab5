"""Torque's side of vmwn: everything that knows it is running under pbs_mom.

pbs_mom's argv and exit-code contract, its job files, resource strings and
Variable_List (``pbs``), a job's request read from them (``request``), the
prologue, job starter and epilogue (``hooks``), installing them into a node
(``install``) and ``vmwn run``, an imitation of pbs_mom for trying a node
(``harness``).  The VM's machinery (``vmwn.lifecycle`` and what it uses) knows
nothing of Torque: it is given a checked ``vmwn.spec.JobSpec``.  Another batch
system adds a package beside this one.
"""
