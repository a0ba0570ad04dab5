"""What a job's VM used, read from /proc: CPU seconds, peak memory, bytes written.

The job's QEMU runs as the job's user, so the job starter can read these for
the summary it gives the job and the node's log.  Torque's pbs_mom reads the
same counters for ``resources_used`` once the starter has had it adopt the
session QEMU hangs from (see vmwn.emulator); OpenPBS's counts only sessions, so
vmwn's hook there sets ``resources_used`` from :func:`of_vm` and
:func:`of_session` (vmwn.openpbs.runtime).
"""

import dataclasses
import os

TICK = os.sysconf("SC_CLK_TCK")


def stat_fields(pid):
    """/proc/PID/stat after the command name (field 3 onwards), or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_time(pid):
    """Start time of ``pid`` in clock ticks since boot, or 0 (tells a reused pid apart)."""
    f = stat_fields(pid)
    try:
        return int(f[19]) if f else 0
    except (ValueError, IndexError):
        return 0


def children(pid):
    """PIDs whose parent is ``pid``."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            f = stat_fields(name)
            if f and f[1] == str(pid):
                out.append(int(name))
    return out


def tree(pid):
    """``pid`` and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children(p))
    return out


@dataclasses.dataclass
class Usage:
    cpu_seconds: float
    peak_bytes: int
    written_bytes: int

    def line(self):
        return (f"the virtual machine used {self.cpu_seconds:.1f} s of CPU and "
                f"{_mib(self.peak_bytes)} of memory at most, and wrote "
                f"{_mib(self.written_bytes)} to its disk")


def _mib(n):
    return f"{n / 2**20:.0f} MiB"


def of_vm(launcher):
    """Usage of vmwn's launcher and everything under it (the anchor and QEMU), or
    None when they are gone or unreadable."""
    cpu = peak = written = 0
    seen = False
    for pid in tree(launcher):
        f = stat_fields(pid)
        if not f:
            continue
        seen = True
        cpu += int(f[11]) + int(f[12])  # utime + stime
        peak += _status_kib(pid, "VmHWM") * 1024
        written += _io(pid, "write_bytes")
    return Usage(cpu / TICK, peak, written) if seen else None


def _field(path, key):
    """The first number after ``key:`` in a /proc ``key: value`` file, or 0."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _status_kib(pid, key):
    return _field(f"/proc/{pid}/status", key)


def _io(pid, key):
    return _field(f"/proc/{pid}/io", key)


def qemu_of(launcher):
    """The QEMU under vmwn's launcher ``launcher``: the largest process of its tree, or
    None."""
    return max(tree(launcher), key=lambda p: _status_kib(p, "VmRSS"), default=None)


def own_memory(pid):
    """Bytes ``pid`` holds for itself: its anonymous memory and the memfds it holds (a
    restored guest's memory is a memfd of its QEMU's, which RSS counts only where the
    guest has touched it since the restore); None if ``pid`` is gone."""
    memfds = {}
    try:
        anon = _field(f"/proc/{pid}/smaps_rollup", "Anonymous") * 1024
        for fd in os.listdir(f"/proc/{pid}/fd"):
            link = f"/proc/{pid}/fd/{fd}"
            if os.readlink(link).startswith("/memfd:"):
                st = os.stat(link)
                memfds[st.st_ino] = st.st_blocks * 512
    except OSError:
        return None
    return anon + sum(memfds.values())


def of_session(sid):
    """(CPU seconds, resident KiB) of the live processes of session ``sid``: a job's
    own processes on the host, as a batch system that counts by session sees them."""
    cpu = rss = 0
    if sid <= 1:
        return 0.0, 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        f = stat_fields(name)
        try:
            if not f or int(f[3]) != sid:
                continue
            cpu += int(f[11]) + int(f[12])
        except (ValueError, IndexError):
            continue
        rss += _status_kib(name, "VmRSS")
    return cpu / TICK, rss
