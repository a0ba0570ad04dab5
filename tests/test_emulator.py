"""vmwn's QEMU launcher (vmwn/launcher.c, built by vmwn.emulator), run as installed with
a stand-in QEMU.

The stand-in is a shell script: it records the signals it gets, and its
behaviour is chosen by its first argument, as libvirt's QEMU arguments would.
"""

import os
import signal
import subprocess
import time

import pytest

from vmwn import emulator, usage
from vmwn_testlib import pidfd_wait, wait_until

FAKE = """#!/bin/sh
log=$(dirname "$0")/log
trap 'echo TERM >> "$log"; exit 7' TERM
case "$1" in
  exit3) exit 3 ;;
  daemonize) sleep 30 & echo $! > "$(dirname "$0")/daemon"; exit 0 ;;
  deaf) trap 'echo TERM >> "$log"' TERM ;;
esac
echo started >> "$log"
while :; do sleep 0.1; printf . >> "$(dirname "$0")/beat"; done
"""


def _built(d, qemu_script, compiled_in=False):
    """A stand-in QEMU in ``d`` running ``qemu_script``, and the launcher built beside it
    (with it as the default QEMU when ``compiled_in``)."""
    fake = d / "qemu"
    fake.write_text(qemu_script)
    fake.chmod(0o755)
    prog = d / "launcher"
    if compiled_in:
        emulator.build(str(prog), qemu=str(fake))
    else:
        emulator.build(str(prog))
    return fake, prog


