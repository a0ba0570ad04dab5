"""vmwn's QEMU launcher: QEMU under an anchor pbs_mom can adopt (libvirt's <emulator>).

libvirt daemonizes QEMU: the session leader it made has exited and QEMU's
parent is PID 1 (or a subreaper).  pbs_mom counts a job's processes by
session, and by parentage from a process of such a session; ``tm_adopt``
needs a live session leader owned by the caller.  A plain libvirt QEMU can
therefore be neither adopted nor counted.

libvirt runs this program in QEMU's place, as the job's user.  It makes
three processes (and a guard, below):

- the **launcher** (libvirt's pid for the domain): a child subreaper that
  passes libvirt's signals on to QEMU and exits as QEMU exits;
- the **anchor**: a session leader that does nothing but wait.  The job
  starter has pbs_mom adopt its session into the job;
- **QEMU**: the anchor's child, in a session of its own.

pbs_mom counts QEMU through its parent, the anchor, so the job is charged
QEMU's CPU time and memory and its cput and vmem limits see them.  When the
job ends, or is killed for a limit, pbs_mom signals the sessions of the job:
that reaches the anchor, never QEMU, so the guest keeps running until the
epilogue has taken the job's output and destroyed it, as for any vmwn job.
QEMU then has the launcher for parent.  A QEMU that ignores libvirt's
SIGTERM for ``KILL_AFTER`` seconds is killed by the launcher, and a fourth
process, the **guard**, kills QEMU if the launcher itself is killed (libvirt's
last resort, the OOM killer): libvirt must never lose a running QEMU.

The launcher is ``launcher.c``, built by vmwn-install as ``libexec/vmwn/qemu``
with the node's QEMU compiled in as the default: libvirt probes the
emulator's capabilities without the domain's environment, while a domain
names its QEMU in ``VMWN_QEMU``.  About 0.2 MiB for the three processes
(they were Python: 2.1 MiB).
"""

import os

from . import sysfiles
from .errors import SiteError

QEMU = "/usr/bin/qemu-system-x86_64"
KILL_AFTER = 5  # seconds a QEMU that ignores libvirt's SIGTERM has before SIGKILL
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "launcher.c")
MARK = b"vmwn's QEMU launcher"  # in the built program: install knows its own


def beside(launcher, name):
    """Where the program ``name`` that vmwn-install builds beside the QEMU launcher
    at ``launcher`` (``[site] emulator``) is."""
    return os.path.join(os.path.dirname(launcher), name)


def build(out, qemu=QEMU, die_before_guard=None):
    """Compile the launcher into ``out``, with ``qemu`` its default QEMU.
    ``die_before_guard`` (tests only): a build that SIGKILLs itself after QEMU's fork,
    before its guard exists, having written QEMU's pid to that path."""
    for what, value in (("QEMU", qemu), ("path", die_before_guard or "/")):
        if not value.startswith("/") or any(c in value for c in '"\\\n\r'):
            raise SiteError(f"the {what} {value!r} cannot be compiled into vmwn's QEMU launcher",
                            "use an absolute path without quotes, backslashes or newlines")
    flags = [f'-DVMWN_QEMU_DEFAULT="{qemu}"', f"-DKILL_AFTER={int(KILL_AFTER)}"]
    if die_before_guard:
        flags.append(f'-DVMWN_TEST_DIE_BEFORE_GUARD="{die_before_guard}"')
    sysfiles.compile_c(out, [SOURCE], flags, "vmwn's QEMU launcher",
                       "check the node's C compiler (gcc, libc6-dev)")


def is_ours(path):
    """True for a launcher vmwn built (or the Python one of earlier versions)."""
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
    except OSError:
        return False
    return MARK in data or b"QEMU in a session of its own" in data  # 0.1.0's


def anchor_of(launcher, children):
    """The anchor among the launcher's children: the one with a child (QEMU), or 0."""
    for pid in children(launcher):
        if children(pid):
            return pid
    return 0
