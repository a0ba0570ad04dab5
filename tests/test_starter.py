"""The job starter with a VM: the in-process guest stands in for the VM.

The starter runs as a real subprocess (as pbs_mom would run it) so that exit
statuses, deaths by signal and signal forwarding are the real thing.
"""

import hashlib
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import termios
import threading
import time

import pytest

from vmwn import config, jobrun, relay, state, transfer, warden
from vmwn.torque.hooks import starter

from test_transfer_guestd import GuestServer
from vmwn_testlib import serve_warden

RUNNER = ("import sys; from vmwn import jobrun as j; from vmwn.torque.hooks import starter as s; "
          "j.LOST_AFTER = float(sys.argv[1]); j.PROBE_EVERY = float(sys.argv[2]); "
          "sys.exit(s.main(['starter'] + sys.argv[4:], config_path=sys.argv[3]))")


class Job:
    def __init__(self, tmp_path, relay_prog=None):
        self.tmp = tmp_path
        self.srv = GuestServer(str(tmp_path / "guest" / "home" / "guestuser"))
        self.host = tmp_path / "host" / "work"
        self.host.mkdir(parents=True)
        (self.host / "input.txt").write_text("staged input\n")
        self.gwork = tmp_path / "guest" / "work"
        self.conf = tmp_path / "vmwn.conf"
        # The relay the starter runs the job under: the C one (vmwn.relay) when it is
        # beside the launcher, else the starter's own (Python).
        libexec = tmp_path / "libexec"
        libexec.mkdir()
        if relay_prog:
            shutil.copy(relay_prog, libexec / relay.NAME)
        self.conf.write_text(f"[site]\nstate_dir = {tmp_path}/state\nsyslog = no\n"
                             f"pbs_home = {tmp_path}/torque\nstage_in_max = 1M\n"
                             f"emulator = {libexec}/qemu\n")
        self.cfg = config.load(str(self.conf))
        key = self.srv.write_user_key(str(tmp_path / "id_job"))
        self.job_id = "42.server.example.org"
        self.st = self.srv.job_state(self.job_id, key, str(self.gwork), str(self.host))
        state.save(self.cfg, self.st)
        self.warden = serve_warden(self.cfg, self.st)  # no libvirt: the in-process guest is the VM
        jobs = tmp_path / "torque" / "mom_priv" / "jobs"
        jobs.mkdir(parents=True)
        self.sc = jobs / f"{self.job_id}.SC"
        # What a job can put in its own environment (qsub -v): a configuration
        # whose state_dir has no record of this job.  The starter must ignore it.
        self.decoy = tmp_path / "decoy.conf"
        self.decoy.write_text(f"[site]\nstate_dir = {tmp_path}/decoy-state\nsyslog = no\n")
        self.env = {"PATH": "/usr/bin:/bin", "HOME": "/host/home/user", "USER": "user",
                    "LOGNAME": "user", "SHELL": "/bin/bash", "VMWN_CONFIG": str(self.decoy),
                    "PBS_JOBID": self.job_id, "PBS_O_WORKDIR": str(self.host),
                    "PBS_ENVIRONMENT": "PBS_BATCH", "PBS_QUEUE": "batch", "PBS_TASKNUM": "1",
                    "PYTHONPATH": os.pathsep.join(sys.path)}

    def script(self, text, mode=0o700):
        self.sc.write_text(text)
        os.chmod(self.sc, mode)
        return f"exec {self.sc}\n".encode()

    def start(self, stdin=b"", argv=("/bin/sh",), env=None, lost_after=120, probe=30,
              **kw):
        e = dict(self.env, **(env or {}))
        self.gwork.mkdir(parents=True, exist_ok=True)  # the starter's cwd, as with qsub -d
        if not self.warden.is_alive():  # a warden serves one job starter's life
            self.warden = serve_warden(self.cfg, self.st)  # no libvirt: the in-process guest is the VM
        p = subprocess.Popen([sys.executable, "-c", RUNNER, str(lost_after), str(probe),
                              str(self.conf), *argv], env=e, stdin=kw.pop("stdin_fd", subprocess.PIPE),
                             stdout=kw.pop("stdout", subprocess.PIPE),
                             stderr=kw.pop("stderr", subprocess.PIPE),
                             cwd=kw.pop("cwd", str(self.gwork)), **kw)
        if p.stdin:
            p.stdin.write(stdin)
            p.stdin.close()
            p.stdin = None
        return p

    def run(self, stdin=b"", timeout=60, **kw):
        p = self.start(stdin, **kw)
        out, err = p.communicate(timeout=timeout)
        return p.returncode, out, err


