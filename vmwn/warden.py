"""The job's warden: one root process per VM job that boots its guest outside pbs_mom.

Why it exists: pbs_mom runs the prologue synchronously inside its job start and
serves nothing else meanwhile (docs/admin-guide.md).  So the prologue only
prepares the job's files (milliseconds), opens the warden's socket and forks
the warden; the guest boots in the warden while the mom goes on, and the job
starter (the job user) waits on the socket until the guest is ready.

The warden
- boots the guest, at most ``[site] max_parallel_boots`` at a time on the node,
  retrying a boot that failed for a passing reason up to ``[site] boot_attempts``
  times with a doubling back-off, so a busy node delays jobs instead of failing them;
- answers the starter with one JSON line: the guest's connection record, or the
  one-line reason the guest could not be started (the starter shows it to the user);
- pauses and resumes the domain when the starter relays a suspend or resume;
- opens connections to the guest's forward for a starter outside libvirt's network
  namespace (``connect``: the socket is passed back over the Unix socket, vmwn.netns);
- ends when the job starter's connection closes (the job ended), when SIGTERM
  arrives (the epilogue), or when no starter came for ``IDLE_LIMIT`` seconds;
- when the job's starter says ``running`` (its setup done), execs the keeper in its
  place (vmwn.keeper, a small C program), which serves the rest of the job the same
  way: no resident Python process for the job's life.

SIGTERM is only noted (vmwn.interrupt): the boot stops at its next waiting
point, with every process it started in the job's record, where the
epilogue's teardown finds it.

The socket belongs to the job's user (0600 in the job's 0711 directory); the
warden also checks the peer's uid, so only the job's own starter is answered.
"""

import errno
import fcntl
import json
import logging
import os
import select
import signal
import socket
import struct
import time

from . import interrupt, keeper, lifecycle, netns, state as statemod
from .errors import GuestLost, SiteError, TransientError, VmwnError
from .logsetup import job_logger
from .wardenclient import short_path

IDLE_LIMIT = 300.0       # seconds without any starter after the answer is known
SLOT_WAIT_LIMIT = 900.0  # seconds a boot may wait for a free slot
BACKOFF_FIRST = 2.0      # seconds before the second attempt; doubles after that
CONNECT_TIMEOUT = 10.0   # seconds the warden tries to connect to the forward for a starter
# Fields of the job record the starter needs; the record itself stays root's.
STARTER_FIELDS = ("job_id", "domain", "env", "user", "uid", "gid", "bind_address", "port",
                  "host_key_public", "key_path", "workdir", "host_workdir", "vcpus",
                  "memory_mib", "data", "control_dir", "shares", "vm_pid", "vm_start",
                  "guests")


def listen(cfg, st):
    """The warden's listening socket, made by the prologue so that it exists when the
    starter looks for it.  Owned by the job's user, mode 0600."""
    path = statemod.warden_socket(cfg.site["state_dir"], st.job_id)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)
        try:
            with short_path(path) as short:
                s.bind(short)
        finally:
            os.umask(old)
        os.chown(path, st.uid, st.gid)
        os.chmod(path, 0o600)
        s.listen(8)
    except OSError as e:
        s.close()
        raise SiteError(f"cannot create the job's socket {path}: {e.strerror}",
                        "check [site] state_dir") from None
    return s


def spawn(cfg, st, listener):
    """Fork the warden (detached: its own session, stdio on /dev/null); return its pid."""
    r, w = os.pipe()
    go_r, go_w = os.pipe()  # the warden starts once its pid is in the job's record
    pid = os.fork()
    if pid == 0:  # child: fork again so the warden is nobody's child in pbs_mom's tree
        try:
            interrupt.forget()  # the prologue's SIGTERM handling is not the warden's
            os.close(r)
            os.close(go_w)
            os.setsid()
            gpid = os.fork()
            if gpid:
                os.write(w, struct.pack("i", gpid))
                os._exit(0)
            os.close(w)
            os.read(go_r, 1)  # EOF when the prologue has recorded this pid (or died)
            os.close(go_r)
            from .logsetup import restart
            logs = restart(syslog=cfg.site["syslog"], debug_log=cfg.site["debug_log"])
            _detach({listener.fileno(), *logs})
            code = 0
            try:
                Warden(cfg, st.job_id, listener).run()
            except BaseException:  # noqa: BLE001 - logged; a warden never raises into pbs_mom
                job_logger(__name__, st.job_id).error("warden failed", exc_info=True)
                code = 1
            os._exit(code)
        finally:
            os._exit(1)
    os.close(w)
    os.close(go_r)
    try:
        try:
            data = os.read(r, 4)
        finally:
            os.close(r)
        os.waitpid(pid, 0)
        if len(data) != 4:
            raise SiteError("the job's warden could not be started", "see the node's syslog")
        listener.close()
        gpid = struct.unpack("i", data)[0]
        # Recorded before the warden goes on and before the prologue returns, so
        # that an epilogue coming at once (qdel) finds the warden to stop.
        st.warden_pid, st.warden_start = gpid, proc_start_time(gpid)
        statemod.save(cfg, st)
    finally:
        os.close(go_w)
    return gpid


