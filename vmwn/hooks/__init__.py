"""Entry points pbs_mom runs: prologue, job starter, epilogue."""