def job_commands(job):
    """The guest commands but the ones preparing the guest (transfer.PREPARE) and
    forwarding signals (jobrun.signaller_command)."""
    prefixes = (transfer.PREPARE.split("{", 1)[0],
                jobrun.signaller_command("/p").split("/p", 1)[0].split(" case ", 1)[0])
    return [c for c in job.srv.commands if not c.startswith(prefixes)]


@pytest.fixture(scope="module")
def c_relay(tmp_path_factory):
    if not relay.buildable():
        return None
    out = str(tmp_path_factory.mktemp("relay") / relay.NAME)
    relay.build(out)
    return out


@pytest.fixture(params=["python", "c"])
def job(request, tmp_path, c_relay):
    """A job for each relay: every test here holds for both."""
    if request.param == "c" and c_relay is None:
        pytest.skip("no libssh-dev to build the C relay")
    j = Job(tmp_path, c_relay if request.param == "c" else None)
    yield j
    j.srv.close()


def wait_for(stream, token, timeout=20):
    """Read from a pipe until ``token`` shows up; returns what was read."""
    buf, end = b"", time.monotonic() + timeout
    fd = stream.fileno()
    while token not in buf:
        left = end - time.monotonic()
        assert left > 0, f"{token!r} not seen; got {buf!r}"
        r, _, _ = select.select([fd], [], [], left)
        if r:
            chunk = os.read(fd, 65536)
            assert chunk, f"EOF before {token!r}; got {buf!r}"
            buf += chunk
    return buf


def test_batch_job_runs_in_guest_with_args_workdir_and_status(job):
    line = job.script("#!/bin/sh\necho \"args:$#:$1:$2\"\npwd\ncat input.txt\n"
                      "echo to-stderr >&2\nexit 7\n")
    line = line[:-1] + b" one 'two words'\n"
    rc, out, err = job.run(line)
    assert rc == 7, err
    assert out.decode().splitlines() == ["args:2:one:two words", str(job.gwork),
                                         "staged input"]
    assert err == b"to-stderr\n"
    # The script itself is not left in the working directory (nothing to harvest).
    assert sorted(os.listdir(job.gwork)) == ["input.txt"]


def test_script_text_on_stdin(job):
    rc, out, err = job.run(b"echo from text\nexit 3\n")
    assert (rc, out, err) == (3, b"from text\n", b"")


def test_shebang_of_the_script_is_honoured(job):
    line = job.script(f"#!{sys.executable}\nimport sys; print('python', sys.argv[1:])\n")
    rc, out, err = job.run(line[:-1] + b" x\n")
    assert (rc, out) == (0, b"python ['x']\n"), err


def test_malformed_arguments_are_one_line_error_and_run_nothing(job):
    line = job.script("#!/bin/sh\necho ran\n")
    rc, out, err = job.run(line[:-1] + b" 'unterminated\n")
    assert rc == 1
    assert err.count(b"\n") == 1 and err.startswith(b"vmwn: cannot parse the job's -F")
    assert b"Traceback" not in err and out == b""
    assert job.srv.commands == []


def test_the_job_environment_cannot_choose_the_configuration(job):
    # VMWN_CONFIG (set by the job, qsub -v) names a config without this job's
    # record: honouring it would run the job on the host, outside its VM.
    assert not config.load(str(job.decoy)).site["state_dir"].startswith(str(job.tmp / "state"))
    rc, out, err = job.run(b"pwd\n")
    assert (rc, out, err) == (0, f"{job.gwork}\n".encode(), b"")
    assert len(job_commands(job)) == 1


BIND_AND_EXEC = ("import os, subprocess, sys; "
                 "subprocess.run(['mount', '--bind', sys.argv[1], sys.argv[2]], check=True); "
                 "os.execv(sys.argv[3], sys.argv[3:])")


