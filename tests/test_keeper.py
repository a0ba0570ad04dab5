"""The keeper (vmwn/keeper.c): the job's warden once its guest runs, built as vmwn-install
builds it and run as the warden execs it, over real sockets.

virsh is a stand-in here (it records its arguments; a file beside it makes it fail):
pausing a real domain through the keeper is tested under each real batch system
(tests/test_scenarios.py, the suspend test).  Commands are answered in order, so a
``connect`` sent after a ``suspend`` is answered once the suspend is done: the tests
wait on that answer, never on time.
"""

import os
import shutil
import signal
import socket
import subprocess
import tempfile

import pytest

from vmwn import keeper, wardenclient
from vmwn_testlib import pidfd_wait

pytestmark = pytest.mark.skipif(not (os.path.exists("/usr/bin/cc") or
                                     os.path.exists("/usr/bin/gcc")),
                                reason="no C compiler to build the keeper")

ANSWER = b'{"ready": true, "record": {"domain": "vmwn-k"}}\n'
VIRSH = """#!/bin/sh
echo "$*" >> "$(dirname "$0")/virsh.log"
[ ! -e "$(dirname "$0")/virsh.fail" ]
"""


@pytest.fixture(scope="module")
def prog(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("keeper") / keeper.NAME)
    keeper.build(out)
    return out


