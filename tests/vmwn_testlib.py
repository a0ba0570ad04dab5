"""Shared helpers for tests that use real libvirt, QEMU and guests.

Per-test state lives under /var/tmp (not pytest's 0700 tmp_path), because
QEMU runs as the job's user (vmwn's launcher, written here too) and must reach its seed.
"""

import contextlib
import fcntl
import os
import shutil
import subprocess
import tempfile

import pytest

from vmwn import config, share
from vmwn.errors import SiteError

from hostile_tree import HOSTILE_TREE, problems, tree_bytes  # noqa: F401  (the tests' too)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_DIR = os.environ.get("VMWN_TEST_IMAGE_DIR", "/var/lib/vmwn/images")

# The bundled tiny guest, as an environment section's body.
TINY = """image = tiny/disk.qcow2
kernel = tiny/vmlinuz
initrd = tiny/initrd.img
cmdline = console=ttyS0 no_timer_check quiet
accel = qemu
memory = 256M
"""

# VMWN_TEST_WARM=1 runs the suite with the tiny guests restored from a prepared
# one (docs/performance.md): the tiny environment gets warm = on and every
# configuration shares WARM_DIR, prepared once per session (conftest.py).
WARM = os.environ.get("VMWN_TEST_WARM") == "1"
WARM_DIR = "/var/tmp/vmwn-test-warm"

# The data path these tests exercise is the copy one (their users need not exist
# on the host); the mounted one has tests of its own (test_share.py, test_faults.py
# and the Torque suite).
ENVS = f"""
[env tiny]
description = tiny test guest
data = copy
{"warm = on" + chr(10) if WARM else ""}{TINY}boot_timeout = 120

[env debian12]
description = Debian 12
data = copy
image = debian12/disk.qcow2
kernel = debian12/vmlinuz
initrd = debian12/initrd.img
cmdline = root=/dev/vda ro console=ttyS0 no_timer_check quiet
accel = qemu
memory = 1G
boot_timeout = 300
"""


def qemu_reachable_dir(prefix="vmwn-test-"):
    d = tempfile.mkdtemp(prefix=prefix, dir="/var/tmp")
    os.chmod(d, 0o711)
    return d


def write_launcher(base):
    """vmwn's QEMU launcher in ``base`` (as vmwn install writes it), runnable by job users,
    and the keeper and the relay beside it (vmwn.keeper, vmwn.relay; the relay where
    libssh-dev is there to build it)."""
    from vmwn import emulator, keeper, relay
    path = os.path.join(base, "qemu")
    emulator.build(path)
    keeper.build(os.path.join(base, keeper.NAME))
    if relay.buildable():
        relay.build(os.path.join(base, relay.NAME))
    return path


# A parallel run (pytest-xdist) gives each worker its own slice of a test port
# range: vmwn's port lock is per state_dir, and tests of two workers have two.
WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0)
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))


def worker_ports(ports):
    """This worker's slice of the range "LO-HI" (all of it outside a parallel run)."""
    lo, hi = (int(p) for p in ports.split("-"))
    size = (hi - lo + 1) // WORKERS
    return f"{lo + WORKER * size}-{lo + (WORKER + 1) * size - 1}"


# What the workers of a run share is made once per run: make test's passes share
# VMWN_TEST_RUN, the workers of one pass their run uid; a plain pytest makes it anew.
STAMP_DIR = "/run"


@contextlib.contextmanager
def once_per_run(what):
    """Yields True to the first caller of this run (which makes ``what``), False to
    the others, each after the first has finished: a stamp in /run under a lock."""
    run_id = _run_id()
    with open(os.path.join(STAMP_DIR, f"vmwn-test-{what}"), "a+", encoding="ascii") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # another worker making it: wait for it
        f.seek(0)
        if run_id and f.read().strip() == run_id:
            yield False
            return
        yield True  # an exception here leaves the stamp unwritten: the next one tries
        f.seek(0)
        f.truncate()
        f.write(run_id or "")


def _run_id():
    return os.environ.get("VMWN_TEST_RUN") or os.environ.get("PYTEST_XDIST_TESTRUNUID")


def made_this_run(what):
    """``what`` was made by once_per_run in this run."""
    try:
        with open(os.path.join(STAMP_DIR, f"vmwn-test-{what}"), encoding="ascii") as f:
            return bool(_run_id()) and f.read().strip() == _run_id()
    except FileNotFoundError:
        return False


def forget_run(what):
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(STAMP_DIR, f"vmwn-test-{what}"))


def debian_major():
    """This host's Debian release ("12", "13"), or "" where it is not Debian."""
    try:
        with open("/etc/debian_version", encoding="ascii") as f:
            return f.read().split(".")[0].strip()
    except OSError:
        return ""


def install_runtime():
    """The runtime the batch systems' tests use ('make install'), once per run."""
    with once_per_run("install") as first:
        if first:
            cp = subprocess.run(["make", "-C", ROOT, "--no-print-directory", "install"],
                                capture_output=True, text=True, timeout=600)
            assert cp.returncode == 0, \
                f"make install failed:\n{cp.stdout[-2000:]}\n{cp.stderr[-2000:]}"