@pytest.mark.parametrize("where", ["default", "elsewhere"])
def test_installed_starter_uses_its_baked_configuration(job, tmp_path, where):
    """The starter as installed, at the default configuration path (in a private
    mount namespace, where a temporary directory covers /etc/vmwn) or another."""
    from vmwn.torque import install
    etc = tmp_path / "etc-vmwn"
    etc.mkdir()
    (etc / "vmwn.conf").write_text(job.conf.read_text())
    baked = config.DEFAULT_PATH if where == "default" else str(etc / "vmwn.conf")
    path = tmp_path / "job-starter"
    path.write_text(install.render_starter(sys.executable, baked,
                                           os.pathsep.join(p for p in sys.path if p),
                                           job.cfg.site["state_dir"], job.cfg.site["pbs_home"]))
    os.chmod(path, 0o755)
    argv = [str(path), "/bin/sh"]
    if where == "default":
        if not os.path.isdir(os.path.dirname(config.DEFAULT_PATH)) or os.geteuid() != 0:
            pytest.skip("needs root and an existing /etc/vmwn to cover")
        argv = ["unshare", "--mount", "--propagation", "private", "--", sys.executable,
                "-c", BIND_AND_EXEC, str(etc), os.path.dirname(config.DEFAULT_PATH)] + argv
    job.gwork.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(argv, input=b"pwd\n", env=job.env, capture_output=True, timeout=60,
                       cwd=str(job.gwork))
    assert (p.returncode, p.stdout, p.stderr) == (0, f"{job.gwork}\n".encode(), b"")
    assert len(job_commands(job)) == 1


def mom_jobs(job):
    return job.tmp / "torque" / "mom_priv" / "jobs"


@pytest.mark.parametrize("line", [
    "exec /bin/echo hi",                       # absolute, but not a mom script
    "/bin/echo hi",
    "exec {tmp}/elsewhere/1.srv.SC",          # .SC outside <pbs_home>/mom_priv/jobs
    "exec {jobs}/missing.SC",                 # not an existing file
    "exec {jobs}/1.srv.JB",                   # existing, but not .SC
    "exec {jobs}/dir.SC",                     # not a regular file
    "exec {jobs}/link.SC",                    # a symlink to a script elsewhere
    "exec {jobs}/../jobs/2.srv.SC",           # not the path the mom builds
])
def test_only_a_mom_script_path_counts_as_one(job, line):
    jobs = mom_jobs(job)
    (job.tmp / "elsewhere").mkdir()
    (job.tmp / "elsewhere" / "1.srv.SC").write_text("#!/bin/sh\necho wrong\n")
    (jobs / "1.srv.JB").write_text("<job/>")
    (jobs / "dir.SC").mkdir()
    (jobs / "2.srv.SC").write_text("#!/bin/sh\necho wrong\n")
    os.symlink(job.tmp / "elsewhere" / "1.srv.SC", jobs / "link.SC")
    data = line.format(tmp=job.tmp, jobs=jobs).encode() + b"\n"
    assert starter.read_job_script(job.cfg.site["pbs_home"], data) == (data, [], "text")


def test_a_mom_script_path_is_read_with_its_arguments(job):
    line = job.script("#!/bin/sh\necho from-file\n")
    for prefix, how in ((b"", "run"), (b"exec ", "exec")):
        data = prefix + line[len(b"exec "):-1] + b" a 'b c'\n"
        assert starter.read_job_script(job.cfg.site["pbs_home"], data) == \
            (b"#!/bin/sh\necho from-file\n", ["a", "b c"], how)


def test_one_line_script_naming_an_absolute_program_runs_as_script(job):
    # Read as a script path, /bin/sh itself would be copied and run as the job's script.
    rc, out, err = job.run(b"exec /bin/sh -c 'echo \"$0\"'\n")
    assert (rc, out, err) == (0, b"/bin/sh\n", b"")


def test_stage_in_over_cap_fails_before_running(job):
    (job.host / "big").write_bytes(b"x" * (2 << 20))
    rc, out, err = job.run(job.script("#!/bin/sh\necho ran\n"))
    assert rc == 1 and out == b""
    assert b"stage_in_max" in err and err.count(b"\n") == 1
    assert job.srv.commands == []


