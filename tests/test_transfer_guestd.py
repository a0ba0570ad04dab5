"""An in-process SSH server that behaves like a vmwn guest, for tests without a VM.

It is a real paramiko server: public-key auth with the job's key, its own host
key (pinned by the client), SFTP over the real file system (the "guest home"
is a temporary directory), exec requests run with ``sh -c`` in a new session
(as sshd does), pty requests served with a real pty, and exit-status or
exit-signal sent the way OpenSSH sends them.  Clients reach it through a TCP
proxy that can drop (guest lost) or freeze (guest hung) the connection.

The tests at the bottom check the server itself through vmwn.ssh.Guest.
"""

import ctypes
import io
import os
import pty
import select
import signal
import socket
import subprocess
import threading
import time

import paramiko
import pytest
from paramiko.common import cMSG_CHANNEL_REQUEST
from paramiko.message import Message
from paramiko.sftp_server import SFTPServer
from paramiko.sftp_si import SFTPServerInterface
from paramiko.sftp_attr import SFTPAttributes
from paramiko.sftp_handle import SFTPHandle

from vmwn import keys, state
from vmwn.ssh import Guest


class _Handle(SFTPHandle):
    def stat(self):
        try:
            return SFTPAttributes.from_stat(os.fstat(self.readfile.fileno()))
        except OSError as e:
            return SFTPServer.convert_errno(e.errno)

    def chattr(self, attr):
        try:
            SFTPServer.set_file_attr(self.filename, attr)
        except OSError as e:
            return SFTPServer.convert_errno(e.errno)
        return paramiko.SFTP_OK


def _get_text_as_sftp_server_does(self):
    """OpenSSH's sftp-server takes and gives names as bytes; paramiko's server
    decodes them strictly.  Like the real one, this double keeps every byte."""
    return self.get_string().decode("utf-8", "surrogateescape")


paramiko.message.Message.get_text = _get_text_as_sftp_server_does


class _SFTP(SFTPServerInterface):
    """SFTP on the real file system; relative paths start at the guest home."""

    def __init__(self, server, *args, **kw):
        super().__init__(server, *args, **kw)
        self.home = server.server.guest_home

    def _p(self, path):
        return os.path.normpath(os.path.join(self.home, path))

    def _err(self, e):
        return SFTPServer.convert_errno(e.errno)

    def canonicalize(self, path):
        return self._p(path)

    def list_folder(self, path):
        path = self._p(path)
        try:
            out = []
            for name in os.listdir(path):
                a = SFTPAttributes.from_stat(os.lstat(os.path.join(path, name)))
                a.filename = os.fsencode(name)
                out.append(a)
            return out
        except OSError as e:
            return self._err(e)

    def stat(self, path):
        try:
            return SFTPAttributes.from_stat(os.stat(self._p(path)))
        except OSError as e:
            return self._err(e)

    def lstat(self, path):
        try:
            return SFTPAttributes.from_stat(os.lstat(self._p(path)))
        except OSError as e:
            return self._err(e)

    def open(self, path, flags, attr):
        path = self._p(path)
        try:
            mode = getattr(attr, "st_mode", None)
            fd = os.open(path, flags, mode if mode is not None else 0o666)
        except OSError as e:
            return self._err(e)
        if flags & os.O_CREAT and attr is not None:
            attr._flags &= ~attr.FLAG_PERMISSIONS
            SFTPServer.set_file_attr(path, attr)
        if flags & os.O_WRONLY:
            fstr = "ab" if flags & os.O_APPEND else "wb"
        elif flags & os.O_RDWR:
            fstr = "a+b" if flags & os.O_APPEND else "r+b"
        else:
            fstr = "rb"
        f = os.fdopen(fd, fstr)
        h = _Handle(flags)
        h.filename, h.readfile, h.writefile = path, f, f
        return h

    def remove(self, path):
        try:
            os.remove(self._p(path))
        except OSError as e:
            return self._err(e)
        return paramiko.SFTP_OK

    def rename(self, old, new):
        try:
            os.rename(self._p(old), self._p(new))
        except OSError as e:
            return self._err(e)
        return paramiko.SFTP_OK

    def mkdir(self, path, attr):
        path = self._p(path)
        try:
            os.mkdir(path)
            if attr is not None:
                SFTPServer.set_file_attr(path, attr)
        except OSError as e:
            return self._err(e)
        return paramiko.SFTP_OK

    def rmdir(self, path):
        try:
            os.rmdir(self._p(path))
        except OSError as e:
            return self._err(e)
        return paramiko.SFTP_OK

    def chattr(self, path, attr):
        try:
            SFTPServer.set_file_attr(self._p(path), attr)
        except OSError as e:
            return self._err(e)
        return paramiko.SFTP_OK

    def symlink(self, target_path, path):
        try:
            os.symlink(target_path, self._p(path))
        except OSError as e:
            return self._err(e)
        return paramiko.SFTP_OK

    def readlink(self, path):
        try:
            return os.readlink(self._p(path))
        except OSError as e:
            return self._err(e)


