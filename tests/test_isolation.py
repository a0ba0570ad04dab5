"""What a job's VM can reach on the host: files, other jobs, the host's loopback.

Real libvirtd, real QEMU guests, real SSH; the host service is a TCP server on
127.0.0.1 (the guest reaches the host's loopback through 10.0.2.2).
"""

import contextlib
import dataclasses
import hashlib
import os
import socket
import stat
import subprocess
import threading
import time

import pytest

from vmwn.spec import JobSpec
from vmwn import emulator, lifecycle, state, usage, virt
from vmwn.ssh import Guest

from vmwn_testlib import leftovers, needs_image, site  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration
RUN = os.getpid()
UID, GID = 4242, 4343


def spec(cfg, job_id, network="open", uid=UID, gid=GID, user="alice"):
    e = dataclasses.replace(cfg.env("tiny"), network=network)
    return JobSpec(job_id=job_id, user=user, uid=uid, gid=gid, group="lab",
               job_name="t", env=e, vcpus=1, memory_mib=e.memory_mib,
               workdir="/home/alice/w", host_workdir="/nonexistent")


@contextlib.contextmanager
def booted(cfg, job_id, **kw):
    st = lifecycle.create(cfg, spec(cfg, job_id, **kw), time.monotonic() + 180)
    try:
        yield st
    finally:
        lifecycle.destroy(cfg, job_id)
        assert leftovers(cfg, job_id) == []


class HostService:
    """A TCP service on the host's loopback that records who connected and what they said."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.seen = []  # (uid of the connecting socket, first line)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            with conn:
                uid = socket_owner(peer[1], self.port)
                conn.settimeout(5)
                try:
                    data = conn.recv(100)
                except OSError:
                    data = b""
                # Recorded before the reply: a guest that read the reply finds itself here.
                self.seen.append((uid, data.strip()))
                conn.sendall(b"hello from the host\n")

    def close(self):
        self.sock.close()


def socket_owner(local_port, remote_port):
    """uid owning the loopback TCP socket local_port -> remote_port (from /proc/net/tcp)."""
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            lport = int(fields[1].split(":")[1], 16)
            rport = int(fields[2].split(":")[1], 16)
            if (lport, rport) == (local_port, remote_port):
                return int(fields[7])
    return None


def reach(st, port):
    """Ask the guest to connect to the host's loopback service; returns (status, output)."""
    with Guest.connect(st) as g:
        status, out, err = g.run(f"echo from-the-guest | nc -w 3 10.0.2.2 {port}", timeout=30)
    return status, out + err


@needs_image("tiny")
def test_open_guest_reaches_host_loopback_as_the_jobs_user(site):
    svc = HostService()
    try:
        with booted(site, f"301.{RUN}.iso.test", network="open") as st:
            status, out = reach(st, svc.port)
            assert b"hello from the host" in out, out
            assert svc.seen == [(UID, b"from-the-guest")]  # the job's uid, not libvirt's
    finally:
        svc.close()


@needs_image("tiny")
@pytest.mark.parametrize("network", ["no-loopback", "none"])
def test_guest_cannot_reach_host_loopback_when_the_policy_says_so(site, network):
    svc = HostService()
    try:
        with booted(site, f"302.{RUN}.{network}.iso.test", network=network) as st:
            status, out = reach(st, svc.port)
            assert status != 0 and b"hello from the host" not in out, out
            with Guest.connect(st) as g:  # vmwn's own way in still works
                assert g.run("echo in")[1] == b"in\n"
            assert svc.seen == []  # the guest's connect failed: nothing was ever accepted
    finally:
        svc.close()


def _fingerprint(paths):
    out = {}
    for p in paths:
        s = os.stat(p)
        with open(p, "rb") as f:
            out[p] = (s.st_uid, s.st_gid, stat.S_IMODE(s.st_mode),
                      hashlib.sha256(f.read()).hexdigest())
    return out


@needs_image("tiny")
def test_qemu_runs_as_the_job_user_and_base_files_stay_roots(site):
    env = site.env("tiny")
    base = [p for _, p in env.artefacts()]
    before = _fingerprint(base)
    assert all(v[:3] == (0, 0, 0o644) for v in before.values()), before
    with booted(site, f"303.{RUN}.iso.test") as st:
        assert _fingerprint(base) == before  # during the job too: nothing relabelled
        launcher = st.vm_pid
        anchor = emulator.anchor_of(launcher, usage.children)
        qemu = usage.children(anchor)
        assert anchor in usage.children(launcher) and len(qemu) == 1
        with open(f"/proc/{qemu[0]}/cmdline", "rb") as f:
            assert f.read().split(b"\0")[0] == os.fsencode(site.site["qemu"])
        for pid in (launcher, anchor, qemu[0]):
            with open(f"/proc/{pid}/status") as f:
                ids = dict(line.split(":", 1) for line in f)
            assert ids["Uid"].split() == [str(UID)] * 4 and ids["Gid"].split() == [str(GID)] * 4
        # pbs_mom adopts the anchor's session and counts QEMU as its child; signals
        # it sends the session stop at the anchor.
        assert os.getsid(anchor) == anchor and os.getsid(qemu[0]) == qemu[0]
        overlay, seed = os.stat(st.overlay), os.stat(st.seed)
        assert (overlay.st_uid, stat.S_IMODE(overlay.st_mode)) == (UID, 0o600)
        assert (seed.st_uid, stat.S_IMODE(seed.st_mode)) == (UID, 0o400)
        # Writing the base as the job's user fails: what a subverted QEMU could try.
        r = subprocess.run(["setpriv", f"--reuid={UID}", f"--regid={GID}", "--clear-groups",
                            "sh", "-c", f"echo x >> {base[0]}"], capture_output=True, text=True)
        assert r.returncode != 0 and "Permission denied" in r.stderr
    assert _fingerprint(base) == before


@needs_image("tiny")
def test_one_jobs_qemu_cannot_touch_another_jobs_files(site):
    with booted(site, f"304.{RUN}.iso.test") as mine, \
            booted(site, f"305.{RUN}.iso.test", uid=UID + 1, gid=GID + 1, user="bob") as other:
        theirs = [other.overlay, other.seed, other.key_path, state.state_path(site, other.job_id),
                  other.console_log]
        for path in theirs:
            r = subprocess.run(["setpriv", f"--reuid={UID}", f"--regid={GID}",
                                "--clear-groups", "head", "-c1", path],
                               capture_output=True, text=True)
            assert r.returncode != 0 and "Permission denied" in r.stderr, (path, r)
        assert mine.vm_pid != other.vm_pid
    assert virt.emulator_pid(mine.domain) == 0  # gone with its domain


@needs_image("tiny")
def test_a_hard_link_to_the_jobs_disk_or_seed_keeps_nothing_after_teardown(site):
    """The overlay and seed are the job user's, who may link them elsewhere on the
    same file system before the job ends: teardown empties them first."""
    job = f"306.{RUN}.iso.test"
    with booted(site, job) as st:
        links = []
        for path in (st.overlay, st.seed):
            link = os.path.join(os.path.dirname(site.site["state_dir"]), os.path.basename(path))
            os.link(path, link)
            links.append(link)
        assert all(os.path.getsize(p) > 0 for p in links)
    try:
        assert [os.path.getsize(p) for p in links] == [0, 0]
    finally:
        for p in links:
            os.unlink(p)