def _detach(keep):
    """stdio to /dev/null (they are the job's .o/.e files), every other fd but ``keep``
    closed, umask 022."""
    nul = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(nul, fd)
    os.close(nul)
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 65536)
    os.umask(0o022)
    os.chdir("/")
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)


class Warden:
    def __init__(self, cfg, job_id, listener):
        self.cfg, self.job_id, self.listener = cfg, job_id, listener
        self.log = job_logger(__name__, job_id)
        self.answer = None          # bytes: the JSON line every starter gets
        self.conns = {}             # socket -> bytes received, not yet a whole line
        self.peers = {}             # socket -> the pid at its other end (SO_PEERCRED)
        self.joined = False         # the VM has been moved into the job's cgroups
        self.primary = None         # the first starter's socket (the job's own)
        self.tasks = set()          # sockets of further tasks' starters, never primary
        self.dom_name = None
        self.owner = None           # the job user's uid, the only one answered (and root)
        self.hand_over = False      # a starter said "running": the keeper takes over

    def run(self):
        # SIGTERM: the epilogue (or reap) is taking over the job.
        with interrupt.noted(signal.SIGTERM):
            st = statemod.load(self.cfg, self.job_id)  # with this warden's pid (see spawn)
            self.dom_name = st.domain
            try:
                self.answer = self._boot(st)
                self._serve(stoppable=True)
            except interrupt.Interrupted as e:
                self.log.info("warden %s", e)

    # ---------------------------------------------------------------- boot

    def _boot(self, st):
        cfg = self.cfg
        env = cfg.environments.get(st.env)
        if env is None:
            return _failure(SiteError(f"environment {st.env} is no longer configured",
                                      "the site changed vmwn.conf while the job started"))
        attempts = cfg.site["boot_attempts"]
        err = None
        for attempt in range(1, attempts + 1):
            try:
                with boot_slot(cfg, self.log):
                    t0 = time.monotonic()
                    lifecycle.boot(cfg, st, env, time.monotonic() + env.boot_timeout)
                    st.phase = "running"
                    st.boot_seconds = round(time.monotonic() - t0, 3)
                    st.boot_attempts = attempt
                    statemod.save(cfg, st)
                self.log.info("guest ready after %.1f s (attempt %d of %d)",
                              st.boot_seconds, attempt, attempts)
                return _line({"ready": True, "record": starter_record(st)})
            except (TransientError, GuestLost) as e:
                err = e
                self.log.warning("boot attempt %d of %d failed: %s", attempt, attempts, e.line())
                try:
                    lifecycle.undo_boot(cfg, st, env)
                except VmwnError as e2:
                    return _failure(e2)
                if attempt < attempts:
                    interrupt.sleep(BACKOFF_FIRST * 2 ** (attempt - 1))
            except VmwnError as e:
                self.log.error("boot failed: %s", e.line())
                return _failure(e)
        st.phase = "failed"
        statemod.save(cfg, st)
        return _failure(type(err)(f"the job's virtual machine did not start in {attempts} "
                                  f"attempts; last: {err.problem}", err.fix))

    # ---------------------------------------------------------------- serve

    def _serve(self, stoppable=False):
        """``stoppable``: the warden's own loop, which SIGTERM ends (not a thread's:
        serve_booted)."""
        idle_since = time.monotonic()
        wake = interrupt.fd() if stoppable else -1
        while True:
            if stoppable:
                interrupt.check()
            rlist = [self.listener] + list(self.conns) + ([wake] if wake >= 0 else [])
            ready, _, _ = select.select(rlist, [], [], 1.0)
            for s in ready:
                if s is wake:
                    interrupt.drain()
                elif s is self.listener:
                    self._accept()
                elif not self._read(s):
                    if s is self.primary:
                        self.log.info("job starter gone: the job ended")
                        return
            if stoppable and self.hand_over:
                self.hand_over = False
                self._become_keeper()  # returns only where the keeper cannot take over
            if self.conns:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > IDLE_LIMIT:
                self.log.warning("no job starter came for %.0f s; warden ends", IDLE_LIMIT)
                return
            if not os.path.isdir(statemod.job_dir(self.cfg, self.job_id)):
                return

    def _accept(self):
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        pid, uid, _ = peer_credentials(conn)
        if self.owner is None:
            self.owner = statemod.load(self.cfg, self.job_id).uid
        if uid not in (self.owner, 0):
            self.log.warning("refused a connection from uid %d (pid %d)", uid, pid)
            conn.close()
            return
        try:
            conn.sendall(self.answer)
        except OSError:
            conn.close()
            return
        self.conns[conn] = b""
        self.peers[conn] = pid
        if self.primary is None:
            self.primary = conn

    def _read(self, conn):
        """Handle what a starter sent; False when it closed."""
        try:
            data = conn.recv(4096)
        except OSError:
            data = b""
        if not data:
            del self.conns[conn]
            self.peers.pop(conn, None)
            self.tasks.discard(conn)
            conn.close()
            return False
        buf = self.conns[conn] + data
        *lines, rest = buf.split(b"\n")
        self.conns[conn] = rest[-256:]
        for line in lines:
            self._command(line.strip().decode("ascii", "replace"), conn)
        return True

    def _command(self, word, conn=None):
        if word == "connect" and conn is not None:
            self._connect(conn)
            return
        if word == "task" and conn is not None:
            # A further task or step of the job (srun --jobid, pbsdsh): never the
            # job's own starter, though it may have connected first (a step started
            # as the job began); the next starter that is not one takes its place.
            self.tasks.add(conn)
            if conn is self.primary:
                self.primary = next((c for c in self.conns if c not in self.tasks), None)
            return
        if word == "running" and conn is not None:
            # The job's starter (or a sister's adopter) has done what needed Python here.
            # Its own word only: another process of the user's could otherwise hand over
            # before the starter has had the VM moved into the job's cgroups.
            if conn is self.primary:
                self.hand_over = True
            else:
                self.log.warning("ignored 'running' from pid %d, not the job's starter",
                                 self.peers.get(conn, 0))
            return
        if word == "cgroups" and conn is not None:
            # The job's own starter only (the first to connect, at the job's start),
            # and once: another process of the user's could otherwise move the VM
            # into a group no one counts.
            if conn is self.primary and not self.joined:
                self.joined = True
                self._join_cgroups(conn)
            else:
                self.log.warning("refused to move the VM's cgroups for pid %d",
                                 self.peers.get(conn, 0))
                _send_quietly(conn, b"0")
            return
        if word not in ("suspend", "resume"):
            return
        from . import virt
        conn = virt.connect(self.cfg.site["libvirt_uri"])
        try:
            virt.set_paused(conn, self.dom_name, word == "suspend")
            self.log.info("domain %s %s", self.dom_name,
                          "paused" if word == "suspend" else "resumed")
        except VmwnError as e:
            self.log.warning("cannot %s domain %s: %s", word, self.dom_name, e.line())
        finally:
            conn.close()


    def _become_keeper(self):
        """Exec the keeper in this process's place, handing it the listening socket,
        every connection and the answer (vmwn.keeper); returns only when it cannot."""
        found = keeper.usable(self.cfg)
        if found is None:
            self.log.info("no keeper at %s (or no virsh): the warden serves the job",
                          keeper.path(self.cfg))
            return
        prog, vsh = found
        st = statemod.load(self.cfg, self.job_id)
        log_fd = next((h.stream.fileno() for h in logging.getLogger().handlers
                       if isinstance(h, logging.FileHandler) and h.stream), None)
        # A SIGTERM from now on waits, blocked, for the keeper (which unblocks it):
        # the epilogue's stop is never lost between this check and the exec.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        afd, fds = None, []
        try:
            if interrupt.requested():
                return
            afd = keeper.answer_fd(self.answer)
            primary = self.primary.fileno() if self.primary is not None else None
            others = [c.fileno() for c in self.conns if c is not self.primary]
            fds = [self.listener.fileno(), afd, *others] + \
                ([primary] if primary is not None else []) + \
                ([log_fd] if log_fd is not None else [])
            for fd in fds:
                os.set_inheritable(fd, True)
            self.log.info("the keeper takes over the running job")
            os.execv(prog, keeper.argv(
                prog, vsh, job_id=self.job_id, owner=st.uid, domain=self.dom_name,
                uri=self.cfg.site["libvirt_uri"], forward=st.bind_address, port=st.port,
                listen_fd=self.listener.fileno(), answer_fd=afd, primary_fd=primary,
                other_fds=others, job_dir=statemod.job_dir(self.cfg, self.job_id),
                idle=IDLE_LIMIT, syslog=self.cfg.site["syslog"], log_fd=log_fd))
        except OSError as e:
            self.log.warning("cannot hand the job over to the keeper %s: %s; the warden "
                             "serves it", prog, e.strerror or e)
            for fd in fds:
                os.set_inheritable(fd, False)
            if afd is not None:
                os.close(afd)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def _join_cgroups(self, conn):
        """Answer ``cgroups``: the VM's processes (launcher, anchor, QEMU) join the
        accounting cgroup of the asking starter, a process of the job's own (its uid
        was checked at accept, its group must name the job); one byte, 1 when they
        did."""
        from . import cgroups, usage
        st = statemod.load(self.cfg, self.job_id)
        launcher = st.vm_pid if st.vm_pid and \
            usage.start_time(st.vm_pid) == st.vm_start else 0
        try:
            if not launcher:
                raise OSError("the VM's launcher is gone")
            done = cgroups.join(usage.tree(launcher), self.peers[conn], job_id=self.job_id)
            self.log.info("the VM joined the job's cgroups: %s", ", ".join(done) or "none")
            _send_quietly(conn, b"1" if done else b"0")
        except Exception as e:  # noqa: BLE001 - the warden goes on serving the job
            self.log.warning("the VM cannot join the job's cgroups: %s",
                             getattr(e, "strerror", None) or e,
                             exc_info=not isinstance(e, OSError))
            _send_quietly(conn, b"0")

    def _connect(self, conn):
        """Answer ``connect``: one byte, with a socket connected to the guest's forward
        (made in this process's network namespace, libvirt's) or, on failure, none."""
        st = statemod.load(self.cfg, self.job_id)
        try:
            s = socket.create_connection((st.bind_address, st.port), timeout=CONNECT_TIMEOUT)
        except OSError as e:
            self.log.warning("cannot connect to the guest's forward %s:%d for the starter: %s",
                             st.bind_address, st.port, e.strerror or e)
            _send_quietly(conn, b"0")
            return
        try:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            socket.send_fds(conn, [b"1"], [s.fileno()])
        except OSError as e:
            self.log.warning("cannot pass the guest connection to the starter: %s", e)
        finally:
            s.close()


