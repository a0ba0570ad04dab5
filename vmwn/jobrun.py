"""A job in its guest, for any batch system's job starter (run as the job's user).

The batch system's starter (``vmwn.torque.hooks.starter``, ``vmwn.openpbs.starter``)
reads the job in its own terms (argv conventions, how the script arrives, how the
VM is charged to the job, what its daemon makes of an exit status) and calls
:func:`run`: wait for the job's warden (the boot), connect to the guest, stage
the job's files in, run the script there over SSH with the job's environment,
relay output as it comes and signals to the guest job's process group, and
return how the guest job ended (same exit status, or death by the same signal).

Signals go through one second exec channel, opened as the job starts, whose
guest shell reads a signal name per line and runs ``kill -s SIG -- -PGID`` (the
PGID the job's shell recorded in ~/.vmwn), once per burst: a batch daemon may
repeat a signal within milliseconds, a native job sees it once.  One channel
keeps the signals in the order they came (a channel each could overtake one
another), and a signal that comes before the job's shell has recorded its PGID
waits for it.  The starter catches the forwarded signals before the job starts
in the guest, so none that arrives while it starts is lost or ends the starter
alone.  SIGTSTP and SIGCONT (a batch system's suspend and resume) pause and
resume the whole VM through the job's warden.  The SSH "signal" channel request
is not sent as well: OpenSSH may or may not honour it, and a signal delivered
twice would run a job's USR1 handler twice.

Where the C relay is installed (vmwn.relay), the SSH session is its: the
starter never loads paramiko, sends the setup's commands and then the job to
the relay over one login, and waits for it; the relay forwards the signals and
the suspend the same way (:class:`Relay` below is the starter's own, used
where no relay is installed).

The guest's SSH forward lives in libvirt's network namespace.  A starter in
another one (a batch daemon confined to a namespace of its own) cannot enter
it, so it asks the job's warden, which runs there, for a connected socket
(:func:`vmwn.wardenclient.open_connection`).
"""

import contextlib
import os
import re
import sys

STDIN_MAX = 64 << 20
# Every signal whose default action would end the starter without reaching the
# guest and that a job can be sent (a delete, a user's signal, a hangup on an
# interactive job's pty).  SIGKILL and SIGSTOP cannot be caught: guest teardown
# after a SIGKILL belongs to the batch system's cleanup hook.
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


def fail(exc, cfg, job_id, setup_logging):
    """Report ``exc`` in one line on stderr and in syslog; return the job's status
    (``errors.exit_code("starter", exc)``).  ``setup_logging(cfg)``: the batch
    system's logging for its starter (syslog only: stderr is the job's)."""
    import logging
    from .errors import GuestLost, VmwnError, exit_code
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else 1
    if isinstance(exc, KeyboardInterrupt):
        die_of(2)
    log = logging.getLogger(__name__)
    setup_logging(cfg)
    if isinstance(exc, GuestLost):
        line = f"vmwn: the job's virtual machine was lost: {exc.line()}"
        log.error("job %s: %s", job_id, exc.line())
    elif isinstance(exc, VmwnError):
        line = f"vmwn: {exc.line()}"
        log.error("job %s: %s", job_id, exc.line())
    else:
        line = (f"vmwn: internal error in the job starter ({type(exc).__name__}); "
                "the node's syslog has the details")
        log.error("job %s: starter failed", job_id, exc_info=exc)
    try:
        os.write(2, (line + "\n").encode("utf-8", "replace"))
    except OSError:
        pass
    return exit_code("starter", exc)


def starter_logging(cfg=None):
    """A job starter's logging: syslog only (its stderr is the job's)."""
    import logging
    from . import logsetup
    if cfg is None:
        logsetup.setup(stderr=False)
    else:
        logsetup.setup(syslog=cfg.syslog, debug_log=cfg.debug_log, stderr=False)
    if not logging.getLogger().handlers:
        logging.getLogger().addHandler(logging.NullHandler())


