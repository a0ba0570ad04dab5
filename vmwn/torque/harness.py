"""``vmwn run``: run one job on this machine through the installed hooks, as pbs_mom would.

Without a Torque server, this is how a site (and vmwn's own tests) proves that
the installed prologue, job starter and epilogue behave under pbs_mom's
calling conventions: the job record and script in ``mom_priv/jobs``, spool
files created as the user, the prologue as root with its 8 arguments and the
minimal environment in its own session under ``$prologalarm - 10``, the
starter as the user with the ``.SC`` line on a pipe, the epilogue with its 11
arguments, and the output copied to ``NAME.o<seq>``/``NAME.e<seq>`` in the
submit directory.  What it cannot imitate (a server, sisters, requeue) it
reports instead.
"""

import fcntl
import grp
import logging
import os
import pwd
import re
import signal
import socket
import subprocess
import time
import xml.etree.ElementTree as ET

from .. import config as configmod
from . import pbs
from ..errors import SiteError, UserError

log = logging.getLogger(__name__)

# Torque's special exit values (src/include/job.h) that a start failure records.
JOB_EXEC_FAIL2 = -2   # the prologue aborted the job
JOB_EXEC_RETRY = -3   # the prologue asked for a requeue
JOB_EXEC_CMDFAIL = -8  # the starter (or shell) could not be executed
PELOG_TIMEOUT = -4    # a hook outlived $prologalarm - 10

# Exit codes of ``vmwn run`` when the job did not run (documented in the help).
EXIT_ABORTED = 1
EXIT_REQUEUED = 75
PBS_VERSION = "TORQUE-6.1 (vmwn run)"

_RESOURCE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_JOB_NAME = re.compile(r"^[A-Za-z0-9_.+-][^/\s]{0,229}$")


def register(subparsers):
    p = subparsers.add_parser(
        "run", help="run a job here through the installed hooks, as pbs_mom would",
        description="Run SCRIPT as a batch job on this machine through the installed "
        "prologue, job starter and epilogue, with pbs_mom's argv, environment, spool "
        "files and timeouts.  Prints the job id, then '<jobid> Exit_status=N'.  Exit "
        f"code: the job's exit status (128+N when killed by signal N, 255 when it "
        f"failed to start); {EXIT_ABORTED} when the prologue aborted the job, "
        f"{EXIT_REQUEUED} when it asked for a requeue (the job is not retried).")
    p.add_argument("-l", dest="resources", action="append", default=[], metavar="RES",
                   help="resource request, as for qsub (repeatable)")
    p.add_argument("-v", dest="variables", action="append", default=[], metavar="VAR[=val]",
                   help="variables for the job's Variable_List (repeatable, comma lists)")
    p.add_argument("-N", dest="name", help="job name (default: the script's file name)")
    p.add_argument("-j", dest="join", choices=("oe", "n"), default="n",
                   help="oe: merge stderr into stdout")
    p.add_argument("-q", dest="queue", default="batch", help="queue name (default batch)")
    p.add_argument("-A", dest="account", default="", help="account string")
    p.add_argument("-u", dest="user", help="job user (default: $SUDO_USER)")
    p.add_argument("-S", dest="shell", help="shell (default: the user's login shell)")
    p.add_argument("-d", dest="initdir", help="the job's start directory (default: home)")
    p.add_argument("--pbs-home", help="Torque's PBS_HOME (default: [site] pbs_home)")
    p.add_argument("--starter", help="job starter (default: $job_starter in mom_priv/config)")
    p.add_argument("--prologalarm", type=int,
                   help="seconds; hooks are killed at this - 10 (default: mom_priv/config or 300)")
    p.add_argument("--kill-delay", type=float, default=2.0,
                   help="seconds between SIGTERM and SIGKILL on cancel (default 2)")
    p.add_argument("script", metavar="SCRIPT")
    p.set_defaults(func=command)


def command(args):
    if os.geteuid() != 0:
        raise UserError("vmwn run must run as root, because it plays pbs_mom",
                        "run it with sudo")
    cfg = configmod.load(args.config, required=False)
    job = Job.prepare(args, cfg)
    print(job.job_id, flush=True)
    outcome = job.run()
    print(outcome.line, flush=True)
    return outcome.exit_code


