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

The real binary is ``VMWN_QEMU`` from the domain's environment, else QEMU
below (libvirt probes the emulator's capabilities without the domain's
environment).  Standard library only: it runs under ``python3 -Es``.
"""

import ctypes
import os
import signal
import sys

QEMU = "/usr/bin/qemu-system-x86_64"
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
KILL_AFTER = 5.0
PASSED_ON = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
             signal.SIGUSR1, signal.SIGUSR2)


def main(argv=None) -> int:
    argv = sys.argv if argv is None else argv
    qemu = os.environ.get("VMWN_QEMU") or QEMU
    # Until the launcher can pass signals on, they wait: a SIGTERM from libvirt
    # right at start must end QEMU, not orphan it.  Children unblock them.
    signal.pthread_sigmask(signal.SIG_BLOCK, PASSED_ON)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # QEMU comes back here if the anchor dies
    r, w = os.pipe()
    go_r, go_w = os.pipe()  # QEMU runs only once its guard is in place
    anchor = os.fork()
    if anchor == 0:
        os.close(r)
        os.close(go_w)
        _anchor(qemu, argv, w, go_r)
    os.close(w)
    os.close(go_r)
    qemu_pid = int(os.read(r, 32) or b"0")
    os.close(r)
    qemu_fd = _pidfd(qemu_pid, anchor)
    guard = _spawn_guard(qemu_fd, libc) if qemu_fd >= 0 else 0
    os.write(go_w, b"g")  # a launcher killed before this leaves QEMU's pipe at EOF: no QEMU
    os.close(go_w)
    reaped = set()
    status = _launcher(anchor, qemu_pid, qemu_fd, reaped)
    if guard not in reaped:  # still our child, so its pid is still its own
        _kill(guard, signal.SIGTERM)  # QEMU has ended: the guard may go
    if status is None:
        return 1
    if os.WIFSIGNALED(status):  # die the way QEMU died
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
        os.kill(os.getpid(), sig)
    return os.waitstatus_to_exitcode(status)


def _pidfd(pid, parent):
    """A pidfd for QEMU while it is still the anchor's child (so not a reused pid), or -1."""
    if not pid:
        return -1
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return -1
    # usage.stat_fields' parse, repeated: the launcher runs without vmwn installed.
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
        if f.read().rsplit(")", 1)[1].split()[1] != str(parent):
            os.close(fd)
            return -1
    return fd


def _signal(fd, signum):
    if fd >= 0:
        try:
            signal.pidfd_send_signal(fd, signum)
        except OSError:
            pass


def _spawn_guard(qemu_fd, libc):
    """A process that kills QEMU if the launcher dies without passing QEMU's end on
    (SIGKILL, the OOM killer): libvirt would otherwise lose a running QEMU."""
    launcher = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    try:
        os.closerange(3, qemu_fd)  # libvirt's descriptors are QEMU's, not the guard's
        os.closerange(qemu_fd + 1, os.sysconf("SC_OPEN_MAX"))
        signal.signal(signal.SIGUSR1, lambda signum, frame: _end_qemu(qemu_fd))
        signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, PASSED_ON)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGUSR1), 0, 0, 0)
        if os.getppid() != launcher:
            _end_qemu(qemu_fd)
        while True:
            signal.pause()
    except BaseException:  # noqa: BLE001 - nothing may escape a forked child
        os._exit(1)


def _end_qemu(fd):
    _signal(fd, signal.SIGKILL)
    os._exit(0)


def _launcher(anchor, qemu_pid, qemu_fd, reaped):
    """Pass libvirt's signals on to QEMU; QEMU's wait status once it has exited."""
    armed = []

    def pass_on(signum, frame):
        _signal(qemu_fd, signum)
        if signum == signal.SIGTERM and not armed:  # libvirt's destroy
            armed.append(signum)
            signal.setitimer(signal.ITIMER_REAL, KILL_AFTER)

    def overdue(signum, frame):
        _signal(qemu_fd, signal.SIGKILL)

    for s in PASSED_ON:
        signal.signal(s, pass_on)
    signal.signal(signal.SIGALRM, overdue)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, PASSED_ON)
    while True:
        try:
            pid, st = os.wait()
        except ChildProcessError:
            return None
        reaped.add(pid)
        if pid == anchor:
            if os.WIFEXITED(st) or qemu_pid == 0:
                return st  # QEMU's own status, passed on by the anchor
            continue  # pbs_mom ended the anchor: QEMU is this process's child now
        if pid == qemu_pid:
            return st


def _anchor(qemu, argv, w, go):
    """The session pbs_mom adopts: QEMU's parent, which only waits for it."""
    try:
        os.setsid()
        for s in PASSED_ON:  # pbs_mom's signals end the anchor, nothing else
            signal.signal(s, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, PASSED_ON)
        pid = os.fork()
        if pid == 0:
            os.close(w)
            _exec(qemu, argv, go)
        os.close(go)
        os.write(w, str(pid).encode())
        os.close(w)
        _, status = os.waitpid(pid, 0)
    except BaseException as e:  # noqa: BLE001 - nothing may escape a forked child
        os.write(2, f"vmwn: cannot start {qemu}: {e}\n".encode(errors="replace"))
        os._exit(127)
    if os.WIFSIGNALED(status):
        os._exit(128 + os.WTERMSIG(status))
    os._exit(os.waitstatus_to_exitcode(status))


def _exec(qemu, argv, go):
    try:
        os.setsid()  # out of the anchor's session: pbs_mom's kill stops at the anchor
        if os.read(go, 1) != b"g":  # the launcher died before QEMU's guard was there
            os._exit(127)
        os.close(go)
        for s in (signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores these; QEMU must not
            signal.signal(s, signal.SIG_DFL)
        os.execv(qemu, [qemu] + _args(argv[1:]))
    except BaseException as e:  # noqa: BLE001 - nothing may escape a forked child
        os.write(2, f"vmwn: cannot run {qemu}: {e}\n".encode(errors="replace"))
    os._exit(127)


def _args(args):
    """QEMU's arguments: libvirt's, and for a warm start the saved state to load.  A
    restored guest that may run at once (VMWN_AUTOSTART) loses libvirt's -S: it then
    runs while libvirt still sets QEMU up, and libvirt's final 'cont' finds it running."""
    incoming = _incoming()
    if incoming and os.environ.get("VMWN_AUTOSTART") == "1":
        args = [a for a in args if a != "-S"]
    return list(args) + incoming


def _incoming():
    """``-incoming fd:N`` for a warm start: QEMU loads the prepared guest's saved
    state from ``VMWN_INCOMING`` instead of booting (libvirt's seccomp sandbox
    forbids QEMU the ``exec:`` way, so the file is opened here)."""
    path = os.environ.get("VMWN_INCOMING")
    if not path:
        return []
    fd = os.open(path, os.O_RDONLY)
    os.set_inheritable(fd, True)
    return ["-incoming", f"fd:{fd}"]


def _kill(pid, signum):
    if pid > 0:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def anchor_of(launcher, children):
    """The anchor among the launcher's children: the one with a child (QEMU), or 0."""
    for pid in children(launcher):
        if children(pid):
            return pid
    return 0


def script(python="/usr/bin/python3", qemu=QEMU):
    """The installed program: this module's source with its interpreter and default QEMU."""
    with open(__file__, encoding="utf-8") as f:
        src = f.read()
    src = src.replace(f'QEMU = "{QEMU}"', f"QEMU = {qemu!r}", 1)
    return (f"#!{python} -Es\n" + src
            + "\n\nif __name__ == '__main__':\n    sys.exit(main())\n")