def vm_socket(state_dir, job_id, fix):
    """For a starter that runs only VM jobs: the job's warden socket.  The job's
    refusal record is raised as the error it records; a job with neither was not
    given a VM by this node (``fix`` names the batch system's hook to check), and
    never runs on the host."""
    from . import state
    from .errors import SiteError
    from .wardenclient import answer_error
    refusal = state.read_refusal(state_dir, job_id)
    if refusal is not None:
        raise answer_error(refusal)
    sock = state.warden_socket(state_dir, job_id)
    if not os.path.exists(sock):
        raise SiteError("the job asks for a vmwn environment, but this node prepared no "
                        "virtual machine for it, so the job was not run", fix)
    return sock


def is_spool_file(directory, suffix, path):
    """True for an existing regular file ``<directory>/NAME<suffix>``, named by an
    absolute, normalised path: a script file a batch daemon's spool holds.  Each
    batch system's package says which directory and suffix (the core names none)."""
    import stat
    if not (path.startswith("/") and path.endswith(suffix)
            and os.path.normpath(path) == path
            and os.path.dirname(path) == os.path.normpath(directory)):
        return False
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def read_script(data, is_job_script, fix="check the batch system's job starter setting",
                args_name="script arguments", args_fix="fix the quoting of the script's arguments"):
    """Interpret what the job's shell would have read on stdin.  Returns (script
    bytes, args, how).

    ``how`` is "exec" (an ``exec PATH args`` line), "run" (a ``PATH args`` line)
    or "text" (stdin is the script itself).  Only what the batch daemon sends
    counts as a script path: one line naming a file for which ``is_job_script(path)``
    holds (the daemon's spool), which must be a regular file; any other input,
    ``exec /bin/x`` included, is script text.  The arguments after the path are
    split with shell quoting rules (no expansion) exactly once.  ``fix``: what to
    check when stdin is neither; ``args_name``, ``args_fix``: what the batch system
    calls those arguments, and how to fix them.
    """
    import shlex
    import stat
    from .errors import UserError
    line = data[:-1] if data.endswith(b"\n") else data
    if b"\n" not in line and b"\0" not in line:
        text = line.decode("utf-8", "surrogateescape").strip()
        how = "run"
        if text.startswith("exec "):
            how, text = "exec", text[5:].lstrip()
        path, _, argtext = text.partition(" ")
        if is_job_script(path):
            try:
                args = shlex.split(argtext)
            except ValueError as e:
                raise UserError(f"cannot parse the job's {args_name} {argtext!r}: {e}",
                                args_fix) from None
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
                with os.fdopen(fd, "rb") as f:
                    if not stat.S_ISREG(os.fstat(fd).st_mode):
                        raise UserError(f"the job script {path} named on the starter's stdin "
                                        "is not a regular file", fix)
                    script = f.read(STDIN_MAX + 1)
            except OSError as e:
                raise UserError(f"cannot read the job script {path} named on the starter's "
                                f"stdin: {e.strerror}", f"{fix} and the script's "
                                "owner") from None
            if len(script) > STDIN_MAX:
                raise UserError(f"the job script {path} is larger than 64 MiB",
                                "keep data out of the job script")
            return script, args, how
    if b"\0" in data:
        raise UserError("the job starter's stdin is neither a script path nor script text "
                        "(it holds NUL bytes)", fix)
    return data, [], "text"


