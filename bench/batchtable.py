"""The table both batch-system benchmarks print: a measure, the VM job's value,
the native job's, and their ratio (nan where a value is missing)."""

import math
import os
import statistics
import time

NAN = float("nan")


def median(xs):
    return statistics.median(xs) if xs else NAN


def header(title):
    return f"{title:<58} {'VM job':>10} {'native':>10} {'ratio':>7}\n" + "-" * 88


def row(label, vm, native=None, digits=3):
    """One line; ``native`` None prints dashes (a measure only VM jobs have)."""
    vm = NAN if vm is None else vm
    if native is None:
        return f"{label:<58} {vm:>9.{digits}f}s {'-':>10} {'-':>7}"
    ratio = vm / native if native and not math.isnan(native) else NAN
    return f"{label:<58} {vm:>9.{digits}f}s {native:>9.{digits}f}s {ratio:>7.1f}"


def together(submit, finish, workdir, n):
    """Submit ``n`` jobs at once (``submit()`` returns a job id, each job writes
    ``first.JOBID`` in ``workdir`` as its first instruction), wait for each
    (``finish(job)``): (jobs, seconds each submission took, seconds from the first
    submission until every job had run its first instruction, or None)."""
    t0 = time.time()
    jobs, took = [], []
    for _ in range(n):
        t = time.monotonic()
        jobs.append(submit())
        took.append(time.monotonic() - t)
    for job in jobs:
        finish(job)
    first = []
    for job in jobs:
        try:
            first.append(os.stat(os.path.join(workdir, f"first.{job}")).st_mtime)
        except FileNotFoundError:
            pass
    return jobs, took, (max(first) - t0 if len(first) == n else None)
