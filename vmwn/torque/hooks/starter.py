"""pbs_mom's ``$job_starter``: run the job in its VM, or exactly as the mom would have.

argv is ``[starter, shell]`` (batch), ``[starter, shell, -c, cmd]`` (``qsub -I
-x``) or ``[starter, task_argv...]`` (TM tasks); it runs as the job user.  A job
without a VM (no state record) is exec'd at once, stdin untouched; that path
imports nothing but the configuration and state modules.  A VM job's script
is read from stdin, PBS_O_WORKDIR is staged into the guest, and the script
runs there over SSH with the job's environment; output is relayed as it comes,
signals are forwarded to the guest job's process group, and the starter ends
the way the guest job ended (same exit status, or death by the same signal).

Signals go through a second exec channel running ``kill -s SIG -- -PGID`` (the
PGID the job's shell recorded in ~/.vmwn), once per burst: pbs_mom repeats a
signal within milliseconds, a native job sees it once.  ``qsig -s suspend``
(SIGTSTP) and ``resume`` (SIGCONT) pause and resume the whole VM through the
job's warden.  The SSH "signal" channel request
is not sent as well: OpenSSH may or may not honour it, and a signal delivered
twice would run a job's USR1 handler twice.
"""

import os
import re
import sys

_STDIN_MAX = 64 << 20
# Every signal whose default action would end the starter without reaching the
# guest and that a job can be sent (qdel, qsig -s, a hangup on an interactive
# job's pty).  SIGKILL and SIGSTOP cannot be caught: guest teardown after a
# SIGKILL belongs to the epilogue.
_FORWARDED = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
# Variables the guest must provide itself; everything else of the job's
# environment is passed on.
_HOST_ONLY = frozenset(("HOME", "USER", "LOGNAME", "SHELL", "PWD", "OLDPWD", "SHLVL", "_",
                        "TMPDIR", "MAIL", "SSH_AUTH_SOCK", "SSH_CLIENT", "SSH_CONNECTION",
                        "SSH_TTY", "XDG_RUNTIME_DIR", "XDG_SESSION_ID", "VMWN_CONFIG"))
# A wait for the guest this long is told on the job's stderr (walltime includes it).
WAIT_NOTE_AFTER = 1.0
# The same signal again within this many seconds is one delivery (see Relay._fresh).
REPEAT_WINDOW = 0.5
# No answer to a keepalive for this long means the guest is gone.
LOST_AFTER = 120.0
PROBE_EVERY = 30.0
# Output still arriving this long after the job shell's exit status is dropped.
_LINGER = 2.0


def main(argv=None, config_path=None, state_dir=None, pbs_home=None):
    """Entry point; returns the job's exit status (or dies of the job's signal).

    ``config_path``, ``state_dir`` and ``pbs_home`` are baked in at install
    time (None: from the configuration).  The environment is the job's own
    (``qsub -v``), so it never chooses them: a job could otherwise name a state_dir without its record
    and run on the host instead of in its VM.  Whether the job has a VM is
    told by its directory in the state directory alone, so a job without one
    runs natively even when vmwn.conf is missing or broken.
    """
    argv = list(sys.argv if argv is None else argv)
    rest = argv[1:]
    cfg = None
    try:
        if not rest:
            from ...errors import SiteError
            raise SiteError("the job starter was called without the job's shell or command",
                            "set $job_starter in mom_priv/config to this program only")
        job_id = os.environ.get("PBS_JOBID")
        if job_id:
            from ... import state
            if state_dir is None:
                from ... import config
                cfg = config.load(config_path or config.DEFAULT_PATH)
                state_dir = cfg.site["state_dir"]
            refusal = state.read_refusal(state_dir, job_id)
            if refusal is not None:
                from ...warden import answer_error
                raise answer_error(refusal)
            sock = state.warden_socket(state_dir, job_id)
            if os.path.exists(sock):
                if cfg is None:
                    from ... import config
                    cfg = config.load(config_path or config.DEFAULT_PATH)
                return _run_vm(cfg, job_id, rest, sock, pbs_home or cfg.site["pbs_home"])
            wanted = os.environ.get("VMWN_ENV", "").strip()
            if wanted:
                from ...errors import UserError
                raise UserError(f"the job asks for environment {wanted!r} in VMWN_ENV, but "
                                "this node's prologue did not see that request, so the job "
                                "was not run", f"submit with -l other=vmwn={wanted} (or ask "
                                "the site to install vmwn's submit filter)")
        return _exec_native(rest)
    except BaseException as exc:  # noqa: BLE001 - nothing may reach the user's .e file raw
        return _fail(exc, cfg)