def run(cfg, job_id, sock_path, mode, rest, environ, script=None, how=None, args=(),
        nodefile_var=None, task_num=None, host_workdir=None, adopt=None, log=None,
        interpreter=None, stdin=None):
    """Run the job in its guest; returns (kind, value, st): ("exit", status) or
    ("signal", signum), and the guest's connection record.

    ``mode``: "batch" (``script`` as read by :func:`read_script`, run by the
    shell ``rest[0]``), "command" (``rest`` is ``[shell, "-c", command]``),
    "exec" (``rest`` is the program and its arguments, run as they are),
    "interactive" (a shell on a pty) or "task" (``rest`` run as a further task of
    a running job, ``task_num`` naming it).  ``environ``: the job's environment
    (``nodefile_var`` names the variable holding the host's node file, copied
    into the guest and pointed there).  ``adopt(st, wsock)``: the batch system's way
    of charging the VM to the job, called once the guest is up (not for tasks), with
    the warden's socket.
    ``host_workdir``: the directory staged in (copy mode; default: the record's).
    ``interpreter``: the script's own ``#!`` program (a batch system that execs
    the script, ``how`` "exec"), which the guest must have: the job is refused
    with one line otherwise, where a login shell it lacks is replaced.
    ``stdin``: whether the job gets this process's stdin to its end of file
    (default: an interactive job and a program run as it is, "exec").
    """
    from . import logsetup, relay
    log = log or logsetup.job_logger(__name__, job_id)
    st, wsock = await_guest(sock_path, mode)
    if mode == "task":  # not the job's own starter, whenever it connected (the warden)
        try:
            wsock.sendall(b"task\n")
        except OSError:
            pass  # a warden gone: the guest job runs all the same
    elif adopt is not None:
        adopt(st, wsock)
    log.info("starting %s in guest %s as %s", mode, st.domain, st.user)
    how_run = dict(cfg=cfg, st=st, wsock=wsock, mode=mode, rest=rest, environ=environ,
                   script=script, how=how, args=args, nodefile_var=nodefile_var,
                   task_num=task_num, host_workdir=host_workdir, interpreter=interpreter,
                   stdin=stdin)
    prog = relay.usable(cfg)
    try:
        if prog is None:
            outcome = _run_in_python(**how_run)
        else:
            outcome = _run_in_relay(prog, **how_run)  # never loads paramiko
    finally:
        wsock.close()
    kind, value = outcome
    log.info("guest job ended: %s %s", kind, value)
    return kind, value, st


def _run_in_python(cfg, st, wsock, mode, **how):
    """The job under this process's own relay (paramiko): where no relay is installed."""
    guest = connect_guest(st, wsock)
    try:
        if mode != "task":
            running(wsock)
        job = _prepare(cfg, guest, st, mode, **how)
        guest.capture_exit_signals()
        rl = Relay(guest, None, job["pidfile"], interactive=job["interactive"], warden=wsock,
                   stdin=job["stdin"])
        with rl.catching():  # from before the job starts: no signal is lost
            rl.chan = guest.exec(job["command"], pty=job["interactive"], term=job["term"],
                                 size=tuple(job["size"]))
            rl.open_signaller()
            return rl.run()
    finally:
        guest.close()


def _run_in_relay(prog, cfg, st, wsock, mode, **how):
    """The job under the C relay (vmwn.relay): one login that sets the job up and runs it."""
    import signal
    from . import relay
    handled = [getattr(signal, n) for n in _FORWARDED] + [signal.SIGTSTP, signal.SIGCONT]
    if mode == "interactive":
        handled.append(signal.SIGWINCH)
    session = relay.Session.start(
        prog, lambda timeout: _guest_socket(st, wsock, timeout), st, handled,
        warden_fd=wsock.fileno(), timing=dict(lost_after=LOST_AFTER, probe_every=PROBE_EVERY,
                                              linger=_LINGER, repeat_window=REPEAT_WINDOW))
    try:
        if mode != "task":
            running(wsock)
        job = _prepare(cfg, session, st, mode, **how)
        return session.job(job["command"], signaller_command(job["pidfile"]),
                           stdin=job["stdin"], pty=job["term"] if job["interactive"] else None,
                           size=job["size"])
    finally:
        session.close()


def _guest_socket(st, wsock, timeout=30.0):
    """A TCP connection to the guest's SSH forward: here, or from the warden (another
    network namespace: vmwn.netns)."""
    from . import netns, ssh, wardenclient
    try:
        if netns.is_other(getattr(st, "netns", "")):
            return wardenclient.open_connection(wsock, timeout)
        return ssh._nodelay_socket(st.bind_address, st.port, timeout)
    except OSError as e:
        from .errors import GuestLost
        raise GuestLost(f"cannot reach the job's guest on {st.bind_address}:{st.port}: "
                        f"{e.strerror or e}", "the job's VM is not running") from None