class Outcome:
    def __init__(self, job_id, status=None, prologue=None, kept=None):
        self.job_id, self.status, self.prologue, self.kept = job_id, status, prologue, kept

    @property
    def line(self):
        if self.prologue is not None:
            what = "aborted" if self.prologue == 1 else "requeued"
            return (f"{self.job_id} {what}: prologue exited {self.prologue}; "
                    f"output kept in {self.kept}")
        return f"{self.job_id} Exit_status={self.status}"

    @property
    def exit_code(self):
        if self.prologue is not None:
            return EXIT_ABORTED if self.prologue == 1 else EXIT_REQUEUED
        if 0 <= self.status <= 255:
            return self.status
        if self.status > 256:
            return 128 + (self.status - 256)
        return 255


def duration(secs):
    secs = int(secs)
    return f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}"


def parse_resource_args(values):
    """``-l`` arguments -> ordered dict; names become XML tags, so they are checked."""
    out = {}
    for v in values:
        for name, value in pbs.parse_resources(v).items():
            if not _RESOURCE_NAME.match(name):
                raise UserError(f"-l {name!r} is not a resource name", "write -l name=value")
            out[name] = value
    if "nodes" in out:
        out.setdefault("neednodes", out["nodes"])
    return out


def parse_variable_args(values, environ):
    """``-v A=1,B`` -> dict; a bare name takes its value from ``environ`` (as qsub does)."""
    out = {}
    for v in values:
        for item in re.split(r"(?<!\\),", v):
            if not item:
                continue
            name, eq, value = item.partition("=")
            if not _VAR_NAME.match(name):
                raise UserError(f"-v {name!r} is not a variable name", "write -v NAME=value")
            out[name] = value.replace("\\,", ",") if eq else environ.get(name, "")
    return out


def session_pids(sid):
    """Every process whose session id is ``sid``."""
    from ..usage import stat_fields
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = stat_fields(entry)
        if fields and len(fields) > 3 and fields[3] == str(sid):
            pids.append(int(entry))
    return pids


def signal_session(sid, signo):
    """Send ``signo`` to the process group ``sid`` and everything else in session ``sid``."""
    try:
        os.killpg(sid, signo)
    except ProcessLookupError:
        pass
    for pid in session_pids(sid):
        try:
            os.kill(pid, signo)
        except ProcessLookupError:
            pass


def _read_env_file(path):
    env = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith("#") and "=" in line:
                    k, _, v = line.partition("=")
                    env[k] = v
    except FileNotFoundError:
        pass
    return env or {"PATH": "/bin:/usr/bin"}


def _create_spool_files(paths):
    """As the job user: create the spool files the way pbs_mom does (0666 & ~077)."""
    os.umask(0o077)
    for p in paths:
        os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666))
    return True


def _deliver(pairs):
    """As the job user: copy spool files to their final paths (pbs_mom's local cp)."""
    os.umask(0o077)
    for src, dst in pairs:
        with open(src, "rb") as fi:
            fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o666)
            with os.fdopen(fd, "wb") as fo:
                while True:
                    chunk = fi.read(1 << 20)
                    if not chunk:
                        break
                    fo.write(chunk)
    return True


