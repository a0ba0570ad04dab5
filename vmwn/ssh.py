"""SSH to a job's guest with paramiko, the guest's host key always pinned.

The prologue generated the guest's host key and put it on the seed; the client
accepts that key and no other (RejectPolicy, no trust on first use), so a
process squatting on the forwarded port cannot impersonate the guest.
"""

import base64
import logging
import socket
import time

from .errors import GuestLost, SiteError, TransientError

log = logging.getLogger(__name__)


def _paramiko():
    import paramiko
    return paramiko


def pinned_host_keys(st):
    """A HostKeys object holding exactly the job's host key for its forwarded port."""
    pm = _paramiko()
    kind, blob = st.host_key_public.split()[:2]
    key = pm.PKey.from_type_string(kind, base64.b64decode(blob))
    hk = pm.HostKeys()
    hk.add(f"[{st.bind_address}]:{st.port}", kind, key)
    return hk


def load_user_key(path):
    pm = _paramiko()
    try:
        return pm.Ed25519Key.from_private_key_file(path)
    except PermissionError:
        raise SiteError(f"cannot read the job's key {path}: permission denied",
                        "run as the job's user or as root") from None
    except FileNotFoundError:
        raise GuestLost(f"the job's key {path} is gone", "the job's VM was torn down") from None
    except pm.SSHException as e:
        raise SiteError(f"the job's key {path} is unreadable: {e}", "requeue the job") from None