def _prepare(cfg, guest, st, mode, rest, environ, script=None, how=None, args=(),
             nodefile_var=None, task_num=None, host_workdir=None, interpreter=None,
             stdin=None):
    """Set the job up in its guest (files, mounts, the other guests) and say what
    starts it: {"command", "pidfile", "interactive", "term", "size", "stdin"}."""
    import posixpath
    from . import guestfiles, logsetup, transfer
    from .config import parse_bytes
    log = logsetup.job_logger(__name__, st.job_id)
    ctl = getattr(st, "control_dir", "") or guestfiles.control_dir(st.user, False)
    tag = guestfiles.JOB if mode != "task" else \
        guestfiles.task_tag(_safe(str(task_num or "0")))
    files = []
    nodefile = environ.get(nodefile_var) if nodefile_var else None
    guests = [tuple(g) for g in getattr(st, "guests", None) or ()]
    if nodefile and mode != "task":
        try:
            with open(nodefile, "rb") as f:
                files.append((guestfiles.NODEFILE, guest_nodefile(f.read(1 << 20), guests),
                              0o600))
        except OSError as e:
            log.warning("cannot copy the node file %s: %s", nodefile, e.strerror)
    if nodefile:
        environ[nodefile_var] = posixpath.join(ctl, guestfiles.NODEFILE)
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
            host_dir=(host_workdir or st.host_workdir) if copy else None,
            max_bytes=parse_bytes(cfg.site["stage_in_max"]),
            # copy mode: the control directory is the guest home's .vmwn
            home=posixpath.dirname(ctl), shell=interpreter or rest[0], tmpdir=tmpdir,
            mounts=bool(shares), umask=current_umask())
    except (EOFError, *guest.protocol_errors) as e:
        from .errors import GuestLost
        raise GuestLost(f"preparing the job in the guest failed: "
                        f"{' '.join(str(e).split()) or type(e).__name__}",
                        "the virtual machine may be out of disk space") from None
    if shares:
        _check_mounts(prep.proc_mounts, shares, st.env)
    if len(guests) > 1 and mode != "task":
        _await_other_guests(cfg, guest, st, guests)
    for item in (prep.staged.skipped if prep.staged else [])[:20]:
        say(f"not copied into the virtual machine: {item}")
    shell = rest[0]
    if interpreter and not prep.has_shell:
        from .errors import UserError
        raise UserError(f"the job script's interpreter {interpreter} does not exist in "
                        f"environment {st.env}", "begin the script with one it has "
                        "(#!/bin/sh) or ask for another environment")
    if mode not in ("task", "exec") and not interpreter and not prep.has_shell:
        fallback = cfg.environments[st.env].ssh_user_shell if st.env in \
            cfg.environments else "/bin/sh"
        if mode != "batch" or not script.startswith(b"#!"):  # else its #! decides
            say(f"{shell} does not exist in environment {st.env}; using {fallback}")
        shell = fallback
    if tmpdir and prep.has_tmpdir:
        env_rest.append(("TMPDIR", tmpdir))
    if mode == "batch":
        argv = job_argv(shell, how, script_path, args)
    elif mode in ("task", "exec"):
        argv = rest
    else:
        argv = [shell] + rest[1:]
    pidfile = guestfiles.pidfile(ctl, tag)
    command = build_command(pidfile, start_dir(environ), env_rest, argv, env_file=env_file,
                            umask=current_umask())
    interactive = mode == "interactive"
    term = environ.get("TERM") or "vt100"
    size = _tty_size() if interactive else (80, 24)
    # A program run as it is gets the task's stdin (srun's), as it would natively;
    # a script's shell reads none (it never has one from the batch daemon).
    return {"command": command, "pidfile": pidfile, "interactive": interactive, "term": term,
            "size": list(size),
            "stdin": bool(interactive or mode == "exec" if stdin is None else stdin)}


def ended(outcome, log, usage=True):
    """A starter's end: the VM's usage on the job's stderr (``usage``), then the guest
    job's exit status returned, or its signal died of (``outcome`` as :func:`run`
    returns it)."""
    kind, value, st = outcome
    if usage:
        report_usage(st, log)
    if kind == "signal":
        sys.stdout.flush()
        die_of(value)
    return value