# What pbs_mom writes and returns itself when it cannot exec a job's shell
# (TMomFinalizeChild, Torque 6.1 src/resmom/start_exec.c): a job without a VM
# fails exactly as on a node without vmwn.
NATIVE_EXEC_FAILED = 254


def _exec_native(rest):
    """Replace this process by the job, as the mom would have started it."""
    try:
        os.execvp(rest[0], rest)
    except OSError:
        line = b"PBS: exec of shell '%s' failed\n" % os.fsencode(rest[0])[:256]
        try:
            os.write(2, line)
        except OSError:
            pass
        return NATIVE_EXEC_FAILED


def _fail(exc, cfg):
    """Report ``exc`` in one line on stderr and in syslog; return the starter's status."""
    import logging
    from ...errors import GuestLost, VmwnError, exit_code
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else 1
    if isinstance(exc, KeyboardInterrupt):
        _die_of(2)
    from . import setup_logging
    log = logging.getLogger(__name__)
    setup_logging(cfg)
    if isinstance(exc, GuestLost):
        line = f"vmwn: the job's virtual machine was lost: {exc.line()}"
        log.error("job %s: %s", os.environ.get("PBS_JOBID"), exc.line())
    elif isinstance(exc, VmwnError):
        line = f"vmwn: {exc.line()}"
        log.error("job %s: %s", os.environ.get("PBS_JOBID"), exc.line())
    else:
        line = (f"vmwn: internal error in the job starter ({type(exc).__name__}); "
                "the node's syslog has the details")
        log.error("job %s: starter failed", os.environ.get("PBS_JOBID"), exc_info=exc)
    try:
        os.write(2, (line + "\n").encode("utf-8", "replace"))
    except OSError:
        pass
    return exit_code("starter", exc)


