"""The relay: a job's SSH session to its guest, in C (``relay.c``, libssh).

paramiko resident in the job starter for the job's life would cost the node
about 27 MiB per job.  So where the relay is installed, the starter (which
then never loads paramiko) starts it at once: it logs in, runs the setup's
commands the starter sends it (vmwn.transfer's tar stream, the other guests'
check), then the job, with its output, input and signals, over that one login.

The relay is built by vmwn-install beside the QEMU launcher (``[site]
emulator``'s directory), against libssh (Debian: libssh-dev to build it,
libssh-4 to run it).  Where it is missing, the starter relays in Python, as
it always did.
"""

import os
import select
import signal
import socket
import time

from . import emulator, sysfiles
from .errors import GuestLost, SiteError

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "relay.c")
NAME = "relay"
LIBSSH_H = "/usr/include/libssh/libssh.h"
END_GRACE = 5.0  # seconds the relay has to end by itself after the job's answer


def path(cfg):
    """Where this node's relay is: beside the QEMU launcher."""
    return emulator.beside(cfg.site["emulator"], NAME)


def buildable():
    """True when this node has libssh's headers to build the relay with."""
    return os.path.exists(LIBSSH_H)


def build(out):
    """Compile the relay into ``out`` (vmwn-install; the tests' own)."""
    if not buildable():
        raise SiteError(f"{LIBSSH_H} is missing, so vmwn's relay cannot be built",
                        "install libssh's headers (Debian: apt install libssh-dev)")
    sysfiles.compile_c(out, [SOURCE], [], "vmwn's relay",
                       "check libssh-dev and the node's C compiler", libs=["-lssh"])


def usable(cfg):
    """The relay's path when it is installed here, else None."""
    prog = path(cfg)
    return prog if os.access(prog, os.X_OK) else None


def argv(prog, *, fd, control_fd, user, host_key, key_path, warden_fd=None,
         lost_after=120.0, probe_every=30.0, linger=2.0, repeat_window=0.5):
    """The relay's command line (every descriptor must be inheritable)."""
    args = [prog, "--fd", str(fd), "--control", str(control_fd), "--user", user,
            "--host-key", host_key, "--key", key_path,
            "--lost-after", repr(float(lost_after)), "--probe-every", repr(float(probe_every)),
            "--linger", repr(float(linger)), "--repeat-window", repr(float(repeat_window))]
    if warden_fd is not None:
        args += ["--warden", str(warden_fd)]
    return args


_TERM_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.+-_")


