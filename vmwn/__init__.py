"""vmwn: dynamic virtual worker nodes for Torque/PBS.

Every batch job that names an execution environment runs in its own fresh
virtual machine, created by the prologue, entered by the job starter and
destroyed by the epilogue.
"""

__version__ = "0.1.0"