def _die_of(signum):
    """End this process by ``signum`` so pbs_mom records 256+signum, like a native job."""
    import resource
    import signal
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError):
        pass
    if signum not in (signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU):
        if signum != signal.SIGKILL:
            signal.signal(signum, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
        os.kill(os.getpid(), signum)
    # Signals whose default action is not to terminate: the shell convention.
    os._exit(128 + signum)


# ------------------------------------------------------------------ the VM path

def read_job_script(pbs_home, data):
    """Interpret the job starter's stdin.  Returns (script bytes, args, how).

    ``how`` is "exec" (the mom's ``exec PATH args`` line), "run" (a ``PATH
    args`` line) or "text" (stdin is the script itself).  Only what pbs_mom
    sends counts as a script path: one line naming an existing regular file
    ``<pbs_home>/mom_priv/jobs/*.SC``; any other input, ``exec /bin/x`` included,
    is script text.  The -F arguments are split with shell quoting rules (no
    expansion) exactly once.
    """
    import shlex
    import stat
    from .. import pbs
    from ...errors import UserError
    line = data[:-1] if data.endswith(b"\n") else data
    if b"\n" not in line and b"\0" not in line:
        text = line.decode("utf-8", "surrogateescape").strip()
        how = "run"
        if text.startswith("exec "):
            how, text = "exec", text[5:].lstrip()
        path, _, argtext = text.partition(" ")
        if pbs.is_job_script(pbs_home, path):
            try:
                args = shlex.split(argtext)
            except ValueError as e:
                raise UserError(f"cannot parse the job's -F arguments {argtext!r}: {e}",
                                "fix the quoting of qsub -F") from None
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
                with os.fdopen(fd, "rb") as f:
                    if not stat.S_ISREG(os.fstat(fd).st_mode):
                        raise UserError(f"the job script {path} named on the starter's stdin "
                                        "is not a regular file", "check the mom's job_starter")
                    script = f.read(_STDIN_MAX + 1)
            except OSError as e:
                raise UserError(f"cannot read the job script {path} named on the starter's "
                                f"stdin: {e.strerror}", "check the mom's job_starter and "
                                "the script's owner") from None
            if len(script) > _STDIN_MAX:
                raise UserError(f"the job script {path} is larger than 64 MiB",
                                "keep data out of the job script")
            return script, args, how
    if b"\0" in data:
        raise UserError("the job starter's stdin is neither a script path nor script text "
                        "(it holds NUL bytes)", "check the mom's job_starter setting")
    return data, [], "text"


def guest_env(environ, guest_has_tmpdir=False):
    """The job's environment as the guest should see it: list of (name, value)."""
    import re
    ok = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
    out = []
    for k, v in sorted(environ.items()):
        if not ok.match(k) or "\0" in v:
            continue
        if k in _HOST_ONLY and not (k == "TMPDIR" and guest_has_tmpdir):
            continue
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            continue
        out.append((k, v))
    return out


def env_script(env_items):
    """(file text, items left for the command line): the job's variables as
    ``export NAME='value'`` lines a shell sources, so their size is limited
    only where the native job's is (execve), not by one SSH command line.
    Names a shell cannot export stay on the command line (they are rare)."""
    import re
    from shlex import quote
    ident = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
    lines, rest = [], []
    for k, v in env_items:
        if ident.match(k):
            lines.append(f"export {k}={quote(v)}\n")
        else:
            rest.append((k, v))
    return "".join(lines).encode("utf-8"), rest


def build_command(pidfile, start_dir, env_items, argv, umask=None, env_file=None):
    """The one guest command line; every job-supplied string goes through shlex.quote.

    The guest user's shell records its PID (sshd made it a session and
    process-group leader) and execs the job, so that PID is the job's
    process group for signal forwarding.  The job starts in ``start_dir``
    (None: the guest user's home), where a native job would start: the home
    directory, or qsub -d's directory; one the guest lacks is reported and
    the home directory used instead.  With ``env_file`` (see :func:`env_script`)
    a shell sources it between ``env -i`` and the job.
    """
    from shlex import quote
    guest_own = ('HOME="$HOME" USER="$USER" LOGNAME="$LOGNAME" SHELL="$SHELL"')
    if start_dir is None:
        cd = 'cd "$HOME"'
    else:
        d = quote(start_dir)
        cd = (f"{{ cd -- {d} 2>/dev/null || {{ echo \"vmwn: {_sh_text(start_dir)} does not "
              f"exist in the virtual machine; starting in $HOME\" >&2; cd \"$HOME\"; }}; }}")
    parts = [f"echo $$ > {quote(pidfile)}", cd]
    if umask is not None:  # the job's umask, as pbs_mom set it for the native job
        parts.append(f"umask {int(umask) & 0o777:03o}")
    source = (" /bin/sh -c " + quote('. "$0" && exec "$@"') + " " + quote(env_file)
              if env_file else "")
    parts += [
             "exec env -i " + guest_own + "".join(" " + quote(f"{k}={v}") for k, v in env_items)
             + source + "".join(" " + quote(a) for a in argv)]
    return " && ".join(parts)


def current_umask():
    m = os.umask(0)
    os.umask(m)
    return m


def _sh_text(text):
    """``text`` safe inside a double-quoted shell string (only printable, no $`"\\)."""
    return "".join(c if c.isprintable() and c not in '$`"\\' else "?" for c in text)[:200]


def start_dir(environ):
    """Where the native job would have started: pbs_mom made it the starter's cwd.

    None means the user's home directory (the guest's own $HOME then).
    """
    try:
        cwd = os.getcwd()
    except OSError:
        return None
    home = environ.get("HOME") or ""
    if not home or os.path.normpath(cwd) == os.path.normpath(home):
        return None
    return cwd


def job_argv(shell, how, script_path, args):
    """How the guest runs the script, mirroring what the mom's shell does with stdin."""
    if how == "text":
        return [shell, script_path] + list(args)
    body = 'exec "$0" "$@"' if how == "exec" else '"$0" "$@"'
    return [shell, "-c", body, script_path] + list(args)


def _mode(rest, environ):
    if environ.get("PBS_ENVIRONMENT") == "PBS_INTERACTIVE" or os.isatty(0):
        return "interactive"
    if environ.get("PBS_TASKNUM", "1") not in ("", "1"):
        return "task"
    if len(rest) == 3 and rest[1] == "-c":
        return "command"
    return "batch"


def _read_stdin():
    from ...errors import UserError
    buf = bytearray()
    while len(buf) <= _STDIN_MAX:
        chunk = os.read(0, 1 << 16)
        if not chunk:
            return bytes(buf)
        buf += chunk
    raise UserError("the job script on the starter's stdin is larger than 64 MiB",
                    "keep data out of the job script")


def _await_guest(sock_path, mode):
    """Wait for the job's warden: (connection record, warden socket) or its error.

    The wait is the guest's boot; pbs_mom counts it as walltime (the job has
    started), and the first line on stderr says how long it took.
    """
    import time
    import types
    from ... import warden
    import signal
    t0 = time.monotonic()

    def ended(signum, frame):  # qdel while the guest boots: say so, end as a native job
        _say(f"the job was ended by {signal.Signals(signum).name} while its virtual "
             "machine was starting")
        _die_of(signum)
    old = {s: signal.signal(s, ended) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        answer, wsock = warden.wait_answer(sock_path)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if not answer.get("ready"):
        wsock.close()
        raise warden.answer_error(answer)
    waited = time.monotonic() - t0
    if mode != "task" and waited >= WAIT_NOTE_AFTER:
        _say(f"the job waited {waited:.1f} s for its virtual machine "
             f"({answer['record']['env']}); walltime counts from before that wait")
    return types.SimpleNamespace(**answer["record"]), wsock


def _run_vm(cfg, job_id, rest, sock_path, pbs_home):
    import posixpath
    import paramiko
    from ... import guestfiles, logsetup, ssh, transfer
    from ...config import parse_bytes
    from . import setup_logging
    setup_logging(cfg)
    log = logsetup.job_logger(__name__, job_id)
    mom = os.getppid()
    environ = dict(os.environ)
    mode = _mode(rest, environ)
    script = args = how = None
    if mode == "batch":
        script, args, how = read_job_script(pbs_home, _read_stdin())
    st, wsock = _await_guest(sock_path, mode)
    if mode != "task":
        _adopt(job_id, st, log)
    log.info("starting %s in guest %s as %s", mode, st.domain, st.user)
    guest = ssh.Guest.connect(st)
    try:
        guest.capture_exit_signals()
        ctl = getattr(st, "control_dir", "") or guestfiles.control_dir(st.user, False)
        tag = guestfiles.JOB if mode != "task" else \
            guestfiles.task_tag(_safe(environ.get("PBS_TASKNUM", "0")))
        files = []
        nodefile = environ.get("PBS_NODEFILE")
        if nodefile and mode != "task":
            try:
                with open(nodefile, "rb") as f:
                    files.append((guestfiles.NODEFILE, f.read(1 << 20), 0o600))
            except OSError as e:
                log.warning("cannot copy PBS_NODEFILE %s: %s", nodefile, e.strerror)
        if nodefile:
            environ["PBS_NODEFILE"] = posixpath.join(ctl, guestfiles.NODEFILE)
        if mode == "batch":
            script_path = posixpath.join(ctl, guestfiles.JOB_SCRIPT)
            files.append((guestfiles.JOB_SCRIPT, script, 0o700))
        # $TMPDIR is the host's: it goes to the job only if the guest has it too, on
        # the command line (known after the guest answered), never in the file.
        tmpdir = environ.get("TMPDIR")
        env_text, env_rest = env_script(guest_env(environ))
        env_file = guestfiles.envfile(ctl, tag)
        files.append((posixpath.basename(env_file), env_text, 0o600))
        copy = mode != "task" and getattr(st, "data", "copy") == "copy"
        shares = [s["path"] for s in getattr(st, "shares", None) or ()]
        try:
            prep = transfer.prepare(
                guest, ctl, files, workdir=st.workdir if copy else None,
                host_dir=(environ.get("PBS_O_WORKDIR") or st.host_workdir) if copy else None,
                max_bytes=parse_bytes(cfg.site["stage_in_max"]),
                # copy mode: the control directory is the guest home's .vmwn
                home=posixpath.dirname(ctl), shell=rest[0], tmpdir=tmpdir,
                mounts=bool(shares), umask=current_umask())
        except (EOFError, paramiko.SSHException) as e:
            from ...errors import GuestLost
            raise GuestLost(f"preparing the job in the guest failed: "
                            f"{' '.join(str(e).split()) or type(e).__name__}",
                            "the virtual machine may be out of disk space") from None
        if shares:
            _check_mounts(prep.proc_mounts, shares, st.env)
        for item in (prep.staged.skipped if prep.staged else [])[:20]:
            _say(f"not copied into the virtual machine: {item}")
        shell = rest[0]
        if mode != "task" and not prep.has_shell:
            fallback = cfg.environments[st.env].ssh_user_shell if st.env in \
                cfg.environments else "/bin/sh"
            if mode != "batch" or not script.startswith(b"#!"):  # else its #! decides
                _say(f"{shell} does not exist in environment {st.env}; using {fallback}")
            shell = fallback
        if tmpdir and prep.has_tmpdir:
            env_rest.append(("TMPDIR", tmpdir))
        if mode == "batch":
            argv = job_argv(shell, how, script_path, args)
        elif mode == "task":
            argv = rest
        else:
            argv = [shell] + rest[1:]
        pidfile = guestfiles.pidfile(ctl, tag)
        command = build_command(pidfile, start_dir(environ), env_rest, argv, env_file=env_file,
                                umask=current_umask())
        interactive = mode == "interactive"
        term = environ.get("TERM") or "vt100"
        size = _tty_size() if interactive else (80, 24)
        chan = guest.exec(command, pty=interactive, term=term, size=size)
        outcome = Relay(guest, chan, pidfile, interactive=interactive, warden=wsock).run()
    finally:
        guest.close()
        wsock.close()
    kind, value = outcome
    log.info("guest job ended: %s %s", kind, value)
    if mode != "task":
        _report_usage(st, log)
    if os.getppid() != mom and mode != "task":
        # pbs_mom restarted while the job ran: the new mom re-adopts the job by its
        # session and records exit status 0 when that session ends (measured).
        what = f"signal {value}" if kind == "signal" else f"exit status {value}"
        _say(f"the job ended with {what}; pbs_mom restarted while it ran and may "
             "record another exit status")
        # The new mom also re-adopted the VM's anchor session and would wait for it
        # for ever; the old one would have ended it with the job.
        _release_anchor(st, log)
    if kind == "signal":
        sys.stdout.flush()
        _die_of(value)
    return value


def _adopt(job_id, st, log):
    """Have pbs_mom count the VM as the job's: it then charges QEMU's CPU time and
    memory to the job and checks cput and vmem on it (vmwn.emulator says how).  A
    failure is the site's to fix and does not stop the job."""
    from ... import emulator, usage
    from .. import pbs
    launcher = _launcher_of(st)
    anchor = emulator.anchor_of(launcher, usage.children) if launcher else 0
    if not anchor:
        log.error("the VM's processes are unknown or gone (launcher %s); pbs_mom will "
                  "not charge the VM to the job", getattr(st, "vm_pid", 0))
        return
    try:
        pbs.adopt(job_id, anchor)
    except pbs.AdoptFailed as e:
        log.error("%s", e.line())
        return
    used = usage.of_vm(launcher)
    log.info("pbs_mom adopted the VM's session %d (%.1f s of CPU so far, its boot)", anchor,
             used.cpu_seconds if used else 0.0)


def _release_anchor(st, log):
    import signal
    from ... import emulator, usage
    launcher = _launcher_of(st)
    if not launcher:
        return
    anchor = emulator.anchor_of(launcher, usage.children)
    if anchor:
        try:
            os.kill(anchor, signal.SIGTERM)
        except ProcessLookupError:
            return
        log.info("ended the VM's anchor %d: pbs_mom restarted during the job", anchor)


def _launcher_of(st):
    """The VM's launcher pid (vmwn.emulator) while it is still that process, else 0."""
    from ... import usage
    pid = getattr(st, "vm_pid", 0)
    return pid if pid and usage.start_time(pid) == getattr(st, "vm_start", 0) else 0


def _report_usage(st, log):
    from ... import usage
    pid = _launcher_of(st)
    if not pid:
        return
    used = usage.of_vm(pid)
    if used is not None:
        log.info("%s", used.line())
        _say(used.line())


def _safe(text):
    return "".join(c for c in text if c.isalnum())[:20] or "0"


def _say(msg):
    try:
        os.write(2, f"vmwn: {msg}\n".encode("utf-8", "replace"))
    except OSError:
        pass


def unmounted(proc_mounts, paths):
    """The ``paths`` that /proc/mounts (its text) does not show as virtio-fs mounts."""
    mounted = set()
    for line in proc_mounts.splitlines():
        f = line.split(" ")
        if len(f) >= 3 and f[2] == "virtiofs":
            mounted.add(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), f[1]))
    return [p for p in paths if p not in mounted]