def _send_quietly(conn, data):
    try:
        conn.sendall(data)
    except OSError:
        pass


def serve_booted(cfg, st):
    """Answer one job starter for a guest this process booted itself (lifecycle.create),
    from a thread; returns the thread.  For tools that boot in-process (make bench)."""
    import threading
    w = Warden(cfg, st.job_id, listen(cfg, st))
    w.answer = _line({"ready": True, "record": starter_record(st)})
    t = threading.Thread(target=w._serve, daemon=True)
    t.start()
    return t


def starter_record(st):
    """What the starter is told: the record's fields, and the network namespace the
    guest's forward is in (this process's: it started the domain)."""
    return {**{k: getattr(st, k) for k in STARTER_FIELDS}, "netns": netns.current()}


def _failure(e):
    return _line({"ready": False, "kind": type(e).__name__, "problem": e.problem,
                  "fix": e.fix})


def _line(obj):
    return (json.dumps(obj, sort_keys=True) + "\n").encode()


def peer_credentials(conn):
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    data = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", data)


def proc_start_time(pid):
    """Start time of ``pid`` in clock ticks since boot, or 0 (tells a reused pid apart)."""
    from .usage import start_time
    return start_time(pid)


def stop(st, timeout=5.0):
    """SIGTERM the job's warden if it still runs (then SIGKILL); idempotent."""
    pid = getattr(st, "warden_pid", 0)
    if not pid or not _running(pid, st.warden_start):
        return False
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 2.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        end = time.monotonic() + wait
        while time.monotonic() < end:
            if not _running(pid, st.warden_start):
                return True
            time.sleep(0.05)
    return True