def banner_ready(address, port, timeout=1.0):
    """True if an SSH server answers on address:port with its version banner.

    QEMU's user networking accepts TCP connections on a forwarded port before
    the guest listens, so a connect alone proves nothing; the banner does.
    """
    try:
        with socket.create_connection((address, port), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(4).startswith(b"SSH-")
    except OSError:
        return False


def _nodelay_socket(address, port, timeout):
    """A TCP connection with Nagle's algorithm off.

    SSH sends many small packets that each wait for an answer (key exchange,
    service and channel requests, SFTP calls).  With Nagle on, such a packet
    sent while an earlier one is unacknowledged waits for the peer's delayed
    ACK, about 40 ms on Linux (measured: opening SFTP took 55 ms instead of
    12 ms).  OpenSSH's client sets TCP_NODELAY too.
    """
    s = socket.create_connection((address, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


# Seconds Guest.run waits, after a command's exit status, for the output it has not yet
# had: only a command that left a process holding its stdout waits them all.
OUTPUT_GRACE = 5.0


class Guest:
    """One authenticated SSH connection to a job's guest."""

    def __init__(self, client, st):
        self.client, self.st = client, st

    @property
    def protocol_errors(self):
        """What else than OSError and EOFError its calls raise (vmwn.relay.Session's too)."""
        return (_paramiko().SSHException,)

    @classmethod
    def connect(cls, st, timeout=30.0, pkey=None, opener=None):
        """Log in as the job's user; the guest must present the job's host key.

        ``opener(timeout)`` returns a socket already connected to the guest's
        forward (vmwn.wardenclient.open_connection, for a process outside libvirt's
        network namespace); by default one is opened to bind_address:port here.

        A connection the guest drops before the key exchange (its sshd settling
        or restarting while it boots) is retried until ``timeout``; a wrong host
        key or a refused key is final at once.
        """
        pm = _paramiko()
        pkey = pkey or load_user_key(st.key_path)
        end = time.monotonic() + timeout
        while True:
            client = pm.SSHClient()
            hk = client.get_host_keys()  # empty: system known_hosts are never loaded
            for host, keys in pinned_host_keys(st).items():
                for kind, key in keys.items():
                    hk.add(host, kind, key)
            client.set_missing_host_key_policy(pm.RejectPolicy())
            left = max(1.0, end - time.monotonic())
            try:
                client.connect(st.bind_address, port=st.port, username=st.user, pkey=pkey,
                               look_for_keys=False, allow_agent=False, timeout=left,
                               banner_timeout=left, auth_timeout=left,
                               sock=(opener(left) if opener else
                                     _nodelay_socket(st.bind_address, st.port, left)))
                break
            except pm.BadHostKeyException:
                client.close()
                raise SiteError(f"the server on {st.bind_address}:{st.port} presented a host "
                                f"key that is not job {st.job_id}'s; refused",
                                "another process holds the job's port: run 'vmwn ps' and "
                                "investigate") from None
            except pm.AuthenticationException as e:
                client.close()
                raise TransientError(f"the guest refused the job's key ({e})",
                                     "the guest may still be starting") from None
            except (pm.SSHException, OSError, EOFError) as e:
                client.close()
                # Nothing listens (QEMU is gone): final.  Accepted, then dropped: retry.
                settling = not isinstance(e, ConnectionRefusedError) and isinstance(
                    e, (pm.SSHException, EOFError, ConnectionResetError))
                if settling and time.monotonic() + 0.2 < end:
                    time.sleep(0.2)
                    continue
                raise GuestLost(f"cannot reach the job's guest on {st.bind_address}:{st.port}: "
                                f"{' '.join(str(e).split()) or type(e).__name__}",
                                "the job's VM is not running") from None
        transport = client.get_transport()
        transport.set_keepalive(15)
        return cls(client, st)

    def exec(self, command, pty=False, term="vt100", size=(80, 24)):
        """Start ``command`` (run by the guest user's shell); returns the channel."""
        pm = _paramiko()
        try:
            chan = self.client.get_transport().open_session(timeout=30)
            if pty:
                chan.get_pty(term=term or "vt100", width=size[0], height=size[1])
            chan.exec_command(command)
        except (pm.SSHException, OSError, EOFError, AttributeError) as e:
            raise GuestLost(f"lost the job's guest: {e or type(e).__name__}",
                            "the job's VM stopped") from None
        return chan

    def capture_exit_signals(self):
        """Record RFC 4254 "exit-signal" on each channel as ``chan.vmwn_exit_signal``
        (the signal's name): paramiko drops it, and the job starter relays it.

        Only this connection's dispatch table is replaced (a private paramiko
        table, so it is done here, beside the rest of vmwn's paramiko); the
        request still reaches paramiko's own handler.
        """
        from paramiko.common import MSG_CHANNEL_REQUEST
        transport = self.client.get_transport()
        table = dict(type(transport)._channel_handler_table)
        original = table[MSG_CHANNEL_REQUEST]

        def handler(chan, m):
            pos = m.packet.tell()
            try:
                if m.get_text() == "exit-signal":
                    m.get_boolean()
                    chan.vmwn_exit_signal = m.get_text()
            except Exception:  # noqa: BLE001 - a malformed request is paramiko's to reject
                pass
            m.packet.seek(pos)
            original(chan, m)

        table[MSG_CHANNEL_REQUEST] = handler
        transport._channel_handler_table = table

    def run(self, command, timeout=60.0, stdin=None):
        """Run a short command; returns (status, stdout bytes, stderr bytes)."""
        chan = self.exec(command)
        if stdin is not None:
            chan.sendall(stdin)
        chan.shutdown_write()
        end = time.monotonic() + timeout
        out, err = bytearray(), bytearray()
        drained_by = None  # after the exit status: until when the rest of the output may come
        while True:
            # Read first: whatever the guest sent before its end of file is then in.
            eof = chan.eof_received or chan.closed
            got = False
            if chan.recv_ready():
                out += chan.recv(65536)
                got = True
            if chan.recv_stderr_ready():
                err += chan.recv_stderr(65536)
                got = True
            if chan.exit_status_ready() and not got:
                # sshd may send the exit status before the last of the output (seen:
                # a guest's `hostname` came back empty with status 0, under load), so
                # the end is the end of file; a command that left a process holding its
                # output (a daemon) sends none, and gets OUTPUT_GRACE.
                if eof:
                    break
                drained_by = drained_by or min(end, time.monotonic() + OUTPUT_GRACE)
                if time.monotonic() >= drained_by:
                    break
            if not got:
                if chan.closed and not chan.exit_status_ready():
                    raise GuestLost("the guest closed the session", "the VM stopped")
                if time.monotonic() >= end:
                    chan.close()
                    raise TransientError(f"guest command did not finish in {timeout:.0f} s",
                                         "check the guest")
                time.sleep(0.005)
        return chan.recv_exit_status(), bytes(out), bytes(err)

    def sftp(self):
        pm = _paramiko()
        try:
            return self.client.open_sftp()
        except (pm.SSHException, OSError, EOFError) as e:
            raise GuestLost(f"cannot open SFTP to the job's guest: {e}", "the VM stopped") from None

    def close(self):
        self.client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