def guest_nodefile(data, guests):
    """The host's node file with each of the job's nodes replaced by its guest's name
    (``guests``: (node, guest host name) pairs); a one-node job's is unchanged."""
    if not guests:
        return data
    names = {}
    for node, name in guests:
        names[node.encode()] = names[node.split(".")[0].encode()] = name.encode()
    lines = data.split(b"\n")
    return b"\n".join(names.get(ln.strip(), names.get(ln.strip().split(b".")[0], ln))
                      for ln in lines)


def _await_other_guests(cfg, guest, st, guests):
    """Wait until the job's guests on its other nodes let the job's user in over the
    job's network (their boots run on their nodes, beside this one's), as the job's
    own ssh or mpirun will; a guest that does not fails the job, naming its node."""
    import shlex
    from .errors import SiteError
    env = cfg.environments.get(st.env)
    seconds = int(env.boot_timeout if env else 120)
    others = guests[1:]
    command = ("for h in " + " ".join(shlex.quote(n) for _, n in others) + "; do "
               f"timeout {seconds} ssh -o ConnectionAttempts={seconds} -o ConnectTimeout=5 "
               "\"$h\" true "
               "</dev/null >/dev/null 2>&1 || { echo \"$h\"; exit 1; }; done")
    status, out, _ = guest.run(command, timeout=seconds * len(others) + 60)
    if status != 0:
        missing = out.decode(errors="replace").strip()
        node = next((n for n, g in others if g == missing), missing or "?")
        raise SiteError(f"the job's guest on node {node} did not answer over the job's "
                        f"network within {seconds} s, so the job was not run",
                        f"submit it again; if it recurs, the site should read node "
                        f"{node}'s vmwn log for job {st.job_id}")


def connect_guest(st, wsock):
    """The SSH connection to the guest: directly, or (the guest's forward being in
    another network namespace than this process) over a socket the warden opened."""
    from . import netns, ssh, wardenclient
    if netns.is_other(getattr(st, "netns", "")):
        return ssh.Guest.connect(st, opener=lambda timeout: wardenclient.open_connection(wsock,
                                                                                   timeout))
    return ssh.Guest.connect(st)


def die_of(signum):
    """End this process by ``signum`` so the batch daemon records the signal, like a native job."""
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
    if umask is not None:  # the job's umask, as the batch daemon set it for the native job
        parts.append(f"umask {int(umask) & 0o777:03o}")
    source = (" /bin/sh -c " + quote('. "$0" && exec "$@"') + " " + quote(env_file)
              if env_file else "")
    parts += [
             "exec env -i " + guest_own + "".join(" " + quote(f"{k}={v}") for k, v in env_items)
             + source + "".join(" " + quote(a) for a in argv)]
    return " && ".join(parts)


def signaller_command(pidfile):
    """The guest side of signal forwarding: for each signal name read from stdin,
    ``kill`` the job's process group (its PGID read from ``pidfile``, waited for
    5 s at most), and answer ``PING`` with ``PONG`` (the C relay's probe that the guest
    still answers).  Only these names are acted on; it ends at end of input."""
    from shlex import quote
    p = quote(pidfile)
    names = "|".join(n[3:] for n in _FORWARDED)
    return ("while read s; do case $s in " + names + ") "
            f"i=0; while [ ! -s {p} ] && [ $i -lt 50 ]; do sleep 0.1 2>/dev/null || sleep 1; "
            f"i=$((i+1)); done; read p < {p} && "
            # dash needs '--' before a negative pid; busybox rejects '--' but still
            # signals (so 'a || b' would signal twice): ask with signal 0 first.
            "if kill -s 0 -- -$p 2>/dev/null; then kill -s $s -- -$p; "
            "else kill -s $s -$p; fi;; PING) echo PONG;; esac; done")


def current_umask():
    m = os.umask(0)
    os.umask(m)
    return m


def _sh_text(text):
    """``text`` safe inside a double-quoted shell string (only printable, no $`"\\)."""
    return "".join(c if c.isprintable() and c not in '$`"\\' else "?" for c in text)[:200]


def start_dir(environ):
    """Where the native job would have started: the batch daemon made it the starter's cwd.

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
    """How the guest runs the script, mirroring what the native job's shell does with stdin."""
    if how == "text":
        return [shell, script_path] + list(args)
    body = 'exec "$0" "$@"' if how == "exec" else '"$0" "$@"'
    return [shell, "-c", body, script_path] + list(args)