def test_environment_is_the_jobs_with_guest_identity(job, tmp_path):
    hostile = "$(touch /tmp/vmwn-pwned) `id` \"dq\" 'sq' ; & | \\ \n second line *"
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("node1\nnode1\n")
    gtmp = tmp_path / "guest-tmp"
    gtmp.mkdir()
    line = job.script("#!/bin/sh\nprintf '%s\\037' \"$HOSTILE\" \"$HOME\" \"$USER\" \"$PBS_QUEUE\" "
                      "\"$PATH\" \"${TMPDIR-unset}\" \"${BAD_NAME-unset}\"\n"
                      "cat \"$PBS_NODEFILE\"\nenv | grep -c '^VMWN_CONFIG=' || true\n")
    rc, out, err = job.run(line, env={"HOSTILE": hostile, "PBS_NODEFILE": str(nodefile),
                                      "TMPDIR": "/nonexistent-tmp", "BAD-NAME": "x"})
    assert rc == 0, err
    fields = out.decode().split("\x1f")
    assert fields[:6] == [hostile, job.srv.guest_home, "guestuser", "batch", "/usr/bin:/bin",
                          "unset"]
    assert fields[6].startswith("unset")
    assert fields[7] == "node1\nnode1\n0\n"
    assert not os.path.exists("/tmp/vmwn-pwned")
    # TMPDIR survives when the guest has it.
    rc, out, _ = job.run(job.script('#!/bin/sh\necho "$TMPDIR"\n'), env={"TMPDIR": str(gtmp)})
    assert out.decode().strip() == str(gtmp), (out, _, job.srv.commands[-1][-300:])


def test_missing_shell_falls_back_with_a_note(job):
    rc, out, err = job.run(b"echo hi\n", argv=("/bin/no-such-shell",))
    assert (rc, out) == (0, b"hi\n")
    assert err == b"vmwn: /bin/no-such-shell does not exist in environment tiny; using /bin/sh\n"


def test_tm_task_runs_argv_quoted_without_stage_in(job):
    job.gwork.mkdir(exist_ok=True)
    rc, out, err = job.run(b"", argv=("echo", "task", "$HOME", "a b"),
                           env={"PBS_TASKNUM": "3"})
    assert (rc, out) == (0, b"task $HOME a b\n"), err
    assert os.listdir(job.gwork) == []


def test_binary_output_is_relayed_byte_exact_and_separately(job, tmp_path):
    blob = os.urandom(8 << 20) + bytes(range(256)) + b"\r\n\n\r"
    (tmp_path / "blob").write_bytes(blob)
    line = job.script(f"#!/bin/sh\ncat {tmp_path}/blob\nprintf 'e\\r\\n\\0' >&2\n")
    rc, out, err = job.run(line)
    assert rc == 0
    assert hashlib.sha256(out).hexdigest() == hashlib.sha256(blob).hexdigest()
    assert err == b"e\r\n\0"


def test_output_is_streamed_as_produced(job, tmp_path):
    # The job cannot finish before the gate exists, and the gate is created only
    # once "first" has arrived: buffered output would never arrive (wait_for fails).
    gate = tmp_path / "gate"
    p = job.start(job.script(f"#!/bin/sh\necho first\n"
                             f"while [ ! -e {gate} ]; do sleep 0.05; done\necho second\n"))
    got = wait_for(p.stdout, b"first\n")
    assert got == b"first\n" and p.poll() is None
    gate.touch()
    assert p.stdout.read() == b"second\n"
    assert p.wait(30) == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGSEGV])
def test_death_by_signal_is_reproduced(job, sig):
    rc, out, err = job.run(job.script(f"#!/bin/sh\nkill -s {sig.name[3:]} $$\necho alive\n"))
    assert rc == -sig, err
    assert out == b""


def test_exit_status_above_128_is_not_a_signal(job):
    rc, out, err = job.run(b"exit 143\n")
    assert rc == 143


def test_usr1_is_forwarded_and_job_continues(job):
    p = job.start(job.script("#!/bin/sh\ntrap 'echo got-usr1; got=1' USR1\necho ready\n"
                             "i=0; while [ -z \"$got\" ] && [ $i -lt 300 ]; do sleep 0.1; "
                             "i=$((i+1)); done\necho done\n"))
    wait_for(p.stdout, b"ready\n")
    p.send_signal(signal.SIGUSR1)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert out == b"got-usr1\ndone\n"