class Job:
    """One job's files and the three steps of its life."""

    @classmethod
    def prepare(cls, args, cfg):
        self = cls()
        self.args, self.cfg = args, cfg
        self.pbs_home = os.path.abspath(args.pbs_home or cfg.pbs_home)
        self.mom_priv = os.path.join(self.pbs_home, "mom_priv")
        if not os.path.isdir(self.mom_priv):
            raise SiteError(f"{self.mom_priv} does not exist",
                            "install vmwn with 'make install PBS_HOME=...' or pass --pbs-home")
        mom = pbs.mom_running(self.pbs_home)
        if mom:
            raise SiteError(f"pbs_mom (pid {mom}) runs on {self.pbs_home}: vmwn run would write "
                            "job files into its mom_priv/jobs, which it recovers when it "
                            "restarts", "run vmwn run on a PBS_HOME of its own (--pbs-home) "
                            "or submit with qsub")
        self.alarm = pbs.hook_alarm(self.pbs_home, args.prologalarm)
        self.starter = args.starter or pbs.mom_setting(self.pbs_home, "job_starter")
        self._user(args)
        if not os.path.isfile(args.script):
            raise UserError(f"job script {args.script} does not exist", "name a script file")
        with open(args.script, "rb") as f:
            self.script = f.read()
        self.name = args.name or os.path.basename(args.script)
        if not _JOB_NAME.match(self.name):
            raise UserError(f"job name {self.name!r} is not usable", "pass -N NAME")
        self.submit_dir = os.getcwd()
        self.resources = parse_resource_args(args.resources)
        self.resource_string = ",".join(f"{k}={v}" for k, v in self.resources.items())
        self._sizes()
        self.host = socket.gethostname()
        self._dirs()
        self.seq = self._allocate()
        self.job_id = f"{self.seq}.{self.host}"
        self.sc = pbs.job_file(self.pbs_home, self.job_id, pbs.SCRIPT)
        self.jb = pbs.job_file(self.pbs_home, self.job_id, pbs.RECORD)
        spool = os.path.join(self.pbs_home, "spool")
        self.ou = os.path.join(spool, self.job_id + ".OU")
        self.er = os.path.join(spool, self.job_id + ".ER")
        self.merged = args.join == "oe"
        self.nodefile = os.path.join(self.pbs_home, "aux", self.job_id)
        self.variables = self._variables(args)
        self._write_files()
        return self

    def _user(self, args):
        name = args.user or os.environ.get("SUDO_USER")
        if not name:
            raise UserError("no job user", "pass -u USER")
        try:
            self.pw = pwd.getpwnam(name)
        except KeyError:
            raise UserError(f"user {name!r} does not exist", "pass -u USER") from None
        self.user, self.uid, self.gid = name, self.pw.pw_uid, self.pw.pw_gid
        try:
            self.group = grp.getgrgid(self.gid).gr_name
        except KeyError:
            self.group = str(self.gid)
        self.groups = os.getgrouplist(name, self.gid)
        self.shell = args.shell or self.pw.pw_shell or "/bin/sh"
        self.initdir = os.path.abspath(args.initdir) if args.initdir else self.pw.pw_dir

    def _sizes(self):
        nodes = pbs.parse_nodes(self.resources.get("nodes", ""))
        self.num_nodes = sum(n.count for n in nodes) or 1
        ppn = nodes[0].ppn if nodes else 1
        for k in ("ncpus", "procs"):
            v = self.resources.get(k, "")
            if v.isdigit():
                ppn = max(ppn, int(v))
        self.ppn, self.np = ppn, ppn * self.num_nodes

    def _dirs(self):
        for d, mode in ((pbs.jobs_dir(self.pbs_home), 0o751),
                        (os.path.join(self.pbs_home, "spool"), 0o1777),
                        (os.path.join(self.pbs_home, "aux"), 0o755)):
            if not os.path.isdir(d):
                os.makedirs(d)
                os.chmod(d, mode)

    def _allocate(self):
        """The next sequence number (a counter in mom_priv, under flock) whose
        job files and spool files are all free: the counter may be younger
        than what an earlier run left in the spool."""
        path = os.path.join(self.mom_priv, "vmwn-run.seq")
        spool = os.path.join(self.pbs_home, "spool")

        def taken(seq):
            jid = f"{seq}.{self.host}"
            return (os.path.exists(pbs.job_file(self.pbs_home, jid, pbs.SCRIPT))
                    or any(os.path.lexists(os.path.join(spool, jid + s)) for s in (".OU", ".ER")))
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        with os.fdopen(fd, "r+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            text = f.read().strip()
            seq = int(text) + 1 if text.isdigit() else 1
            while taken(seq):
                seq += 1
            f.seek(0)
            f.truncate()
            f.write(f"{seq}\n")
        return seq

    def _variables(self, args):
        v = {"PBS_O_HOME": self.pw.pw_dir, "PBS_O_LOGNAME": self.user,
             "PBS_O_PATH": os.environ.get("PATH", "/usr/bin:/bin"),
             "PBS_O_SHELL": self.pw.pw_shell or "/bin/sh", "PBS_O_HOST": self.host,
             "PBS_O_SERVER": self.host, "PBS_O_WORKDIR": self.submit_dir,
             "PBS_O_QUEUE": args.queue}
        if os.environ.get("LANG"):
            v["PBS_O_LANG"] = os.environ["LANG"]
        if args.initdir:
            v["PBS_O_INITDIR"] = self.initdir
        v.update(parse_variable_args(args.variables, os.environ))
        return v

    def _write_files(self):
        fd = os.open(self.sc, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
        with os.fdopen(fd, "wb") as f:
            f.write(self.script)
        os.chown(self.sc, self.uid, self.gid)
        os.chmod(self.sc, 0o700)
        root = ET.Element("job")
        ET.SubElement(root, "jobid").text = self.job_id
        attrs = ET.SubElement(root, "attributes")
        owner = f"{self.user}@{self.host}"
        final = {"Output_Path": f"{self.host}:{self.out_path('o')}",
                 "Error_Path": f"{self.host}:{self.out_path('e')}"}
        for name, value in (("Job_Name", self.name), ("Job_Owner", owner),
                            ("job_state", "R"), ("queue", self.args.queue),
                            ("Account_Name", self.args.account), ("Join_Path", self.args.join),
                            ("euser", self.user), ("egroup", self.group), *final.items()):
            ET.SubElement(attrs, name, flags="1").text = value
        rl = ET.SubElement(attrs, "Resource_List")
        for k, val in self.resources.items():
            ET.SubElement(rl, k, flags="1").text = val
        ET.SubElement(attrs, "Variable_List", flags="1").text = \
            pbs.join_variable_list(self.variables)
        self.record = ET.tostring(root, encoding="utf-8", xml_declaration=True)
        with open(self.nodefile, "w", encoding="ascii") as f:
            f.write(f"{self.host}\n" * self.np)
        spool = [self.ou] if self.merged else [self.ou, self.er]
        from .. import privs
        privs.run_as(self.user, self.uid, self.gid, _create_spool_files, spool, timeout=30)

    def _write_record(self):
        """The .JB record: pbs_mom writes it in req_commit, after the prologue returned."""
        fd = os.open(self.jb, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.record)

    def out_path(self, kind):
        return os.path.join(self.submit_dir, f"{self.name}.{kind}{self.seq}")

    # -- environments --------------------------------------------------------

    def hook_env(self):
        """The hooks' minimal environment (pbs_environment plus the mom's few)."""
        env = _read_env_file(os.path.join(self.pbs_home, "pbs_environment"))
        # As measured under Torque 6.1's pbs_mom: no PBS_NP, PBS_NUM_PPN or PBS_NUM_NODES.
        env.update({"PBS_NODENUM": "0", "PBS_MSHOST": self.host, "PBS_NODEFILE": self.nodefile,
                    "PBS_O_WORKDIR": self.submit_dir})
        return env

    def job_env(self):
        """The starter's environment: Variable_List plus what pbs_mom adds."""
        env = _read_env_file(os.path.join(self.pbs_home, "pbs_environment"))
        env.update(self.variables)
        env.update({"HOME": self.pw.pw_dir, "LOGNAME": self.user, "USER": self.user,
                    "SHELL": self.shell, "PBS_JOBNAME": self.name, "PBS_JOBID": self.job_id,
                    "PBS_QUEUE": self.args.queue, "PBS_NODEFILE": self.nodefile,
                    "PBS_NODENUM": "0", "PBS_TASKNUM": "1", "PBS_NP": str(self.np),
                    "PBS_NUM_NODES": str(self.num_nodes), "PBS_NUM_PPN": str(self.ppn),
                    "PBS_ENVIRONMENT": "PBS_BATCH", "PBS_VERSION": PBS_VERSION})
        if "walltime" in self.resources:
            env["PBS_WALLTIME"] = str(pbs.seconds(self.resources["walltime"]))
        return env

    # -- the three steps ----------------------------------------------------

    def _open_output(self):
        flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW
        out = os.open(self.ou, flags)
        err = out if self.merged else os.open(self.er, flags)
        return out, err

    def run_hook(self, hook, argv):
        """Run mom_priv/<hook> as pbs_mom does; returns its result code."""
        path = os.path.join(self.mom_priv, hook)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return 0  # a missing hook is skipped
        import stat as statmod
        if (not statmod.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022
                or st.st_mode & 0o500 != 0o500):
            log.warning("%s fails pbs_mom's permission check", path)
            return -1
        out, err = self._open_output()
        try:
            # pbs_mom sets the job's umask (077 by default) before it runs the prologue.
            proc = subprocess.Popen([path, *argv], cwd=self.mom_priv, env=self.hook_env(),
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True, close_fds=True, umask=0o077)
        finally:
            os.close(out)
            if err != out:
                os.close(err)
        try:
            rc = proc.wait(timeout=self.alarm)
        except subprocess.TimeoutExpired:
            signal_session(proc.pid, signal.SIGKILL)
            proc.wait()
            return PELOG_TIMEOUT
        return 0 if rc < 0 else rc  # killed by a signal counts as success

    def run(self):
        self.cancelled = None
        self.starter_pid = None
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self._run()
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _on_signal(self, signo, frame):
        if self.cancelled is None:
            self.cancelled = time.monotonic()
            if self.starter_pid:
                signal_session(self.starter_pid, signal.SIGTERM)

    def _run(self):
        a = self.args
        prologue_rc = self.run_hook("prologue", [self.job_id, self.user, self.group, self.name,
                                                 self.resource_string, a.queue, a.account,
                                                 self.sc])
        sid, used = 0, "cput=00:00:00,vmem=0kb,walltime=00:00:00,mem=0kb,energy_used=0"
        if prologue_rc != 0:
            status = JOB_EXEC_FAIL2 if prologue_rc == 1 else JOB_EXEC_RETRY
        elif self.cancelled is not None:
            status = 256 + signal.SIGTERM
        else:
            self._write_record()
            sid, status, used = self.run_starter()
        self.run_hook("epilogue", [self.job_id, self.user, self.group, self.name, str(sid),
                                   self.resource_string, used, a.queue, a.account,
                                   str(status), self.sc])
        if prologue_rc != 0:
            kept = self.ou if self.merged else f"{self.ou} and {self.er}"
            self._remove_job_files()
            return Outcome(self.job_id, prologue=prologue_rc, kept=kept)
        self.deliver()
        self._remove_job_files()
        return Outcome(self.job_id, status=status)

    def run_starter(self):
        """Start the job as the user; returns (session id, exit status, resources_used)."""
        out, err = self._open_output()
        shell = self.shell
        try:
            if self.starter:
                argv, executable, stdin = [self.starter, shell], self.starter, subprocess.PIPE
            else:
                argv, executable = ["-" + os.path.basename(shell)], shell
                stdin = os.open(self.sc, os.O_RDONLY)
            started = time.monotonic()
            try:
                proc = subprocess.Popen(argv, executable=executable, stdin=stdin, stdout=out,
                                        stderr=err, cwd=self.initdir, env=self.job_env(),
                                        user=self.uid, group=self.gid,
                                        extra_groups=self.groups, umask=0o077,
                                        start_new_session=True, close_fds=True)
            except OSError as e:
                os.write(err, f"vmwn run: cannot start {executable}: {e.strerror}\n".encode())
                return 0, JOB_EXEC_CMDFAIL, self._used(0.0, None)
        finally:
            os.close(out)
            if err != out:
                os.close(err)
            if not self.starter:
                os.close(stdin)
        self.starter_pid = proc.pid
        if self.cancelled is not None:
            signal_session(proc.pid, signal.SIGTERM)
        if self.starter:
            try:
                proc.stdin.write(f"{self.sc}\n".encode())
                proc.stdin.close()
            except BrokenPipeError:
                pass
        wstatus, rusage = self._wait(proc)
        proc.returncode = 0  # reaped here, not by Popen
        signal_session(proc.pid, signal.SIGKILL)  # the mom kills what is left
        if os.WIFSIGNALED(wstatus):
            status = 256 + os.WTERMSIG(wstatus)
        else:
            status = os.WEXITSTATUS(wstatus)
        return proc.pid, status, self._used(time.monotonic() - started, rusage)

    def _wait(self, proc):
        killed = False
        while True:
            pid, wstatus, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                return wstatus, rusage
            if (self.cancelled is not None and not killed
                    and time.monotonic() - self.cancelled >= self.args.kill_delay):
                signal_session(proc.pid, signal.SIGKILL)
                killed = True
            time.sleep(0.02)

    @staticmethod
    def _used(wall, rusage):
        cpu = (rusage.ru_utime + rusage.ru_stime) if rusage else 0.0
        mem = rusage.ru_maxrss if rusage else 0
        return (f"cput={duration(cpu)},vmem={mem}kb,walltime={duration(wall)},"
                f"mem={mem}kb,energy_used=0")

    def deliver(self):
        """Copy .OU/.ER to the submit directory as the user, then drop the spool files."""
        pairs = [(self.ou, self.out_path("o"))]
        if not self.merged:
            pairs.append((self.er, self.out_path("e")))
        from .. import privs
        privs.run_as(self.user, self.uid, self.gid, _deliver, pairs, timeout=300)
        for src, _ in pairs:
            os.unlink(src)

    def _remove_job_files(self):
        for p in (self.sc, self.jb, self.nodefile):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