def read_stdin():
    from .errors import UserError
    buf = bytearray()
    while len(buf) <= STDIN_MAX:
        chunk = os.read(0, 1 << 16)
        if not chunk:
            return bytes(buf)
        buf += chunk
    raise UserError("the job script on the starter's stdin is larger than 64 MiB",
                    "keep data out of the job script")


def await_guest(sock_path, mode):
    """Wait for the job's warden: (connection record, warden socket) or its error.

    The wait is the guest's boot; the batch system counts it as walltime (the job has
    started), and the first line on stderr says how long it took.
    """
    import time
    import types
    from . import wardenclient
    import signal
    t0 = time.monotonic()

    def ended(signum, frame):  # qdel while the guest boots: say so, end as a native job
        say(f"the job was ended by {signal.Signals(signum).name} while its virtual "
             "machine was starting")
        die_of(signum)
    old = {s: signal.signal(s, ended) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        answer, wsock = wardenclient.wait_answer(sock_path)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if not answer.get("ready"):
        wsock.close()
        raise wardenclient.answer_error(answer)
    waited = time.monotonic() - t0
    if mode != "task" and waited >= WAIT_NOTE_AFTER:
        say(f"the job waited {waited:.1f} s for its virtual machine "
             f"({answer['record']['env']}); walltime counts from before that wait")
    return types.SimpleNamespace(**answer["record"]), wsock


def running(wsock):
    """Tell the warden that this starter's setup that needed it is done: it hands the
    job to the keeper (vmwn.keeper).  What follows asks only for a pause, a resume,
    or a further task's connection."""
    try:
        wsock.sendall(b"running\n")
    except OSError:
        pass  # a warden gone: the guest job runs all the same


def join_cgroups(wsock, timeout=30.0):
    """Ask the job's warden to move the VM into this process's accounting cgroup
    (vmwn.cgroups); True when it did."""
    wsock.settimeout(timeout)
    try:
        wsock.sendall(b"cgroups\n")
        return wsock.recv(1) == b"1"
    except OSError:
        return False
    finally:
        wsock.settimeout(None)


def launcher_of(st):
    """The VM's launcher pid (vmwn.emulator) while it is still that process, else 0."""
    from . import usage
    pid = getattr(st, "vm_pid", 0)
    return pid if pid and usage.start_time(pid) == getattr(st, "vm_start", 0) else 0


def report_usage(st, log):
    from . import usage
    pid = launcher_of(st)
    if not pid:
        return
    used = usage.of_vm(pid)
    if used is not None:
        log.info("%s", used.line())
        say(used.line())


def _safe(text):
    return "".join(c for c in text if c.isalnum())[:20] or "0"


def say(msg):
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
        from .errors import SiteError
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

    def __init__(self, guest, chan, pidfile, interactive=False, warden=None, stdin=None):
        self.guest, self.chan, self.pidfile = guest, chan, pidfile
        self.interactive = interactive
        # stdin (fd 0) goes to the guest job until its end of file: an interactive
        # job's, and a program's run as it is; None: as ``interactive``
        self.stdin = interactive if stdin is None else stdin
        self.warden = warden
        self.last_sent = {}
        self.pending = []
        self.output_ok = {1: True, 2: True}
        self.probe_sent = None
        self.signaller = None
        self.wake_r = None

    @contextlib.contextmanager
    def catching(self):
        """Catch the forwarded signals (and the VM's suspend and resume) into
        ``pending``, with a wakeup fd for the relay loop; restore on exit."""
        import signal
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        handled = [getattr(signal, n) for n in _FORWARDED]
        if self.warden is not None:
            handled += [signal.SIGTSTP, signal.SIGCONT]  # a batch system's suspend / resume
        if self.interactive:
            handled.append(signal.SIGWINCH)
        old_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        old = {}
        self.wake_r = wake_r
        try:
            for s in handled:
                old[s] = signal.signal(s, self._on_signal)
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            signal.set_wakeup_fd(old_wakeup)
            os.close(wake_r)
            os.close(wake_w)
            self.wake_r = None

    def run(self):
        """Relay until the guest job ends: ("exit", status) or ("signal", signum)."""
        import threading
        if self.wake_r is None:
            with self.catching():
                return self.run()
        restore_tty = self._raw_tty() if self.interactive else None
        if not self.stdin:
            self.chan.shutdown_write()
        stop = threading.Event()
        prober = threading.Thread(target=self._probe, args=(stop,), daemon=True)
        prober.start()
        try:
            return self._loop(self.wake_r)
        finally:
            stop.set()
            if self.signaller is not None:
                self.signaller.close()
            if restore_tty:
                restore_tty()

    def _on_signal(self, signum, frame):
        self.pending.append(signum)

    def _loop(self, wake_r):
        import select
        import signal
        import time
        from .errors import GuestLost
        chan = self.chan
        stdin_open = self.stdin
        to_guest = b""  # read from stdin, not yet taken by the channel
        ended = None
        while True:
            # stdin is read only when what came before is gone: the guest job's output
            # is relayed meanwhile (a job that writes as it reads, cat, would block on
            # its output otherwise, and stop reading), and signals too.  The channel's
            # window has no fd to wait on: while input waits, the loop looks often.
            rlist = [chan, wake_r] + ([0] if stdin_open and not to_guest else [])
            try:
                ready, _, _ = select.select(rlist, [], [], 0.02 if to_guest else 1.0)
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
            if stdin_open and not to_guest and 0 in ready:
                try:
                    to_guest = os.read(0, 65536)
                except OSError:
                    to_guest = b""
                if not to_guest:
                    stdin_open = False
                    try:
                        chan.shutdown_write()
                    except (OSError, EOFError):
                        pass
            if to_guest and chan.send_ready():  # never blocks: the window has room
                try:
                    sent = chan.send(to_guest)
                except (OSError, EOFError):
                    sent = 0
                # 0: the channel is closing, and the guest job reads no more
                to_guest = to_guest[sent:] if sent else b""
                stdin_open = stdin_open and bool(sent)
            if chan.closed or (ended is not None and chan.eof_received):
                self._drain()
                break
            if ended is None and (chan.exit_status >= 0
                                  or getattr(chan, "vmwn_exit_signal", None) is not None):
                ended = time.monotonic()
            if ended is not None and time.monotonic() - ended > _LINGER:
                # The job shell is gone but something it started holds its output
                # open; a native job ends here too (the batch daemon kills the session).
                self._drain()
                break
            if self.probe_sent is not None and time.monotonic() - self.probe_sent > LOST_AFTER:
                raise GuestLost(f"no answer from the guest for {LOST_AFTER:.0f} s",
                                GuestLost.FIX)
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
        raise GuestLost(why, GuestLost.FIX)

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

        A batch daemon (Torque's kill_task) sends the same signal to the same process several
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
        """Ask the job's warden to pause or resume the whole VM (the batch system's suspend and resume)."""
        import logging
        try:
            self.warden.sendall(b"suspend\n" if paused else b"resume\n")
        except OSError as e:
            logging.getLogger(__name__).warning("cannot %s the VM: %s",
                                                "pause" if paused else "resume", e)

    def open_signaller(self):
        """Open the channel that delivers signals to the guest job (see the module's
        docstring); False if the guest would not open it (tried again at a signal)."""
        import logging
        try:
            self.signaller = self.guest.exec(signaller_command(self.pidfile))
        except Exception as e:  # noqa: BLE001 - a lost guest is reported by the relay loop
            logging.getLogger(__name__).warning("cannot open the signal channel: %s", e)
            self.signaller = None
        return self.signaller is not None

    def _forward(self, signum):
        """Deliver ``signum`` to the guest job's process group, through the signaller."""
        import logging
        import signal
        name = signal.Signals(signum).name[3:]
        for _ in range(2):  # a closed signaller is opened once more
            if self.signaller is None and not self.open_signaller():
                break
            try:
                self.signaller.sendall(f"{name}\n".encode())
                return
            except (OSError, EOFError) as e:
                logging.getLogger(__name__).warning("signal channel lost: %s", e)
                self.signaller.close()
                self.signaller = None
        logging.getLogger(__name__).warning("cannot forward SIG%s to the guest job", name)

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