def write_config(base, site_extra="", envs=ENVS, ports="41000-41999", warm_dir=WARM_DIR):
    path = os.path.join(base, "vmwn.conf")
    launcher = write_launcher(base)
    with open(path, "w") as f:
        f.write(f"""[site]
emulator = {launcher}
state_dir = {base}/jobs
overlay_dir = {base}/overlays
image_dir = {IMAGE_DIR}
template_dir = {ROOT}/templates
port_range = {worker_ports(ports)}
syslog = no
warm_dir = {warm_dir}
{site_extra}
{envs}""")
    return path


@pytest.fixture
def site():
    """A configuration whose per-job state lives in a fresh directory; removed afterwards."""
    base = qemu_reachable_dir()
    path = write_config(base)
    cfg = config.load(path)
    yield cfg
    shutil.rmtree(base, ignore_errors=True)


def needs_image(name):
    """Skips a test that boots the ``name`` guest without root or the image (the
    test carries the integration marker itself: tests/conftest.py's guard)."""
    env_dir = os.path.join(IMAGE_DIR, name)
    have = all(os.path.isfile(os.path.join(env_dir, f))
               for f in ("disk.qcow2", "vmlinuz", "initrd.img"))
    return pytest.mark.skipif(not have or os.geteuid() != 0,
                              reason=f"needs root and the {name} image "
                                     f"('vmwn image build {name}' / make guest)")


def leftovers(cfg, job_id):
    """Everything of job_id still on the node (must be empty after teardown)."""
    from vmwn import disk, state, virt
    found = []
    conn = virt.connect(cfg.site["libvirt_uri"])
    try:
        found += [f"domain {d.name()}" for d in virt.find_job(conn, job_id)]
    finally:
        conn.close()
    if os.path.lexists(state.job_dir(cfg, job_id)):
        found.append(f"state {state.job_dir(cfg, job_id)}")
    if os.path.lexists(disk.overlay_path(cfg, job_id)):
        found.append(f"overlay {disk.overlay_path(cfg, job_id)}")
    found += [f"virtiofsd {pid}" for pid in share.serving(state.job_dir(cfg, job_id))]
    return found


def serve_warden(cfg, st):
    """The job's warden for a guest lifecycle.create booted: answers one job starter."""
    from vmwn import warden
    return warden.serve_booted(cfg, st)


def wait_until(predicate, timeout, what, interval=0.05):
    """Poll ``predicate`` until it returns a true value, which is returned.

    For an event that has no notification to wait on: the condition is
    re-checked until ``timeout`` seconds have passed, then the test fails
    saying that ``what`` did not happen ("the warden to end", ...).
    """
    import time
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        left = end - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(min(interval, left))


def wait_for_text(path, text, timeout, what):
    """Wait until the file ``path`` holds ``text`` (a job's output, a file it writes)."""
    def seen():
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return text in f.read()
        except FileNotFoundError:
            return False
    wait_until(seen, timeout, what, interval=0.2)


def holds_for(predicate, duration, what, interval=0.05):
    """Check that ``predicate`` stays true for ``duration`` seconds, failing at the
    first check where it is not (``what`` names what must not happen).

    Not a synchronisation: for asserting that something does *not* happen
    (a paused guest's output stays still), which no event can tell.
    """
    import time
    end = time.monotonic() + duration
    while True:
        assert predicate(), f"{what} (watched for {duration:g} s)"
        left = end - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(interval, left))


def pidfd_wait(fd, timeout, what):
    """Wait for the process behind pidfd ``fd`` to exit (the fd becomes readable);
    fail naming ``what`` after ``timeout`` seconds."""
    import select
    ready, _, _ = select.select([fd], [], [], timeout)
    assert ready, f"timed out after {timeout:g} s waiting for {what}"


# The virtio-fs daemons a test can serve mounted mode with: QEMU 7.2's C one
# (Debian 12) and the Rust one (Debian 13's own, or the one scripts/rust-virtiofsd
# unpacked on Debian 12); a test skips the one this machine lacks.
C_VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
RUST_VIRTIOFSD = next((p for p in ("/usr/libexec/virtiofsd",
                                   "/var/lib/vmwn/rust-virtiofsd/virtiofsd")
                       if os.access(p, os.X_OK)), "/usr/libexec/virtiofsd")
VIRTIOFSD_KINDS = [pytest.param(C_VIRTIOFSD, id="c"), pytest.param(RUST_VIRTIOFSD, id="rust")]


def virtiofsd_or_skip(path, rust):
    """``path`` as a vmwn.share.Daemon of the kind asked for, or skip the test."""
    if not os.access(path, os.X_OK):
        pytest.skip(f"no {path} on this machine ('make rust-virtiofsd' gets the Rust one)")
    try:
        d = share.daemon(path)
    except SiteError as e:  # there, but not understood: vmwn's fault or the wrapper's
        pytest.fail(e.line())
    if d.rust != rust:
        pytest.skip(f"{path} is not the {'Rust' if rust else 'C'} virtiofsd")
    return d
