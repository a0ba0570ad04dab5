"""What one running VM job costs the node beside its guest: vmwn's processes for the
job and their private memory, read from /proc while the job runs.

The processes are found from the job's state record (``STATE_DIR/<job>/state.json``:
the warden, QEMU, each virtiofsd) and from the batch system's own processes of the
job (``tops``, {pid: role}: Torque's job starter), with their descendants:

- ``launcher``, ``anchor`` and ``guard``: vmwn's QEMU launcher (vmwn.emulator):
  the record's ``vm_pid`` (libvirt's pid for the domain), its child that is QEMU's
  parent, and its other child;
- ``warden``: the record's warden;
- ``virtiofsd``: one per mounted directory;
- the batch side: each of ``tops`` by its role, every descendant that is none of
  the above by its own name.

Private memory is ``Private_Clean + Private_Dirty`` of /proc/PID/smaps_rollup: what
the node would get back if the process ended.  QEMU (the guest) is reported beside.
"""

import json
import os

from vmwn.state import job_dir_in
from vmwn.usage import children, stat_fields, tree


def _comm(pid):
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return "?"


def private_kib(pid):
    """Private memory of ``pid`` in KiB (0 when it is gone)."""
    total = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
            for line in f:
                if line.startswith(("Private_Clean:", "Private_Dirty:")):
                    total += int(line.split()[1])
    except (OSError, ValueError):
        return 0
    return total


def processes(state_dir, job_id, tops=None):
    """{pid: role} of the job's processes on this node; QEMU's role is ``QEMU``."""
    with open(os.path.join(job_dir_in(state_dir, job_id), "state.json"), encoding="utf-8") as f:
        rec = json.load(f)
    roles = {}
    launcher = rec.get("vm_pid") or 0  # libvirt's pid for the domain
    if launcher and stat_fields(launcher):
        roles[launcher] = "launcher"
        for c in children(launcher):
            kids = children(c)
            if kids:  # the anchor, QEMU's parent
                roles[c] = "anchor"
                roles.update((q, "QEMU") for q in kids)
            else:
                roles[c] = "guard"
    if rec.get("warden_pid") and stat_fields(rec["warden_pid"]):
        roles[rec["warden_pid"]] = "warden"
    for sh in rec.get("shares") or []:
        if sh.get("pid") and stat_fields(sh["pid"]):
            roles[sh["pid"]] = "virtiofsd"
    for top, role in (tops or {}).items():
        for p in tree(top):
            if p not in roles and stat_fields(p):
                roles[p] = role if p == top else _comm(p)
    return roles


def cost(state_dir, job_id, tops=None):
    """(vmwn's processes beside QEMU, their private MiB, QEMU's private MiB,
    {role: private MiB}) for the running job."""
    roles = processes(state_dir, job_id, tops)
    by_role, qemu = {}, 0.0
    for pid, role in roles.items():
        mib = private_kib(pid) / 1024
        if role == "QEMU":
            qemu += mib
        else:
            by_role[role] = by_role.get(role, 0.0) + mib
    others = [p for p, r in roles.items() if r != "QEMU"]
    return len(others), sum(by_role.values()), qemu, by_role