def test_each_of_signals_sent_one_after_another_reaches_the_guest_job(job):
    """Signals relayed one after another over the one signal channel: none is lost
    between two, whatever the order (the job waits for all three)."""
    p = job.start(job.script(
        "#!/bin/sh\ntrap 'echo got-USR1; n=$((n+1))' USR1\n"
        "trap 'echo got-USR2; n=$((n+1))' USR2\ntrap 'echo got-HUP; n=$((n+1))' HUP\n"
        "n=0; echo ready\n"
        "i=0; while [ $n -lt 3 ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done\n"
        "echo done\n"))
    seen = wait_for(p.stdout, b"ready\n")
    for sig in (signal.SIGUSR2, signal.SIGHUP, signal.SIGUSR1):
        p.send_signal(sig)
        # The next once this one has run its trap: natively, two signals pending at
        # once run their traps in the shell's order, not in the order sent.
        seen += wait_for(p.stdout, f"got-{sig.name[3:]}\n".encode(), timeout=60)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert (seen + out).decode().split() == ["ready", "got-USR2", "got-HUP", "got-USR1", "done"]


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGQUIT])
def test_hup_and_quit_are_forwarded_and_job_continues(job, sig):
    name = sig.name[3:]
    # The job goes on until its trap has run (or 30 s): a signal the relay lost
    # shows as a missing line, however slow the machine.
    p = job.start(job.script(f"#!/bin/sh\ntrap 'echo got-{name}; got=1' {name}\necho ready\n"
                             "i=0; while [ -z \"$got\" ] && [ $i -lt 300 ]; do sleep 0.1; "
                             "i=$((i+1)); done\necho done\n"))
    wait_for(p.stdout, b"ready\n")
    p.send_signal(sig)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert out == f"got-{name}\ndone\n".encode()


def test_untrapped_hup_ends_the_job_and_the_starter_by_hup(job):
    p = job.start(job.script("#!/bin/sh\necho ready\nsleep 30\necho not-reached\n"))
    wait_for(p.stdout, b"ready\n")
    p.send_signal(signal.SIGHUP)
    out, err = p.communicate(timeout=30)
    assert p.returncode == -signal.SIGHUP, err
    assert out == b""


def test_sigterm_reaches_the_whole_guest_process_group(job, tmp_path):
    pidf = tmp_path / "bg.pid"
    p = job.start(job.script(f"#!/bin/sh\nsleep 60 &\necho $! > {pidf}\necho ready\nwait\n"))
    wait_for(p.stdout, b"ready\n")
    bg = int(pidf.read_text())
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=20)
    assert p.returncode == -signal.SIGTERM
    for _ in range(50):
        if not os.path.exists(f"/proc/{bg}") or \
                open(f"/proc/{bg}/stat").read().split()[2] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail("the job's background process survived SIGTERM")


def test_lost_guest_gives_253_and_a_clear_message(job):
    p = job.start(job.script("#!/bin/sh\necho ready\nsleep 30\n"))
    wait_for(p.stdout, b"ready\n")
    job.srv.proxy.drop()
    out, err = p.communicate(timeout=20)
    assert p.returncode == 253
    assert err.startswith(b"vmwn: the job's virtual machine was lost: ")
    assert err.count(b"\n") == 1


def test_hung_guest_is_declared_lost(job):
    p = job.start(job.script("#!/bin/sh\necho ready\nsleep 30\n"), lost_after=2, probe=0.5)
    wait_for(p.stdout, b"ready\n")
    job.srv.proxy.frozen.set()
    out, err = p.communicate(timeout=20)
    assert p.returncode == 253
    assert b"no answer from the guest" in err


def test_interactive_job_gets_a_pty_and_the_tty_is_restored(job):
    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    # Typed ahead while the job starts: must not be lost when the tty goes raw.
    p = job.start(b"", stdin_fd=slave, stdout=slave, stderr=slave,
                  env={"PBS_ENVIRONMENT": "PBS_INTERACTIVE", "TERM": "xterm-test"})
    os.close(slave)
    os.write(master, b"echo \"tty:$TERM:$((6*7))\"; [ -t 0 ] && echo is-a-tty; exit 3\n")
    buf = b""
    end = time.monotonic() + 20
    while p.poll() is None and time.monotonic() < end:
        r, _, _ = select.select([master], [], [], 0.2)
        if r:
            try:
                buf += os.read(master, 4096)
            except OSError:
                break
    p.wait(10)
    assert p.returncode == 3, buf
    assert b"tty:xterm-test:42" in buf and b"is-a-tty" in buf
    assert ".vmwn/job.env" in job_commands(job)[0]  # TERM went there
    assert termios.tcgetattr(master) == before  # raw mode was undone
    os.close(master)


def test_the_guest_job_gets_the_jobs_umask(job):
    # pbs_mom gives the job (and so the starter) its umask: 077 unless configured.
    rc, out, err = job.run(b"umask\n", preexec_fn=lambda: os.umask(0o027))
    assert (rc, out.strip(), err) == (0, b"0027", b"")


def test_a_shebang_script_needs_no_note_about_a_missing_shell(job):
    rc, out, err = job.run(job.script("#!/bin/sh\necho hi\n"), argv=("/bin/no-such-shell",))
    assert (rc, out, err) == (0, b"hi\n", b"")