_LIBC = ctypes.CDLL(None, use_errno=True)
# What OpenSSH's sshd sets to SIG_DFL in a session's child (sshd.c, session.c):
# whatever the test process had ignored (pytest started from a shell's '&' list
# has SIGINT and SIGQUIT ignored, and a non-interactive shell cannot trap a
# signal ignored at its entry) is not the guest job's.
_SSHD_DEFAULTS = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM,
                  signal.SIGCHLD, signal.SIGPIPE, signal.SIGALRM)


def sshd_signals():
    """In the forked child (preexec_fn): the signal dispositions sshd gives a session.
    libc's signal(), not Python's, which works in the main thread only."""
    for s in _SSHD_DEFAULTS:
        _LIBC.signal(int(s), 0)  # SIG_DFL


def send_exit_signal(chan, name):
    """RFC 4254 6.10 (paramiko's server side has no helper for it)."""
    m = Message()
    m.add_byte(cMSG_CHANNEL_REQUEST)
    m.add_int(chan.remote_chanid)
    m.add_string("exit-signal")
    m.add_boolean(False)
    m.add_string(name)
    m.add_boolean(False)
    m.add_string("")
    m.add_string("")
    chan.transport._send_user_message(m)


class _Session:
    """One exec request: a local ``sh -c`` in its own session, pumped to the channel."""

    def __init__(self, server, chan, command, pty_req):
        self.server, self.chan, self.command, self.pty_req = server, chan, command, pty_req

    def start(self):
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        chan, srv = self.chan, self.server
        env = {"HOME": srv.guest_home, "USER": srv.username, "LOGNAME": srv.username,
               "SHELL": "/bin/sh", "PATH": "/usr/local/bin:/usr/bin:/bin"}
        if self.pty_req:
            master, slave = pty.openpty()
            env["TERM"] = self.pty_req[0]
            import fcntl
            import struct
            import termios
            fcntl.ioctl(slave, termios.TIOCSWINSZ,
                        struct.pack("HHHH", self.pty_req[2], self.pty_req[1], 0, 0))

            def setctty():
                sshd_signals()
                os.setsid()
                import fcntl as f2
                import termios as t2
                f2.ioctl(0, t2.TIOCSCTTY, 0)
            proc = subprocess.Popen(["sh", "-c", self.command], stdin=slave, stdout=slave,
                                    stderr=slave, cwd=srv.guest_home, env=env,
                                    preexec_fn=setctty)
            os.close(slave)
            srv.procs.append(proc)
            pumps = [threading.Thread(target=self._pump_fd, args=(master, chan.sendall),
                                      daemon=True),
                     threading.Thread(target=self._feed, args=(master,), daemon=True)]
        else:
            proc = subprocess.Popen(["sh", "-c", self.command], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    cwd=srv.guest_home, env=env, start_new_session=True,
                                    preexec_fn=sshd_signals)
            srv.procs.append(proc)
            pumps = [threading.Thread(target=self._pump_fd,
                                      args=(proc.stdout.fileno(), chan.sendall), daemon=True),
                     threading.Thread(target=self._pump_fd,
                                      args=(proc.stderr.fileno(), chan.sendall_stderr),
                                      daemon=True),
                     threading.Thread(target=self._feed, args=(proc.stdin.fileno(),
                                                               proc.stdin.close),
                                      daemon=True)]
        for p in pumps:
            p.start()
        rc = proc.wait()
        for p in pumps[:-1]:
            p.join(5)
        try:
            if rc < 0:
                send_exit_signal(chan, signal.Signals(-rc).name[3:])
            else:
                chan.send_exit_status(rc)
            chan.close()
        except (OSError, EOFError, paramiko.SSHException):
            pass

    def _pump_fd(self, fd, send):
        while True:
            try:
                data = os.read(fd, 32768)
            except OSError:
                return
            if not data:
                return
            try:
                send(data)
            except (OSError, EOFError, paramiko.SSHException):
                return

    def _feed(self, fd, close=None):
        chan = self.chan
        while True:
            try:
                data = chan.recv(32768)
            except (OSError, EOFError, paramiko.SSHException):
                data = b""
            if not data:
                if close:
                    try:
                        close()
                    except OSError:
                        pass
                return
            try:
                os.write(fd, data)
            except OSError:
                return