def _check_mounts(proc_mounts, paths, env):
    """Mounted mode: refuse to run the job if the guest lacks a share (a guest
    without virtio-fs would otherwise run it on its own disk, and lose the output)."""
    missing = unmounted(proc_mounts, paths)
    if missing:
        from ...errors import SiteError
        raise SiteError(f"the virtual machine did not mount {missing[0]} from the host "
                        f"(environment {env}); the job was not run",
                        "the site should give this environment a guest with virtio-fs, "
                        "or set data = copy for it")


def _tty_size():
    try:
        sz = os.get_terminal_size(0)
        return (sz.columns, sz.lines)
    except OSError:
        return (80, 24)


def signal_number(name):
    """'TERM' -> 15; None for names this host does not know."""
    import signal
    try:
        return int(getattr(signal, "SIG" + str(name)))
    except (AttributeError, TypeError, ValueError):
        return None


class Relay:
    """Moves bytes between the guest job and fds 0-2, and signals to the guest."""

    def __init__(self, guest, chan, pidfile, interactive=False, warden=None):
        self.guest, self.chan, self.pidfile = guest, chan, pidfile
        self.interactive = interactive
        self.warden = warden
        self.last_sent = {}
        self.pending = []
        self.output_ok = {1: True, 2: True}
        self.probe_sent = None
        self.kill_channels = []

    def run(self):
        """Relay until the guest job ends: ("exit", status) or ("signal", signum)."""
        import signal
        import threading
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        old = {}
        handled = [getattr(signal, n) for n in _FORWARDED]
        if self.warden is not None:
            handled += [signal.SIGTSTP, signal.SIGCONT]  # qsig -s suspend / resume
        if self.interactive:
            handled.append(signal.SIGWINCH)
        old_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        for s in handled:
            old[s] = signal.signal(s, self._on_signal)
        restore_tty = self._raw_tty() if self.interactive else None
        if not self.interactive:
            self.chan.shutdown_write()
        stop = threading.Event()
        prober = threading.Thread(target=self._probe, args=(stop,), daemon=True)
        prober.start()
        try:
            return self._loop(wake_r)
        finally:
            stop.set()
            for c in self.kill_channels:
                c.close()
            if restore_tty:
                restore_tty()
            for s, h in old.items():
                signal.signal(s, h)
            signal.set_wakeup_fd(old_wakeup)
            os.close(wake_r)
            os.close(wake_w)

    def _on_signal(self, signum, frame):
        self.pending.append(signum)

    def _loop(self, wake_r):
        import select
        import signal
        import time
        from ...errors import GuestLost
        chan = self.chan
        stdin_open = self.interactive
        ended = None
        while True:
            rlist = [chan, wake_r] + ([0] if stdin_open else [])
            try:
                ready, _, _ = select.select(rlist, [], [], 1.0)
            except InterruptedError:
                ready = []
            if wake_r in ready:
                try:
                    while os.read(wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
            while self.pending:
                s = self.pending.pop(0)
                if s == signal.SIGWINCH:
                    w, h = _tty_size()
                    try:
                        chan.resize_pty(width=w, height=h)
                    except Exception:  # noqa: BLE001 - a lost guest shows up below
                        pass
                elif s in (signal.SIGTSTP, signal.SIGCONT):
                    self._pause(s == signal.SIGTSTP)
                elif self._fresh(s):
                    self._forward(s)
            self._drain()
            if stdin_open and 0 in ready:
                try:
                    data = os.read(0, 65536)
                except OSError:
                    data = b""
                if data:
                    try:
                        chan.sendall(data)
                    except (OSError, EOFError):
                        stdin_open = False
                else:
                    stdin_open = False
                    try:
                        chan.shutdown_write()
                    except (OSError, EOFError):
                        pass
            if chan.closed or (ended is not None and chan.eof_received):
                self._drain()
                break
            if ended is None and (chan.exit_status >= 0
                                  or getattr(chan, "vmwn_exit_signal", None) is not None):
                ended = time.monotonic()
            if ended is not None and time.monotonic() - ended > _LINGER:
                # The job shell is gone but something it started holds its output
                # open; a native job ends here too (the mom kills the session).
                self._drain()
                break
            if self.probe_sent is not None and time.monotonic() - self.probe_sent > LOST_AFTER:
                raise GuestLost(f"no answer from the guest for {LOST_AFTER:.0f} s",
                                "the job's output so far is in its .o/.e files")
        sig = signal_number(getattr(chan, "vmwn_exit_signal", None))
        if getattr(chan, "vmwn_exit_signal", None) is not None:
            return ("signal", sig or signal.SIGKILL)
        if chan.exit_status >= 0:
            return ("exit", chan.exit_status & 0xFF)
        transport = chan.get_transport()
        why = "the SSH connection closed without an exit status"
        exc = transport.get_exception() if transport else None
        if exc is not None:
            why = f"{why} ({' '.join(str(exc).split()) or type(exc).__name__})"
        raise GuestLost(why, "the job's output so far is in its .o/.e files")

    def _drain(self):
        chan = self.chan
        while chan.recv_ready():
            self._write(1, chan.recv(65536))
        while chan.recv_stderr_ready():
            self._write(2, chan.recv_stderr(65536))

    def _write(self, fd, data):
        """Write all of ``data`` to ``fd``; a closed output is dropped, the guest keeps going."""
        import select
        if not self.output_ok[fd] or not data:
            return
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                select.select([], [fd], [], 1.0)
            except InterruptedError:
                continue
            except OSError:
                self.output_ok[fd] = False
                return

    def _fresh(self, signum):
        """False for a repeat of ``signum`` within REPEAT_WINDOW of the last one sent.

        pbs_mom's kill_task sends the same signal to the same process several
        times within milliseconds; a native process sees one pending signal
        (standard signals do not queue), so the guest job must see one too.
        """
        import time
        now = time.monotonic()
        last = self.last_sent.get(signum)
        if last is not None and now - last < REPEAT_WINDOW:
            return False
        self.last_sent[signum] = now
        return True

    def _pause(self, paused):
        """Ask the job's warden to pause or resume the whole VM (qsig -s suspend/resume)."""
        import logging
        try:
            self.warden.sendall(b"suspend\n" if paused else b"resume\n")
        except OSError as e:
            logging.getLogger(__name__).warning("cannot %s the VM: %s",
                                                "pause" if paused else "resume", e)

    def _forward(self, signum):
        """Deliver ``signum`` to the guest job's process group (a second exec channel)."""
        import logging
        import signal
        from shlex import quote
        name = signal.Signals(signum).name[3:]
        p = quote(self.pidfile)
        cmd = (f"i=0; while [ ! -s {p} ] && [ $i -lt 50 ]; do sleep 0.1 2>/dev/null || sleep 1; "
               f"i=$((i+1)); done; read p < {p} && "
               # dash needs '--' before a negative pid; busybox rejects '--' but still
               # signals (so 'a || b' would signal twice): ask with signal 0 first.
               f"if kill -s 0 -- -$p 2>/dev/null; then kill -s {name} -- -$p; "
               f"else kill -s {name} -$p; fi")
        try:
            c = self.guest.exec(cmd)
            c.shutdown_write()
            self.kill_channels.append(c)
        except Exception as e:  # noqa: BLE001 - a lost guest is reported by the relay loop
            logging.getLogger(__name__).warning("cannot forward SIG%s: %s", name, e)

    def _probe(self, stop):
        """Keepalive with a reply: notice a guest that hangs without closing TCP."""
        import time
        transport = self.chan.get_transport()
        while not stop.wait(PROBE_EVERY):
            if not transport.is_active():
                return
            self.probe_sent = time.monotonic()
            try:
                transport.global_request("keepalive@openssh.com", wait=True)
            except Exception:  # noqa: BLE001 - the relay loop sees the dead transport
                return
            self.probe_sent = None

    def _raw_tty(self):
        import termios
        import tty
        try:
            saved = termios.tcgetattr(0)
            # TCSADRAIN, not setraw's default TCSAFLUSH: keep what the user typed ahead.
            tty.setraw(0, termios.TCSADRAIN)
        except (termios.error, OSError):
            return None

        def restore():
            try:
                termios.tcsetattr(0, termios.TCSADRAIN, saved)
            except (termios.error, OSError):
                pass
        return restore


if __name__ == "__main__":
    sys.exit(main())
