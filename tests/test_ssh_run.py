"""vmwn.ssh.Guest.run's end: the output a command wrote is all returned, whatever
order sshd sends it and the exit status in (a stand-in channel; no guest)."""

import time

from vmwn import ssh


class ScriptedChannel:
    """A channel whose messages arrive in the order given, SPACING seconds apart (as
    paramiko's transport thread would deliver them): ("out", b), ("err", b),
    ("status", n), ("eof",)."""

    SPACING = 0.05

    def __init__(self, messages):
        self.pending = list(messages)
        self.out, self.err = bytearray(), bytearray()
        self.status, self.eof_received, self.closed = -1, False, False
        self.next_at = time.monotonic()

    def _arrive(self):
        while self.pending and time.monotonic() >= self.next_at:
            self.next_at += self.SPACING
            kind, *value = self.pending.pop(0)
            if kind == "out":
                self.out += value[0]
            elif kind == "err":
                self.err += value[0]
            elif kind == "status":
                self.status = value[0]
            else:
                self.eof_received = True

    def shutdown_write(self):
        pass

    def _ready(self, stream):
        self._arrive()
        return bool(stream)

    @staticmethod
    def _take(stream, n):
        data = bytes(stream[:n])
        del stream[:n]
        return data

    def recv_ready(self):
        return self._ready(self.out)

    def recv(self, n):
        return self._take(self.out, n)

    def recv_stderr_ready(self):
        return self._ready(self.err)

    def recv_stderr(self, n):
        return self._take(self.err, n)

    def exit_status_ready(self):
        self._arrive()
        return self.status >= 0

    def recv_exit_status(self):
        return self.status

    def close(self):
        self.closed = True


def _run(messages, timeout=10.0):
    guest = ssh.Guest(None, None)
    chan = ScriptedChannel(messages)
    guest.exec = lambda command: chan
    return guest.run("hostname", timeout=timeout)


def test_output_sent_after_the_exit_status_is_still_returned():
    assert _run([("status", 0), ("out", b"vmwn-1-ab\n"), ("err", b"w\n"), ("eof",)]) == \
        (0, b"vmwn-1-ab\n", b"w\n")
    assert _run([("out", b"a"), ("status", 3), ("out", b"b"), ("eof",)]) == (3, b"ab", b"")


def test_a_command_whose_output_stays_open_returns_after_the_grace(monkeypatch):
    """A process left holding the command's stdout (a daemon) sends no end of file."""
    monkeypatch.setattr(ssh, "OUTPUT_GRACE", 0.2)
    t = time.monotonic()
    assert _run([("out", b"started\n"), ("status", 0)]) == (0, b"started\n", b"")
    assert 0.2 <= time.monotonic() - t < 5