class _Iface(paramiko.ServerInterface):
    def __init__(self, server):
        self.server = server
        self.pty = {}

    def get_allowed_auths(self, username):
        return "publickey"

    def check_auth_publickey(self, username, key):
        if key == self.server.user_key and username == self.server.username:
            return paramiko.AUTH_SUCCESSFUL
        return paramiko.AUTH_FAILED

    def check_channel_request(self, kind, chanid):
        if kind == "session":
            return paramiko.OPEN_SUCCEEDED
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_pty_request(self, channel, term, width, height, pw, ph, modes):
        self.pty[channel.get_id()] = (term.decode() if isinstance(term, bytes) else term,
                                      width, height)
        return True

    def check_channel_window_change_request(self, channel, width, height, pw, ph):
        self.server.resizes.append((width, height))
        return True

    def check_channel_exec_request(self, channel, command):
        command = command.decode() if isinstance(command, bytes) else command
        self.server.commands.append(command)
        _Session(self.server, channel, command, self.pty.get(channel.get_id())).start()
        return True

    def check_global_request(self, kind, msg):
        return False


class _Proxy:
    """TCP relay between client and server; drop() loses the guest, freeze() hangs it."""

    def __init__(self, target_port):
        self.target = target_port
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.port = self.lsock.getsockname()[1]
        self.pairs, self.frozen, self.closed = [], threading.Event(), False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            try:
                s = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                c.close()
                continue
            self.pairs.append((c, s))
            for a, b in ((c, s), (s, c)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a, b):
        while True:
            try:
                r, _, _ = select.select([a], [], [], 0.2)
                if self.frozen.is_set():
                    continue
                if not r:
                    continue
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
            except (OSError, ValueError):
                break
        for x in (a, b):
            try:
                x.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def drop(self):
        for c, s in self.pairs:
            for x in (c, s):
                try:
                    x.shutdown(socket.SHUT_RDWR)
                    x.close()
                except OSError:
                    pass

    def close(self):
        self.closed = True
        try:
            self.lsock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.lsock.close()
        self.drop()