@pytest.fixture
def launch(tmp_path):
    fake, prog = _built(tmp_path, FAKE)
    procs = []

    def start(mode):
        env = dict(os.environ, VMWN_QEMU=str(fake))
        p = subprocess.Popen([str(prog), mode], env=env, start_new_session=True)
        procs.append(p)
        return p
    yield start, tmp_path
    for p in procs:
        for pid in usage.tree(p.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait()


def _parts(launcher):
    end = time.monotonic() + 5
    while time.monotonic() < end:
        anchor = emulator.anchor_of(launcher, usage.children)
        if anchor:
            return anchor, usage.children(anchor)[0]
        time.sleep(0.02)
    raise AssertionError("no anchor with a QEMU under the launcher")


def _started(d):
    wait_until(lambda: "started" in _log(d), 5, "the stand-in QEMU to start", interval=0.02)


def _beats(d):
    try:
        return (d / "beat").stat().st_size
    except FileNotFoundError:
        return 0


def _waiting(pid):
    """``pid`` sleeps in wait(2) (the launcher's loop, between two children's ends)."""
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return f.read() == "do_wait"
    except FileNotFoundError:
        return False


def _end_anchor(p, anchor, qemu, d):
    """What pbs_mom does when the job ends (SIGTERM to the adopted session), and
    every consequence awaited: the anchor dead, the launcher done handling it
    (reaped and waiting again, or exited), and QEMU through one more turn of its
    loop (a SIGTERM that reached it would have run its trap by then)."""
    fd = os.pidfd_open(anchor)
    try:
        beats = _beats(d)
        os.killpg(anchor, signal.SIGTERM)
        pidfd_wait(fd, 5, "the anchor to die of SIGTERM")
    finally:
        os.close(fd)
    wait_until(lambda: p.poll() is not None
               or (anchor not in usage.children(p.pid) and _waiting(p.pid)),
               5, "the launcher to reap the anchor and wait again (or exit)")
    wait_until(lambda: _beats(d) >= beats + 2 or not usage.stat_fields(qemu)
               or usage.stat_fields(qemu)[0] == "Z",
               5, "the stand-in QEMU to go round its loop after the anchor's end")


def _log(d):
    try:
        return (d / "log").read_text().split()
    except FileNotFoundError:
        return []


def test_anchor_leads_a_session_and_qemu_has_one_of_its_own(launch):
    start, d = launch
    p = start("run")
    anchor, qemu = _parts(p.pid)
    _started(d)  # QEMU runs: its session was made before (the fork alone is not there yet)
    assert os.getsid(anchor) == anchor and os.getsid(qemu) == qemu
    assert usage.stat_fields(qemu)[1] == str(anchor)  # pbs_mom counts it through its parent


def test_ending_the_anchor_leaves_qemu_running_under_the_launcher(launch):
    """What pbs_mom does when the job ends: signal the adopted session."""
    start, d = launch
    p = start("run")
    anchor, qemu = _parts(p.pid)
    _started(d)
    _end_anchor(p, anchor, qemu, d)
    assert p.poll() is None and usage.stat_fields(qemu)[1] == str(p.pid)
    assert "TERM" not in _log(d)
    p.send_signal(signal.SIGTERM)  # what libvirt does at destroy
    assert p.wait(timeout=5) == 7 and _log(d) == ["started", "TERM"]


@pytest.mark.parametrize("anchor_first", [False, True])
def test_qemu_dies_with_a_killed_launcher(launch, anchor_first):
    """SIGKILL to libvirt's pid (its last resort, the OOM killer) must not orphan QEMU,
    before or after the job's end (pbs_mom ended the anchor)."""
    start, d = launch
    p = start("run")
    anchor, qemu = _parts(p.pid)
    if anchor_first:
        _started(d)
        _end_anchor(p, anchor, qemu, d)
        fields = usage.stat_fields(qemu)
        assert fields and fields[1] == str(p.pid), "QEMU is not the launcher's child now"
    fd = os.pidfd_open(qemu)
    try:
        p.kill()
        p.wait(timeout=5)
        pidfd_wait(fd, 5, "QEMU to die with its SIGKILLed launcher")
    finally:
        os.close(fd)
    fields = usage.stat_fields(qemu)
    assert fields is None or fields[0] == "Z"


# The launcher SIGKILLed after QEMU's fork but before its guard exists (the
# window libvirt's last resort can hit): QEMU must never run unguarded.  A build
# of the launcher that kills itself there (vmwn.emulator.build's die_before_guard).
def test_a_launcher_killed_before_qemus_guard_exists_leaves_no_qemu(launch):
    _, d = launch
    dying = d / "dying-launcher"
    emulator.build(str(dying), die_before_guard=str(d / "qemu.pid"))
    env = dict(os.environ, VMWN_QEMU=str(d / "qemu"))
    p = subprocess.Popen([str(dying), "run"], env=env, start_new_session=True)
    assert p.wait(timeout=10) == -signal.SIGKILL
    qemu = int((d / "qemu.pid").read_text())
    try:
        fd = os.pidfd_open(qemu)
    except ProcessLookupError:
        fd = None  # already gone
    if fd is not None:
        try:
            pidfd_wait(fd, 5, "the unguarded QEMU to end before it runs")
        except AssertionError:
            os.kill(qemu, signal.SIGKILL)
            raise
        finally:
            os.close(fd)
    assert "started" not in _log(d)


def test_qemu_status_is_the_launchers(launch):
    start, _ = launch
    assert start("exit3").wait(timeout=5) == 3


def test_qemu_that_ignores_sigterm_is_killed_before_libvirt_would_kill_the_launcher(launch):
    start, d = launch
    p = start("deaf")
    _parts(p.pid)
    _started(d)  # its trap is set
    t = time.monotonic()
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=emulator.KILL_AFTER + 3) == 128 + signal.SIGKILL  # as a shell says it
    assert emulator.KILL_AFTER - 0.5 < time.monotonic() - t
    assert _log(d) == ["started", "TERM"]


def test_a_daemonizing_qemu_lets_the_launcher_exit(launch):
    """libvirt probes an emulator with -daemonize and waits for the command to end."""
    start, d = launch
    p = start("daemonize")
    assert p.wait(timeout=5) == 0
    daemon = int((d / "daemon").read_text())
    assert usage.stat_fields(daemon) is not None
    os.kill(daemon, signal.SIGKILL)