def _running(pid, start):
    """``pid`` is the process that started at ``start``, and has not exited (a zombie
    has: nobody reaped it yet)."""
    from .usage import stat_fields
    fields = stat_fields(pid)
    return bool(fields) and fields[0] != "Z" and proc_start_time(pid) == start


class boot_slot:
    """At most ``[site] max_parallel_boots`` guests boot at once on this node.

    Each slot is a lock file in the state directory held with flock, so a
    warden that dies frees its slot with it.
    """

    def __init__(self, cfg, log):
        self.cfg, self.log, self.fd = cfg, log, None

    def __enter__(self):
        n = self.cfg.site["max_parallel_boots"] or os.cpu_count() or 1
        root = statemod.ensure_root(self.cfg)
        end = time.monotonic() + SLOT_WAIT_LIMIT
        waited = False
        while True:
            for i in range(n):
                fd = os.open(os.path.join(root, f".boot-slot-{i}"),
                             os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    os.close(fd)
                    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise
                    continue
                self.fd = fd
                return self
            if not waited:
                self.log.info("all %d boot slots busy; waiting", n)
                waited = True
            if time.monotonic() > end:
                raise TransientError(f"no boot slot came free in {SLOT_WAIT_LIMIT:.0f} s",
                                     "the node is overloaded; lower the jobs per node")
            interrupt.sleep(0.2)

    def __exit__(self, *exc):
        os.close(self.fd)


__all__ = ["listen", "spawn", "stop", "serve_booted", "Warden"]