class Keeper:
    """A keeper handed a listening socket, as the warden hands it over."""

    def __init__(self, prog, tmp_path, primary=True, idle=300, forward=("127.0.0.1", 9),
                 preexec=None):
        self.dir = tmp_path
        self.virsh = tmp_path / "virsh"
        self.virsh.write_text(VIRSH)
        self.virsh.chmod(0o755)
        # where another user can connect: the keeper, not a mode, must refuse others
        self.sock_dir = tempfile.mkdtemp(prefix="vmwn-keeper-")
        os.chmod(self.sock_dir, 0o711)
        self.path = os.path.join(self.sock_dir, "w.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        os.chmod(self.path, 0o777)
        self.listener.listen(8)
        self.log = open(tmp_path / "keeper.log", "ab")
        # The job's own starter, connected to the warden before the hand-over.
        self.primary, theirs = socket.socketpair() if primary else (None, None)
        afd = keeper.answer_fd(ANSWER)
        fds = [self.listener.fileno(), afd, self.log.fileno()] + ([theirs.fileno()]
                                                                  if theirs else [])
        argv = keeper.argv(prog, str(self.virsh), job_id="7.test", owner=os.getuid(),
                           domain="vmwn-k", uri="qemu:///system", forward=forward[0],
                           port=forward[1], listen_fd=self.listener.fileno(), answer_fd=afd,
                           primary_fd=theirs.fileno() if theirs else None,
                           job_dir=str(tmp_path), idle=idle, log_fd=self.log.fileno())
        self.proc = subprocess.Popen(argv, pass_fds=fds, preexec_fn=preexec,
                                     stderr=subprocess.PIPE)
        os.close(afd)
        if theirs:
            theirs.close()
        self.pidfd = os.pidfd_open(self.proc.pid)

    def starter(self):
        """A further starter: connects and reads the answer, as wardenclient.wait_answer does."""
        answer, s = wardenclient.wait_answer(self.path, timeout=30)
        return answer, s

    def ended(self, what, timeout=30):
        pidfd_wait(self.pidfd, timeout, what)
        return self.proc.wait()

    def virsh_calls(self):
        try:
            return (self.dir / "virsh.log").read_text().splitlines()
        except FileNotFoundError:
            return []

    def logged(self):
        return (self.dir / "keeper.log").read_text()

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        os.close(self.pidfd)
        self.listener.close()
        shutil.rmtree(self.sock_dir)
        self.log.close()
        if self.primary:
            self.primary.close()


@pytest.fixture
def kp(prog, tmp_path):
    made = []

    def make(**kw):
        k = Keeper(prog, tmp_path, **kw)
        made.append(k)
        return k
    yield make
    for k in made:
        k.close()


def test_every_starter_gets_the_answer_and_the_job_ends_with_its_own_starter(kp):
    k = kp()
    answer, task = k.starter()
    assert answer["record"]["domain"] == "vmwn-k"
    task.sendall(b"task\n")
    task.close()  # a further task's end is not the job's
    answer2, other = k.starter()
    assert answer2 == answer
    other.close()
    assert k.proc.poll() is None
    k.primary.close()
    assert k.ended("the keeper to end with the job's starter") == 0
    assert "job 7.test: job starter gone: the job ended" in k.logged()


def test_connect_hands_over_a_socket_connected_to_the_guests_forward(kp):
    fwd = socket.create_server(("127.0.0.1", 0))
    k = kp(forward=fwd.getsockname())
    s = wardenclient.open_connection(k.primary, timeout=30)
    peer, _ = fwd.accept()
    s.sendall(b"ping")
    assert peer.recv(4) == b"ping"
    assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    for x in (s, peer, fwd):
        x.close()


def test_connect_to_a_forward_that_is_gone_answers_no_socket(kp):
    fwd = socket.create_server(("127.0.0.1", 0))
    port = fwd.getsockname()[1]
    fwd.close()
    k = kp(forward=("127.0.0.1", port))
    with pytest.raises(ConnectionRefusedError):
        wardenclient.open_connection(k.primary, timeout=30)
    assert f"cannot connect to the guest's forward 127.0.0.1:{port}" in k.logged()
    assert k.proc.poll() is None  # it goes on serving the job


def _answered(k):
    """Wait until every command sent so far is done: the answer to a ``connect``."""
    try:
        wardenclient.open_connection(k.primary, timeout=30).close()
    except ConnectionRefusedError:
        pass


def test_suspend_and_resume_ask_libvirt_each_time(kp):
    """libvirt's state decides, never a cache of the keeper's (a virsh killed at its
    timeout, or an operator's own virsh, would make one wrong)."""
    k = kp()
    k.primary.sendall(b"suspend\nsuspend\n")
    _answered(k)
    assert k.virsh_calls() == ["-q -c qemu:///system suspend vmwn-k"] * 2
    k.primary.sendall(b"resume\n")
    _answered(k)
    assert k.virsh_calls()[2:] == ["-q -c qemu:///system resume vmwn-k"]
    assert "job 7.test: domain vmwn-k paused" in k.logged()
    assert "job 7.test: domain vmwn-k resumed" in k.logged()


def test_a_failed_pause_is_logged_and_tried_again_at_the_next_suspend(kp, tmp_path):
    k = kp()
    (tmp_path / "virsh.fail").write_text("")
    k.primary.sendall(b"suspend\n")
    _answered(k)
    assert "job 7.test: cannot suspend domain vmwn-k: virsh failed" in k.logged()
    (tmp_path / "virsh.fail").unlink()
    k.primary.sendall(b"suspend\n")
    _answered(k)
    assert len(k.virsh_calls()) == 2
    assert k.proc.poll() is None


def test_the_vms_cgroups_are_not_moved_once_the_job_runs(kp):
    k = kp()
    k.primary.sendall(b"cgroups\n")
    k.primary.settimeout(30)
    assert k.primary.recv(1) == b"0"
    assert "refused to move the VM's cgroups" in k.logged()


@pytest.mark.skipif(os.geteuid() != 0, reason="connecting as another user needs root")
def test_another_users_connection_is_refused(kp):
    k = kp()
    pid = os.fork()
    if pid == 0:  # another uid than the job's (and than root)
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(k.path)
            s.settimeout(30)
            code = 0 if s.recv(100) == b"" else 3  # closed, no answer
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert "refused a connection from uid 65534" in k.logged()


def test_without_a_starter_it_ends_after_the_idle_limit(kp):
    """A sister's keeper: no job starter there, it ends once nobody is connected."""
    k = kp(primary=False, idle=1)
    assert k.ended("the idle keeper to end") == 0
    assert "no job starter came for 1 s; keeper ends" in k.logged()


def _term_pending():
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    os.kill(os.getpid(), signal.SIGTERM)


def test_a_sigterm_pending_across_the_exec_ends_the_keeper(kp):
    """The warden blocks SIGTERM before its last check and execs the keeper: one sent in
    between is pending across the exec, and ends the keeper as soon as it starts."""
    k = kp(preexec=_term_pending)
    k.ended("the keeper to take the pending SIGTERM")
    assert k.proc.returncode == -signal.SIGTERM


def test_bad_arguments_say_how_it_is_called(prog):
    cp = subprocess.run([prog, "--job", "1"], capture_output=True, text=True, timeout=30)
    assert cp.returncode == 2
    assert cp.stderr.startswith("usage: vmwn-keeper")