def test_an_environment_over_128_kib_reaches_the_guest_job(job):
    # One SSH command line is limited to 128 KiB (MAX_ARG_STRLEN, per string); a
    # native job's environment only per variable and by execve's total, so four
    # variables of 100 KiB run natively.  In the guest they travel in a file.
    big = "v" * (100 << 10)
    env = {f"BIG{i}": big for i in range(4)}
    rc, out, err = job.run(b'echo "${#BIG0} ${#BIG3}"\n', env=env)
    assert (rc, out, err) == (0, f"{len(big)} {len(big)}\n".encode(), b"")
    assert all(len(c) < 8192 for c in job_commands(job))


def test_unmounted_reads_proc_mounts_as_the_kernel_escapes_it():
    text = ("vmwn0 /home/alice virtiofs rw,relatime 0 0\n"
            "vmwn1 /scratch/a\\040b virtiofs rw 0 0\n"
            "/dev/vda /home ext4 rw 0 0\n")
    assert jobrun.unmounted(text, ["/home/alice", "/scratch/a b"]) == []
    assert jobrun.unmounted(text, ["/home", "/data"]) == ["/home", "/data"]


def test_a_guest_that_did_not_mount_the_share_never_runs_the_job(job):
    # The in-process guest mounts nothing: as a guest whose kernel lacks virtio-fs.
    job.st.data, job.st.shares = "mounted", [{"path": str(job.gwork), "tag": "vmwn0"}]
    state.save(job.cfg, job.st)
    job.warden = serve_warden(job.cfg, job.st)
    rc, out, err = job.run(b"echo ran > ran.txt\n")
    assert rc == 2 and out == b"", (rc, out, err)
    assert b"did not mount " + str(job.gwork).encode() in err and b"data = copy" in err
    assert job_commands(job) == []
    assert not (job.gwork / "ran.txt").exists()


def test_a_guest_with_another_host_key_is_refused_and_nothing_runs(job):
    """The forward's server must present the job's own host key (pinned, never trusted
    on first use): a process squatting on the port is refused before the job's key is
    offered or anything runs, whichever relay carries the session."""
    from vmwn import keys
    job.st.host_key_public = keys.generate("host").public_line  # the guest's is another
    state.save(job.cfg, job.st)
    job.warden = serve_warden(job.cfg, job.st)
    code, out, err = job.run(job.script("#!/bin/sh\necho ran\n"))
    assert code != 0 and out == b""
    assert b"host key that is not" in err and err.count(b"\n") == 1, err
    assert job_commands(job) == []


def test_a_relay_killed_under_the_job_ends_it_as_lost(job):
    """The C relay killed (the OOM killer, an operator): the starter says the guest was
    lost, with why, never hangs or reports a made-up status."""
    if not relay.usable(job.cfg):
        pytest.skip("the Python relay runs in the starter itself")
    p = job.start(job.script("#!/bin/sh\necho ready\nsleep 30\n"))
    wait_for(p.stdout, b"ready\n")
    kids = [int(c) for c in open(f"/proc/{p.pid}/task/{p.pid}/children").read().split()]
    relays = [k for k in kids if os.path.basename(os.readlink(f"/proc/{k}/exe")) == relay.NAME]
    assert len(relays) == 1
    os.kill(relays[0], signal.SIGKILL)
    out, err = p.communicate(timeout=20)
    assert p.returncode == 253
    assert b"relay to its guest was killed by SIGKILL" in err and err.count(b"\n") == 1, err


def test_the_relay_feeds_a_command_more_input_than_its_window_holds(job):
    """Input beyond the channel's window waits in the relay (it never blocks on a full
    window, where signals would wait too) and all of it arrives, in order."""
    if not relay.usable(job.cfg):
        pytest.skip("the Python relay runs in the starter itself")
    import socket as socketmod
    data = os.urandom(1 << 20) * 5  # 5 MiB: more than an SSH window (2 MiB)
    s = relay.Session.start(
        relay.usable(job.cfg), lambda timeout: socketmod.create_connection(
            (job.st.bind_address, job.st.port), timeout=timeout), job.st, [])
    try:
        status, out, err = s.run("sha256sum", stdin=data, timeout=120)
    finally:
        s.close()
    assert (status, err) == (0, b"")
    assert out.split()[0].decode() == hashlib.sha256(data).hexdigest()