def test_without_vmwn_qemu_the_launcher_runs_the_qemu_it_was_built_with(tmp_path):
    """libvirt probes the emulator without the domain's environment: the node's QEMU is
    compiled in."""
    fake, prog = _built(tmp_path, "#!/bin/sh\necho \"$@\" > \"$(dirname \"$0\")/args\"\n",
                        compiled_in=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMWN_")}
    assert subprocess.run([str(prog), "-help"], env=env, timeout=10).returncode == 0
    assert (tmp_path / "args").read_text() == "-help\n"
    assert emulator.is_ours(str(prog))


RAM = """#!/bin/sh
d=$(dirname "$0")
for a; do echo "$a"; done > "$d/args"
for a; do
  case $a in *'"mem-path":"/proc/self/fd/'*)
    fd=${a#*/proc/self/fd/}; fd=${fd%%[!0-9]*}
    readlink "/proc/$$/fd/$fd" > "$d/memfd"
    cat <&"$fd" > "$d/memory" ;;
  esac
done
"""

LIBVIRTS = ['-name', 'x', '-machine', 'pc-i440fx-7.2,usb=off,memory-backend=pc.ram', '-m', '256',
            '-object', '{"qom-type":"memory-backend-ram","id":"pc.ram","size":268435456}',
            '-object', '{"qom-type":"rng-builtin","id":"objrng0"}', '-S']


def _ram_env(fake, **kw):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMWN_")}
    return dict(env, VMWN_QEMU=str(fake), **kw)


def test_a_restored_guests_memory_is_a_copy_of_the_prepared_ones_in_a_memfd(tmp_path):
    """VMWN_RAM_FROM: QEMU's memory is a memfd of the launcher's making (the job's user's),
    holding the prepared guest's memory: its data copied, its holes read as zeros."""
    import json
    fake, prog = _built(tmp_path, RAM)
    ram = tmp_path / "ram"
    with open(ram, "wb") as f:
        f.write(b"kernel")
        f.seek(3 << 20)
        f.write(b"page cache")
        f.truncate(4 << 20)
    assert subprocess.run([str(prog), *LIBVIRTS], env=_ram_env(fake, VMWN_RAM_FROM=str(ram)),
                          timeout=10).returncode == 0
    args = (tmp_path / "args").read_text().splitlines()
    obj = json.loads(args[7])
    assert obj == {"qom-type": "memory-backend-file", "id": "pc.ram", "size": 268435456,
                   "share": True, "x-use-canonical-path-for-ramblock-id": False,
                   "mem-path": obj["mem-path"]}
    assert obj["mem-path"].startswith("/proc/self/fd/")
    assert args[:7] == LIBVIRTS[:7] and args[8:] == LIBVIRTS[8:]  # the rest as libvirt said
    assert (tmp_path / "memfd").read_text().startswith("/memfd:vmwn-guest-ram")
    assert (tmp_path / "memory").read_bytes() == ram.read_bytes()


def test_a_prepared_guests_memory_is_the_file_it_is_given_and_other_members_stay(tmp_path):
    import json
    fake, prog = _built(tmp_path, RAM)
    argv = list(LIBVIRTS)
    argv[7] = ('{"qom-type":"memory-backend-memfd","id":"pc.ram","share":true,'
               '"x-use-canonical-path-for-ramblock-id":false,"size":268435456,'
               '"host-nodes":[0,1],"policy":"bind"}')
    env = _ram_env(fake, VMWN_RAM_FILE=str(tmp_path / "ram"))
    assert subprocess.run([str(prog), *argv], env=env, timeout=10).returncode == 0
    obj = json.loads((tmp_path / "args").read_text().splitlines()[7])
    assert obj == {"qom-type": "memory-backend-file", "mem-path": str(tmp_path / "ram"),
                   "share": True, "x-use-canonical-path-for-ramblock-id": False,
                   "id": "pc.ram", "size": 268435456, "host-nodes": [0, 1], "policy": "bind"}


def test_a_restored_guest_may_map_the_prepared_memory_private_and_read_only(tmp_path):
    """VMWN_RAM_MAP: the file itself, opened read-only by QEMU and mapped private (its
    pages shared by every guest that maps it, until written)."""
    import json
    fake, prog = _built(tmp_path, RAM)
    env = _ram_env(fake, VMWN_RAM_MAP=str(tmp_path / "ram"))
    assert subprocess.run([str(prog), *LIBVIRTS], env=env, timeout=10).returncode == 0
    obj = json.loads((tmp_path / "args").read_text().splitlines()[7])
    assert obj == {"qom-type": "memory-backend-file", "mem-path": str(tmp_path / "ram"),
                   "share": False, "readonly": True, "rom": "off",
                   "x-use-canonical-path-for-ramblock-id": False,
                   "id": "pc.ram", "size": 268435456}
    assert not (tmp_path / "memfd").exists()


def test_a_cold_boot_keeps_libvirts_arguments(tmp_path):
    fake, prog = _built(tmp_path, RAM)
    assert subprocess.run([str(prog), *LIBVIRTS], env=_ram_env(fake), timeout=10).returncode == 0
    assert (tmp_path / "args").read_text().splitlines() == LIBVIRTS


@pytest.mark.parametrize("case", ["gone", "no-backend", "malformed", "quote-in-path"])
def test_a_memory_that_cannot_be_given_is_said_and_no_qemu_runs(tmp_path, case):
    fake, prog = _built(tmp_path, RAM)
    ram = tmp_path / "ram"
    ram.write_bytes(b"x")
    argv = list(LIBVIRTS)
    if case == "no-backend":
        argv[3] = "pc-i440fx-7.2,usb=off"
    if case == "malformed":
        argv[7] = '{"qom-type":"memory-backend-ram","id":"pc.ram","size":2684'
    env = _ram_env(fake, VMWN_RAM_FROM=str(tmp_path / "gone" if case == "gone" else ram))
    if case == "quote-in-path":
        env = _ram_env(fake, VMWN_RAM_MAP=str(tmp_path / 'r"am'))
    cp = subprocess.run([str(prog), *argv], env=env, timeout=10, capture_output=True, text=True)
    assert cp.returncode == 127
    assert {"gone": f"cannot read the prepared guest's memory {tmp_path / 'gone'}",
            "no-backend": "no memory backend of libvirt's",
            "malformed": "cannot read libvirt's memory backend",
            "quote-in-path": "cannot go into QEMU's arguments"}[case] in cp.stderr
    assert cp.stderr.count("\n") == 1
    assert not (tmp_path / "args").exists()


def test_a_qemu_path_that_cannot_be_compiled_in_is_refused(tmp_path):
    from vmwn.errors import SiteError
    with pytest.raises(SiteError, match="cannot be compiled into"):
        emulator.build(str(tmp_path / "l"), qemu='/opt/q"emu')


def test_guard_keeps_none_of_libvirts_descriptors(launch, tmp_path):
    """The guard holds a pidfd for QEMU and nothing libvirt gave QEMU (its monitor, its log)."""
    start, d = launch
    extra = open(tmp_path / "libvirt-fd", "w")  # stands for an fd libvirt passes to QEMU
    os.set_inheritable(extra.fileno(), True)
    try:
        env = dict(os.environ, VMWN_QEMU=str(d / "qemu"))
        p = subprocess.Popen([str(d / "launcher"), "run"], env=env, start_new_session=True,
                             pass_fds=(extra.fileno(),))
        anchor, qemu = _parts(p.pid)
        _started(d)  # QEMU runs only once the guard exists: the launcher's "go" comes after
        guard = [c for c in usage.children(p.pid) if c != anchor][0]
        fds = {int(n): os.readlink(f"/proc/{guard}/fd/{n}") for n in os.listdir(f"/proc/{guard}/fd")}
        assert [t for n, t in fds.items() if n > 2] == ["anon_inode:[pidfd]"], fds
        assert os.readlink(f"/proc/{qemu}/fd/{extra.fileno()}").endswith("libvirt-fd")
    finally:
        extra.close()
        for pid in usage.tree(p.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # a QEMU the guard killed first, a loop's sleep
                pass
        p.wait()