class Session:
    """One relay: logged in to the guest, running the setup's commands, then the job.

    Made by :meth:`start`; ``run`` and ``exec`` serve the setup (the same calls as
    vmwn.ssh.Guest's, which vmwn.transfer and vmwn.jobrun use), ``job`` runs the job
    and ends the session.  While the job runs, the signals in ``handled`` this
    process gets are passed on to the relay (a batch daemon may signal the starter
    alone); the relay drops the second delivery of one it also got itself (one burst,
    one delivery).
    """

    protocol_errors = ()  # what else than OSError and EOFError its calls raise

    def __init__(self, pid, control, handled):
        self.pid, self.control, self.handled, self._old = pid, control, handled, {}
        self.status = None

    @classmethod
    def start(cls, prog, connect, st, handled, warden_fd=None, timeout=30.0, timing=None):
        """Start the relay on a connection ``connect(timeout)`` opens, and wait until it
        has logged in.  A login whose connection was dropped (sshd settling while the
        guest boots) is tried again on a new connection until ``timeout``."""
        end = time.monotonic() + timeout
        while True:
            sock = connect(max(1.0, end - time.monotonic()))
            try:
                session = cls._spawn(prog, sock, st, handled, warden_fd, timing or {})
            finally:
                sock.close()
            kind, why = session._answer(max(1.0, end - time.monotonic()))
            if kind == "ready":
                return session
            session.close()
            if kind == "retry" and time.monotonic() + 0.2 < end:
                time.sleep(0.2)
                continue
            _raise(kind, why)

    @classmethod
    def _spawn(cls, prog, sock, st, handled, warden_fd, timing):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        args = argv(prog, fd=sock.fileno(), control_fd=theirs.fileno(), user=st.user,
                    host_key=st.host_key_public, key_path=st.key_path, warden_fd=warden_fd,
                    **timing)
        keep = [sock.fileno(), theirs.fileno()] + ([warden_fd] if warden_fd is not None else [])
        # The signals wait, blocked, until the relay catches them (it unblocks them).
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, handled)
        try:
            pid = os.fork()
            if pid == 0:  # the relay: the descriptors it needs kept, the signal mask as it is
                try:
                    ours.close()
                    for fd in keep:
                        os.set_inheritable(fd, True)
                    os.execv(prog, args)
                finally:
                    os._exit(127)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        return cls(pid, ours, handled)

    def _pass_signals(self):
        """From now on the signals in ``handled`` this process gets go to the relay (until
        :meth:`close`).  Before, during the setup, they act on this process as they
        would without a relay: a delete then ends the starter at once, and the relay
        with it (its parent-death signal)."""
        pid = self.pid

        def pass_on(signum, frame):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
        for s in self.handled:
            self._old.setdefault(s, signal.signal(s, pass_on))

    def _answer(self, timeout=None):
        """(kind, rest) of the relay's next answer; ("lost", why) when it ended."""
        self.control.settimeout(timeout)
        try:
            data = self.control.recv(4096)
        except socket.timeout:
            self.close()
            return "lost", f"the guest did not answer within {timeout:.0f} s"
        except OSError as e:
            data, _ = b"", e
        if not data:
            return "lost", self._ended()
        kind, _, why = data.decode("utf-8", "replace").strip().partition(" ")
        return kind, why

    def _ended(self):
        """Why the relay is gone, once it is."""
        self._reap(block=True)
        st = self.status
        if st is None:
            return "the job's relay to its guest ended"
        if os.WIFSIGNALED(st):
            return (f"the job's relay to its guest was killed by "
                    f"{signal.Signals(os.WTERMSIG(st)).name}")
        return f"the job's relay to its guest exited with status {os.waitstatus_to_exitcode(st)}"

    def _reap_within(self, seconds):
        """Wait up to ``seconds`` for the relay to end by itself (close kills it after)."""
        if self.status is not None or not self.pid:
            return
        try:
            fd = os.pidfd_open(self.pid)
        except OSError:
            return
        try:
            select.select([fd], [], [], seconds)
        finally:
            os.close(fd)
        self._reap(block=False)

    def _reap(self, block):
        if self.status is None and self.pid:
            pid, st = os.waitpid(self.pid, 0 if block else os.WNOHANG)
            if pid:
                self.status = st

    def _send(self, data, fds=()):
        try:
            socket.send_fds(self.control, [data], list(fds))
        except OSError as e:
            # A relay that ended says why; one that lives (a message too long for the
            # socket) is ended here, never waited for.
            self._reap(block=False)
            why = self._ended() if self.status is not None else \
                f"cannot hand a command to the job's relay ({e.strerror or e})"
            self.close()
            raise GuestLost(why, GuestLost.FIX) from None

    def exec(self, command):
        """A command in the guest, as vmwn.transfer drives it (paramiko's channel calls:
        sendall, shutdown_write, settimeout, recv, recv_stderr, recv_exit_status, close)."""
        return _Channel(self, command)

    def run(self, command, timeout=60.0, stdin=None):
        """Run a short command; returns (status, stdout bytes, stderr bytes)."""
        chan = _Channel(self, command)
        try:
            if stdin:
                chan.sendall(stdin)
            chan.shutdown_write()
            chan.settimeout(timeout)
            status = chan.recv_exit_status()
            return status, chan.read_all(1), chan.read_all(2)
        finally:
            chan.close()

    def job(self, command, signaller, stdin=False, pty=None, size=(80, 24)):
        """Run the job on this process's fds 0-2; ("exit", N) or ("signal", signum) when
        it ended.  The session ends with it."""
        term = pty if pty and set(pty) <= _TERM_OK and len(pty) < 60 else "vt100"
        sig = signaller.encode()
        head = (f"job {int(bool(stdin))} {int(bool(pty))} {int(size[0])} {int(size[1])} "
                f"{term} {len(sig)}\n").encode()
        self._pass_signals()  # caught from before the job starts: none is lost
        self._send(head + sig + command.encode("utf-8", "surrogateescape"))
        kind, why = self._answer(None)
        self._reap_within(END_GRACE)  # it says goodbye to the guest and ends
        self.close()
        if kind == "exit":
            return ("exit", int(why) & 0xFF)
        if kind == "signal":
            num = getattr(signal, "SIG" + why, None)
            return ("signal", int(num) if isinstance(num, int) else int(signal.SIGKILL))
        _raise(kind, why)

    def close(self):
        """End the relay (at once, if it still runs) and give the signals back."""
        if self.control is not None:
            self.control.close()
            self.control = None
        if self.status is None and self.pid:
            self._reap(block=False)
            if self.status is None:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self._reap(block=True)
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}


class _Channel:
    """A command the relay runs: its stdin a pipe, its stdout and stderr memory files
    (the relay never waits on them, so no pipe can fill and stall it)."""

    def __init__(self, session, command):
        self.session, self.timeout, self.status = session, None, None
        r, self.w = os.pipe()
        self.out = {1: os.memfd_create("vmwn-out"), 2: os.memfd_create("vmwn-err")}
        self.pos = {1: 0, 2: 0}
        try:
            session._send(b"run\n" + command.encode("utf-8", "surrogateescape"),
                          (r, self.out[1], self.out[2]))
        except BaseException:
            self.close()
            raise
        finally:
            os.close(r)

    def sendall(self, data):
        view = memoryview(data)
        while view:
            view = view[os.write(self.w, view):]  # BrokenPipeError: the command ended

    def shutdown_write(self):
        if self.w >= 0:
            os.close(self.w)
            self.w = -1

    def settimeout(self, timeout):
        self.timeout = timeout

    def recv_exit_status(self):
        """The command's exit status (-1: it had none); GuestLost when the relay
        did not answer within the timeout (it is ended then)."""
        if self.status is None:
            self.shutdown_write()
            kind, why = self.session._answer(self.timeout)
            if kind != "status":
                _raise(kind, why)
            self.status = int(why)
        return self.status

    def _recv(self, which, n):
        self.recv_exit_status()
        data = os.pread(self.out[which], n, self.pos[which])
        self.pos[which] += len(data)
        return data

    def recv(self, n):
        return self._recv(1, n)

    def recv_stderr(self, n):
        return self._recv(2, n)

    def read_all(self, which):
        chunks = []
        while True:
            chunk = self._recv(which, 1 << 20)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)

    def close(self):
        self.shutdown_write()
        for fd in self.out.values():
            if fd >= 0:
                os.close(fd)
        self.out = {1: -1, 2: -1}


def _raise(kind, why):
    if kind == "site":
        raise SiteError(why, "another process may hold the job's port: run 'vmwn ps' and "
                        "investigate")
    raise GuestLost(why or "the job's relay to its guest ended", GuestLost.FIX)