class GuestServer:
    """A fake guest on 127.0.0.1: see the module docstring."""

    def __init__(self, guest_home, username="guestuser"):
        self.guest_home, self.username = guest_home, username
        os.makedirs(guest_home, exist_ok=True)
        hk = keys.generate("host")
        self.host_key = paramiko.Ed25519Key.from_private_key(io.StringIO(hk.private_openssh))
        self.host_key_public = hk.public_line
        self.user_pair = keys.generate("user")
        self.user_key = paramiko.Ed25519Key.from_private_key(
            io.StringIO(self.user_pair.private_openssh))
        self.commands, self.resizes, self.procs, self.transports = [], [], [], []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.server_port = self.sock.getsockname()[1]
        self.proxy = _Proxy(self.server_port)
        self.port = self.proxy.port
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            t = paramiko.Transport(conn)
            t.add_server_key(self.host_key)
            t.set_subsystem_handler("sftp", paramiko.SFTPServer, _SFTP)
            self.transports.append(t)
            try:
                t.start_server(server=_Iface(self))
            except (paramiko.SSHException, EOFError, OSError):
                continue

    def write_user_key(self, path, uid=0, gid=0):
        return keys.write_private(path, self.user_pair, uid, gid)

    def job_state(self, job_id, key_path, workdir, host_workdir, uid=0, gid=0, user=None):
        return state.JobState(
            job_id=job_id, domain="vmwn-test", env="tiny", user=user or self.username,
            uid=uid, gid=gid, group="root", bind_address="127.0.0.1", port=self.port,
            host_key_public=self.host_key_public, key_path=key_path, workdir=workdir,
            host_workdir=host_workdir, output_dir=workdir, overlay="", seed="",
            console_log="", phase="running",
            control_dir=os.path.join(self.guest_home, ".vmwn"))

    def close(self):
        self.proxy.close()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        for t in self.transports:
            t.close()
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except OSError:
                    pass
                p.wait()


@pytest.fixture
def guestd(tmp_path):
    srv = GuestServer(str(tmp_path / "guest" / "home" / "guestuser"))
    yield srv
    srv.close()


def connect(srv, tmp_path, workdir="/nonexistent", host_workdir="/nonexistent"):
    key = srv.write_user_key(str(tmp_path / f"key-{time.monotonic_ns()}"))
    return Guest.connect(srv.job_state("1.test", key, workdir, host_workdir))


def control_dir(srv):
    """vmwn's control directory in the in-process guest (~/.vmwn, 0700)."""
    from vmwn import transfer
    d = os.path.join(srv.guest_home, transfer.CONTROL)
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


def stage_in(srv, guest, host_dir, workdir, max_bytes, umask=None):
    """What the job starter does in copy mode (transfer.prepare, no control files but
    the manifest, which it writes into control_dir(srv)); returns the StageResult."""
    from vmwn import transfer
    kw = {} if umask is None else {"umask": umask}
    return transfer.prepare(guest, control_dir(srv), [], workdir=workdir, host_dir=host_dir,
                            max_bytes=max_bytes, home=srv.guest_home, **kw).staged


def write_manifest(ctl, manifest):
    """A manifest as the job starter leaves it (for harvest tests that craft one)."""
    import json
    from vmwn.guestfiles import MANIFEST
    with open(os.path.join(ctl, MANIFEST), "w") as f:
        json.dump(manifest, f)


# ------------------------------------------------------------- the server itself

def test_server_runs_commands_and_reports_status(guestd, tmp_path):
    g = connect(guestd, tmp_path)
    try:
        status, out, err = g.run("echo out; echo err >&2; exit 5")
    finally:
        g.close()
    assert (status, out, err) == (5, b"out\n", b"err\n")


def test_server_commands_get_sshds_signal_defaults_whatever_the_test_ignores(guestd, tmp_path):
    """As sshd's session child: a signal this process ignores (pytest started from a
    shell's '&' list ignores SIGINT and SIGQUIT) is not ignored in the guest job,
    which could not trap it otherwise."""
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGQUIT)}
    try:
        g = connect(guestd, tmp_path)
        try:
            status, out, _ = g.run("sed -n 's/^SigIgn:[[:space:]]*//p' /proc/self/status")
        finally:
            g.close()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    ignored = int(out.decode().strip(), 16)
    for s in _SSHD_DEFAULTS:
        assert not ignored & (1 << (int(s) - 1)), (s.name, hex(ignored))


def test_server_host_key_is_pinned(guestd, tmp_path):
    key = guestd.write_user_key(str(tmp_path / "k"))
    st = guestd.job_state("1.test", key, "/", "/")
    st.host_key_public = keys.generate("other").public_line
    from vmwn.errors import SiteError
    with pytest.raises(SiteError, match="host key"):
        Guest.connect(st)


def test_server_sftp_home_is_guest_home(guestd, tmp_path):
    g = connect(guestd, tmp_path)
    try:
        sftp = g.sftp()
        assert sftp.normalize(".") == guestd.guest_home
        sftp.close()
    finally:
        g.close()
