"""``make bench``: vmwn's per-job overhead against baselines measured in the same run.

Every ratio compares two numbers taken minutes apart on the same machine, never a
number written down earlier: the floor (the same kernel, initrd and devices
booted by ``qemu-system-x86_64`` directly, to an authenticated SSH login), a
naive script (full image copy, ``virsh create``, OpenSSH ``ssh``), OpenSSH's
``ssh``/``scp`` on the same guest, and the same ``vmwn run`` harness without
vmwn's hooks.  Everything the run creates (a node tree under /tmp, a job user
when none is given, overlays, domains, QEMU processes) is removed at the end,
also after a failure or Ctrl-C.

Usage: ``python bench/vmwn_bench.py --config PATH [--quick] [--jobs N] [--user NAME]``
(from the source tree; not part of the installed package).
"""

import argparse
import dataclasses
import glob
import logging
import grp
import os
import pwd
import re
import shlex
import signal
import socket
import statistics
import sys
import sysconfig
import tempfile
import threading
import time
import types

from vmwn import config as configmod, subp
from vmwn.errors import SiteError, UserError, VmwnError

log = logging.getLogger(__name__)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = "vmwn-bench-first"
MIB = 1 << 20
BIG_MIB = 64


# ----------------------------------------------------------------- the table

def median(values):
    """Median of the numbers in ``values`` (None entries ignored); None when empty."""
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def ratio(a, b):
    """a / b, or None when either is missing or b is not positive."""
    if a is None or b is None or b <= 0:
        return None
    return a / b


@dataclasses.dataclass
class Row:
    """One line of the table.  ``goal`` is (op, limit) on ``ratio``, or on ``value`` if
    ``goal_on`` is "value"; op is "<=" or ">="."""
    metric: str
    value: float = None
    baseline: float = None
    unit: str = "s"
    ratio: float = None
    goal: tuple = None
    goal_on: str = "ratio"

    def met(self):
        """True/False against the goal; None when there is no goal or no number."""
        if not self.goal:
            return None
        x = self.ratio if self.goal_on == "ratio" else self.value
        if x is None:
            return None
        op, limit = self.goal
        return x <= limit if op == "<=" else x >= limit


def _num(x, unit):
    if x is None:
        return "-"
    if unit == "s":
        return f"{x:.3f} s" if x < 10 else f"{x:.2f} s"
    if unit == "ms":
        return f"{x:.0f} ms"
    if unit == "MiB/s":
        return f"{x:.1f} MiB/s"
    if unit == "MiB":
        return f"{x:.0f} MiB"
    if unit == "/min":
        return f"{x:.2f}/min"
    return f"{x:.3g}{(' ' + unit) if unit else ''}"


def format_table(rows):
    """The table as text: metric, vmwn, baseline, ratio, goal, met?"""
    head = ("phase / metric", "vmwn", "baseline", "ratio", "goal", "met?")
    lines = []
    for r in rows:
        goal = "" if not r.goal else (f"{'ratio' if r.goal_on == 'ratio' else 'value'} "
                                      f"{r.goal[0]} {r.goal[1]:g}")
        m = r.met()
        lines.append((r.metric, _num(r.value, r.unit), _num(r.baseline, r.unit),
                      "-" if r.ratio is None else f"{r.ratio:.2f}", goal or "-",
                      "-" if m is None else ("yes" if m else "NO")))
    widths = [max(len(str(x[i])) for x in [head] + lines) for i in range(len(head))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(head, widths)).rstrip(),
           "  ".join("-" * w for w in widths)]
    for ln in lines:
        out.append("  ".join(str(c).ljust(w) for c, w in zip(ln, widths)).rstrip())
    return "\n".join(out)


def summary_line(s):
    """The final line: every headline ratio, ``?`` where it could not be measured."""
    def f(x, fmt):
        return "?" if x is None else format(x, fmt)
    return ("bench: first-instruction/floor=" + f(s.get("first_floor"), ".2f")
            + " naive/vmwn=" + f(s.get("naive_vmwn"), ".2f")
            + " 20G/200M=" + f(s.get("scale"), ".2f")
            + " relay/ssh=" + f(s.get("relay_ssh"), ".2f")
            + " harvest/scp=" + f(s.get("harvest_scp"), ".2f")
            + " harvest/tar=" + f(s.get("harvest_tar"), ".2f")
            + " mounted/native=" + f(s.get("mounted_native"), ".2f")
            + " warm/floor=" + f(s.get("warm_floor"), ".2f")
            + " warm4/floor=" + f(s.get("warm4_floor"), ".2f")
            + " warm-mnt/floor=" + f(s.get("warm_mnt_floor"), ".2f")
            + " warm4-mnt/floor=" + f(s.get("warm4_mnt_floor"), ".2f")
            + " warm-mem/booted=" + f(s.get("warm_private"), ".2f")
            + " novm-extra=" + f(s.get("novm_ms"), ".0f") + "ms"
            + " rss-extra=" + f(s.get("rss_extra"), ".0f") + "MiB")


# ------------------------------------------------------------- the workbench

def _say(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def _write(path, text, mode=0o644, uid=None, gid=None):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, mode)
    if uid is not None:
        os.chown(path, uid, gid)


def _rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


def _vm_rss_mib(launcher):
    """QEMU's RSS under vmwn's launcher (the largest process of the launcher's tree)."""
    from vmwn.usage import qemu_of
    qemu = qemu_of(launcher)
    return _rss_mib(qemu) if qemu else None


def _private_mib(launcher):
    """What the guest under ``launcher`` holds for itself (vmwn.usage.own_memory of its
    QEMU), in MiB."""
    from vmwn.usage import own_memory, qemu_of
    qemu = qemu_of(launcher)
    held = own_memory(qemu) if qemu else None
    return None if held is None else held / MIB


def _alive(pid):
    """True while ``pid`` runs (a zombie has exited)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ConsoleWatch:
    """Notes when ``vmwn-guest: ready`` appears in a console log (polled every 10 ms)."""

    def __init__(self, path):
        self.path, self.at = path, None
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        from vmwn.console import Console  # the prologue's own reader of the announcement
        console = Console(self.path)
        while not self._stop.is_set():
            if console.poll() == "ready":
                self.at = time.monotonic()
                return
            self._stop.wait(0.01)

    def stop(self):
        self._stop.set()
        self._t.join(1)


def _connect_retrying(uri, wait=30.0):
    """libvirt, waiting up to ``wait`` seconds for a libvirtd that is restarting."""
    from vmwn import virt
    end = time.monotonic() + wait
    while True:
        try:
            return virt.connect(uri)
        except SiteError:
            if time.monotonic() >= end:
                raise
            time.sleep(0.5)


class Bench:
    """The node tree, job user and everything to remove afterwards."""

    def __init__(self, args):
        self.args = args
        self.reps = args.jobs or (2 if args.quick else 3)
        self.site_cfg = configmod.load(args.config)
        if "tiny" not in self.site_cfg.environments:
            raise SiteError(f"{args.config} has no [env tiny]", "add the tiny environment")
        self.base_env = self.site_cfg.environments["tiny"]
        missing = self.base_env.missing()
        if missing:
            raise SiteError(f"the tiny image is not built (missing {missing[0]})",
                            "run 'make guest GUESTS=tiny'")
        self.tag = f"bench{os.getpid()}"
        self.seq_base = 900000000 + (os.getpid() % 90000) * 100
        self.host = socket.gethostname()
        self.created_user = None
        self.job_ids = set()     # in-process lifecycle jobs
        self.domains = set()     # domains made with virsh
        self.pids = set()        # QEMU processes started directly
        self.root = None
        self.vmwn = os.path.join(os.path.dirname(sys.executable), "vmwn")

    # -- setup / teardown ---------------------------------------------------

    def setup(self):
        self.root = tempfile.mkdtemp(prefix="vmwn-bench-", dir="/tmp")
        os.chmod(self.root, 0o755)
        self._user()
        self.timings = os.path.join(self.root, "hook-times")
        self.vm = self._node("vm", timing_steps=True)
        self.plain = self._node("plain", timing_steps=False)
        self.bare = os.path.join(self.root, "bare")
        os.makedirs(os.path.join(self.bare, "mom_priv"))
        self.cfg = configmod.load(self.vm.config)
        # The per-step measurements exercise the copy path (stage-in, harvest);
        # the mounted one has measure_mounted.
        self.env = dataclasses.replace(self.cfg.environments["tiny"], data="copy")
        self.submit = self._udir("submit")
        _write(os.path.join(self.submit, "job.sh"), f"#!/bin/sh\necho {MARKER}\n", 0o755,
               self.uid, self.gid)
        _write(os.path.join(self.submit, "true.sh"), "#!/bin/sh\ntrue\n", 0o755,
               self.uid, self.gid)
        self.stagein = self._udir("stagein")
        for i in range(3):
            _write(os.path.join(self.stagein, f"input{i}.txt"), "x" * 4096, 0o644,
                   self.uid, self.gid)
        self.empty = self._udir("empty")

    def _udir(self, name):
        d = os.path.join(self.root, name)
        os.mkdir(d)
        os.chown(d, self.uid, self.gid)
        return d

    def _user(self):
        name = self.args.user
        if name is None:
            name = f"vmwnb{os.getpid() % 100000}"
            subp.run(["useradd", "-M", "-s", "/bin/sh", name], timeout=30,
                     fix="check useradd and /etc/passwd")
            self.created_user = name
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            raise UserError(f"user {name!r} does not exist", "pass --user NAME") from None
        if pw.pw_uid == 0:
            raise UserError("the job user must not be root", "pass --user NAME")
        self.user, self.uid, self.gid = name, pw.pw_uid, pw.pw_gid
        self.group = grp.getgrgid(self.gid).gr_name

    def _node(self, name, timing_steps):
        """vmwn installed into ROOT/NAME (PBS_HOME, config, starter)."""
        from vmwn.torque import install
        base = os.path.join(self.root, name)
        conf = os.path.join(base, "etc", "vmwn", "vmwn.conf")
        os.makedirs(os.path.dirname(conf))
        e = self.base_env
        tiny = (f"image = {e.image}\nkernel = {e.kernel}\ninitrd = {e.initrd}\n"
                f"cmdline = {e.cmdline}\naccel = {e.accel}\nmachine = {e.machine}\n"
                f"vcpus = 1\nmemory = {e.memory_mib}M\nmax_memory = {max(e.memory_mib, 256)}M\n")
        _write(conf, f"""[site]
state_dir = {self.root}/state
overlay_dir = {self.root}/overlays
pbs_home = {base}/torque
template_dir = {self.site_cfg.site['template_dir']}
syslog = no
boot_timeout = 240
prologue_deadline = 260
warm_dir = {self.root}/warm

[env tiny]
{tiny}
# The same guest restored from a prepared one (docs/performance.md).
[env tinywarm]
{tiny}data = copy
warm = on

# The same, the job's directories mounted: the shares are added after the restore.
[env tinywarmmnt]
{tiny}warm = on
""")
        python, starter_python, path = sys.executable, sys.executable, ""
        if not install.others_can_execute(sys.executable):
            starter_python = "/usr/bin/python3"
            path = os.pathsep.join([REPO, sysconfig.get_paths()["purelib"]])
        install.install(install.build_parser().parse_args(
            ["install", "--pbs-home", f"{base}/torque", "--sysconfdir", f"{base}/etc",
             "--prefix", f"{base}/prefix", "--python", python, "--starter-python",
             starter_python] + (["--pythonpath", path] if path else [])))
        mom_priv = os.path.join(base, "torque", "mom_priv")
        # Job ids unique to this run: domain names are global to libvirt.
        _write(os.path.join(mom_priv, "vmwn-run.seq"), f"{self.seq_base}\n")
        if timing_steps:
            for d in ("prologue.d", "epilogue.d"):
                for step, what in (("00-bench", "start"), ("99-bench", "end")):
                    _write(os.path.join(mom_priv, d, step),
                           f'#!/bin/sh\necho "$VMWN_HOOK {what} $1 $(date +%s.%N)" >> '
                           f"{shlex.quote(self.timings)}\n", 0o755)
        return types.SimpleNamespace(base=base, config=conf, pbs_home=f"{base}/torque",
                                     spool=f"{base}/torque/spool",
                                     starter=f"{base}/prefix/libexec/vmwn/job-starter")

    def cleanup(self):
        """Remove every domain, process, file and account this run made."""
        from vmwn import lifecycle, virt
        for pid in list(self.pids):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.root and os.path.exists(os.path.join(self.root, "vm")):
            try:
                cfg = self.cfg
            except AttributeError:
                cfg = None
            try:
                conn = _connect_retrying(self.site_cfg.site["libvirt_uri"])
                try:
                    for name in list(self.domains):
                        virt.destroy(conn, name)
                    for dom, meta in virt.vmwn_domains(conn):
                        jid = meta.get("id", "")
                        m = re.match(r"^(\d+)\.", jid)
                        mine = jid.startswith(self.tag) or (
                            m and self.seq_base < int(m.group(1)) < self.seq_base + 100)
                        if mine:
                            virt.destroy(conn, dom.name())
                finally:
                    conn.close()
                for jid in list(self.job_ids):
                    if cfg is not None:
                        lifecycle.destroy(cfg, jid)
            except VmwnError as e:
                _say(f"cleanup: {e.line()}")
        if self.root:
            subp.run(["rm", "-rf", "--one-file-system", self.root], timeout=120, check=False)
        if self.created_user:
            subp.run(["userdel", self.created_user], timeout=30, check=False)

    # -- helpers ----------------------------------------------------------------

    def spec(self, job_id, env=None, host_workdir=None):
        from vmwn.spec import JobSpec
        env = env or self.env
        workdir = (host_workdir or self.submit) if env.data == "mounted" else \
            f"/home/{self.user}/bench"
        return JobSpec(job_id=job_id, user=self.user, uid=self.uid, gid=self.gid,
                       group=self.group, job_name="bench", env=env, vcpus=1,
                       memory_mib=env.memory_mib, workdir=workdir,
                       host_workdir=host_workdir or self.submit)

    def create(self, job_id, env=None, host_workdir=None):
        """lifecycle.create in this process; returns (state, phases, console-ready, t0)."""
        from vmwn import lifecycle, state as statemod
        self.job_ids.add(job_id)
        phases, ends = {}, {}

        def on_phase(name, secs):
            phases[name] = phases.get(name, 0.0) + secs
            ends[name] = time.monotonic()
        watch = ConsoleWatch(os.path.join(statemod.job_dir(self.cfg, job_id), "console.log"))
        t0 = time.monotonic()
        try:
            st = lifecycle.create(self.cfg, self.spec(job_id, env, host_workdir),
                                  time.monotonic() + 300, on_phase=on_phase)
        finally:
            watch.stop()
        phases["total"] = time.monotonic() - t0
        return st, phases, ends, watch.at

    def destroy(self, job_id):
        from vmwn import lifecycle, state as statemod, virt
        st = statemod.load(self.cfg, job_id)
        conn = virt.connect(self.cfg.site["libvirt_uri"])
        t0 = time.monotonic()
        try:
            virt.destroy(conn, st.domain)
        finally:
            conn.close()
        t1 = time.monotonic()
        lifecycle.destroy(self.cfg, job_id)
        t2 = time.monotonic()
        self.job_ids.discard(job_id)
        return t1 - t0, t2 - t0

    def ssh_argv(self, port, key, known_hosts, *rest, scp=False):
        opts = ["-F", "/dev/null", "-o", "StrictHostKeyChecking=yes",
                "-o", f"UserKnownHostsFile={known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
                "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=5",
                "-o", "LogLevel=ERROR", "-i", key]
        if scp:
            return ["scp", "-q", "-P", str(port)] + opts + list(rest)
        return ["ssh", "-p", str(port)] + opts + [f"{self.user}@127.0.0.1"] + list(rest)

    def known_hosts(self, path, port, host_public):
        _write(path, f"[127.0.0.1]:{port} {host_public}\n", 0o644)
        return path

    def vmwn_run(self, node, script, resources=(), pbs_home=None, timeout=900, submit=None):
        submit = submit or self.submit
        argv = [self.vmwn, "--config", node.config, "run", "-u", self.user, "-d", submit,
                "--prologalarm", "300", "--pbs-home", pbs_home or node.pbs_home]
        for r in resources:
            argv += ["-l", r]
        cp = subp.run(argv + [script], cwd=submit, timeout=timeout, check=False)
        lines = cp.stdout.splitlines()
        if cp.returncode != 0 or len(lines) < 2:
            raise SiteError(f"vmwn run {script} failed ({cp.returncode}): "
                            f"{' '.join((cp.stdout + cp.stderr).split())[-300:]}",
                            "run 'make test' to find the broken part")
        return lines[0].strip()


# ------------------------------------------------------------ measurements

def measure_vm_jobs(b, env="tiny", simultaneous=1, reps=None, submit=None):
    """Whole VM jobs through ``vmwn run`` with timing steps around vmwn's steps:
    ``reps`` rounds of ``simultaneous`` jobs submitted from ``submit`` (default the
    bench's submit directory); one dict per job."""
    out = []
    for i in range(reps or b.reps):
        _say(f"vmwn job{'s' if simultaneous > 1 else ''} ({env}"
             f"{f', {simultaneous} at once' if simultaneous > 1 else ''}) through the hooks "
             f"{i + 1}/{reps or b.reps}")
        first = {}
        stop = threading.Event()

        def poll():
            while not stop.is_set():
                for p in glob.glob(os.path.join(b.vm.spool, "*.OU")):
                    try:
                        if os.path.getsize(p) > 0:
                            first.setdefault(os.path.basename(p)[:-3], time.time())
                    except OSError:
                        pass
                time.sleep(0.002)
        t = threading.Thread(target=poll, daemon=True)
        t.start()
        ids, errors = [None] * simultaneous, []

        def one(k):
            try:
                ids[k] = (b.vmwn_run(b.vm, "job.sh", [f"other=vmwn={env}"], submit=submit),
                          time.time())
            except VmwnError as e:
                errors.append(e)
        t0 = time.time()
        threads = [threading.Thread(target=one, args=(k,)) for k in range(simultaneous)]
        try:
            for th in threads:
                th.start()
            for th in threads:
                th.join()
        finally:
            stop.set()
            t.join(1)
        if errors:
            raise errors[0]
        marks = {}
        with open(b.timings, encoding="ascii") as f:
            for line in f:
                hook, what, jid, ts = line.split()
                marks[(jid, hook, what)] = float(ts)
        for job_id, end in ids:
            fb = first.get(job_id)
            ps, pe = marks.get((job_id, "prologue", "start")), marks.get((job_id, "prologue", "end"))
            es, ee = marks.get((job_id, "epilogue", "start")), marks.get((job_id, "epilogue", "end"))
            out.append(dict(wall=end - t0, prologue=pe - ps, epilogue=ee - es,
                            starter_first=(fb - pe) if fb else None,
                            first_instruction=(fb - ps) if fb else None))
            if fb:
                _say(f"  {job_id}: first instruction {fb - ps:.3f} s after the prologue's start")
    return out


def measure_warm(b):
    """Warm starts of tinywarm: what preparing costs, then jobs restored from it."""
    from vmwn import warm
    env = b.cfg.environments["tinywarm"]
    _say("warm: preparing tinywarm")
    first = warm.prepare(b.cfg, env, say=_say)
    _say("warm: preparing it again (a refresh)")
    again = warm.prepare(b.cfg, env, say=_say)
    # One job in this process: was it restored, and what does its QEMU hold?
    jid = f"{b.tag}-w0"
    st, ph, _ends, _at = b.create(jid, env=env)
    rss = _vm_rss_mib(st.vm_pid) if st.vm_pid else None
    restored = bool(st.warm)
    b.destroy(jid)
    if not restored:
        raise SiteError("tinywarm booted cold: see the node log", "check 'vmwn warm status'")
    res = dict(prepare=first["prepare_seconds"], refresh=again["prepare_seconds"],
               state_mib=again["state_bytes"] / MIB, disk_mib=again["disk_bytes"] / MIB,
               rss=rss, phases=ph)
    # The copy mode stages the submit directory in: one holding only the job script,
    # not what the other measurements left in the bench's.
    submit = b._udir("warm-submit")
    _write(os.path.join(submit, "job.sh"), f"#!/bin/sh\necho {MARKER}\n", 0o755, b.uid, b.gid)
    # Four restored together, and one booted, in this process: what each holds.
    held = []
    try:
        for k in range(4):
            st, *_ = b.create(f"{b.tag}-wm{k}", env=env)
            if not st.warm:
                raise SiteError("tinywarm booted cold: see the node log",
                                "check 'vmwn warm status'")
            held.append(st)
        res["private4"] = [_private_mib(st.vm_pid) for st in held]
    finally:
        for st in held:
            b.destroy(st.job_id)
    st, *_ = b.create(f"{b.tag}-wc0")
    try:
        res["private_booted"] = _private_mib(st.vm_pid)
    finally:
        b.destroy(st.job_id)
    res["jobs"] = measure_vm_jobs(b, "tinywarm", submit=submit)
    res["jobs4"] = measure_vm_jobs(b, "tinywarm", simultaneous=4, reps=1, submit=submit)
    res["cold4"] = measure_vm_jobs(b, "tiny", simultaneous=4, reps=1, submit=submit)
    # Four jobs at once share this machine's CPUs: their floor is four plain QEMUs at once.
    res["floor4"] = measure_floor(b, simultaneous=4, reps=1)
    warm.drop(b.cfg, env.name)
    mnt = b.cfg.environments["tinywarmmnt"]
    _say("warm: preparing tinywarmmnt (mounted mode)")
    warm.prepare(b.cfg, mnt, say=_say)
    res["mounted_jobs"] = measure_vm_jobs(b, "tinywarmmnt")
    res["mounted_jobs4"] = measure_vm_jobs(b, "tinywarmmnt", simultaneous=4, reps=1)
    warm.drop(b.cfg, mnt.name)
    return res


def measure_phases(b, throughput):
    """In-process lifecycle.create: the prologue's phases, the starter's steps, destroy."""
    from vmwn import ssh, transfer
    from vmwn.jobrun import build_command, guest_env, job_argv
    runs = []
    for i in range(b.reps + 1):
        warm = i == 0
        _say("warm-up VM (not counted)" if warm else f"VM phases {i}/{b.reps}")
        jid = f"{b.tag}-p{i}"
        st, ph, ends, console_at = b.create(jid)
        r = dict(phases=ph)
        r["ssh_detect_lag"] = (ends["boot to SSH"] - console_at) if console_at else None
        pid_file = f"/run/libvirt/qemu/{st.domain}.pid"
        try:
            with open(pid_file, encoding="ascii") as f:
                r["rss"] = _vm_rss_mib(int(f.read().strip()))
        except (OSError, ValueError):
            r["rss"] = None
        # The job starter's steps, as vmwn/jobrun.py takes them.
        t0 = time.monotonic()
        guest = ssh.Guest.connect(st)
        t1 = time.monotonic()
        ctl = st.control_dir
        script = ctl + "/job.sh"
        transfer.prepare(guest, ctl, [("job.sh", f"#!/bin/sh\necho {MARKER}\n".encode(), 0o700)],
                         workdir=st.workdir, host_dir=b.stagein, max_bytes=1 << 30,
                         home=f"/home/{st.user}")
        t2 = time.monotonic()
        chan = guest.exec(build_command(ctl + "/job.pid", st.workdir,
                                        guest_env({"PATH": "/bin:/usr/bin"}),
                                        job_argv("/bin/sh", "run", script, [])))
        chan.recv(1)
        t3 = time.monotonic()
        chan.recv_exit_status()
        guest.close()
        r.update(connect=t1 - t0, transfer=t2 - t1, exec_first=t3 - t2, starter=t3 - t0)
        if i == 1 and throughput is not None:
            throughput.update(measure_throughput(b, st))
        r["destroy_libvirt"], r["destroy"] = b.destroy(jid)
        if not warm:
            runs.append(r)
    return runs


def _timed(argv, **kw):
    t0 = time.monotonic()
    cp = subp.run(argv, **kw)
    return time.monotonic() - t0, cp


def _relay(b, st, env, script):
    """The installed starter relaying ``script``'s output from the guest; (seconds, cp)."""
    from vmwn import warden
    served = warden.serve_booted(b.cfg, st)
    t, cp = _timed([b.vm.starter, "/bin/sh"], env=env, timeout=600, input=script)
    served.join(5)
    if served.is_alive():  # the starter never asked for the guest: it ran on the host
        raise SiteError("the job starter did not run the job in its guest",
                        "check the bench's job environment")
    return t, cp


def measure_throughput(b, st):
    """Relay (the installed starter) and harvest against OpenSSH ssh and scp, same guest."""
    from vmwn import ssh, transfer
    _say("throughput: starter relay and harvest against OpenSSH")
    kh = b.known_hosts(os.path.join(b.root, "known_hosts"), st.port, st.host_key_public)
    env = {"PATH": "/bin:/usr/bin", "PBS_JOBID": st.job_id, "PBS_O_WORKDIR": b.empty,
           "HOME": "/root", "USER": b.user, "LOGNAME": b.user}
    dd = "dd if=/dev/zero bs=1M count={} 2>/dev/null"
    res = {}
    for name, run in (
            ("relay", lambda n: _relay(b, st, env, f"#!/bin/sh\n{dd.format(n)}\n")),
            ("ssh", lambda n: _timed(b.ssh_argv(st.port, st.key_path, kh, dd.format(n)),
                                     timeout=600))):
        fixed, full = [], []
        for _ in range(2):
            t, cp = run(0)
            fixed.append(t)
            t, cp = run(BIG_MIB)
            if len(cp.stdout) != BIG_MIB * MIB:
                raise SiteError(f"{name}: got {len(cp.stdout)} bytes of {BIG_MIB} MiB "
                                f"({cp.stderr.strip()[-200:]})", "check the guest")
            full.append(t)
        res[name] = BIG_MIB / max(1e-3, median(full) - median(fixed))
    guest = ssh.Guest.connect(st)
    big = f"{st.workdir}/big.bin"
    status, _, err = guest.run(f"dd if=/dev/zero of={shlex.quote(big)} bs=1M count={BIG_MIB} "
                               "2>/dev/null && sync", timeout=300)
    guest.close()
    if status != 0:
        raise SiteError(f"cannot write {BIG_MIB} MiB in the guest: {err[-200:]!r}",
                        "check the guest's disk")
    hv, sc = [], []
    dest = b._udir("harvest")
    for _ in range(2):
        t0 = time.monotonic()
        r = transfer.harvest(b.cfg, st)
        hv.append(time.monotonic() - t0)
        if r.bytes < BIG_MIB * MIB:
            raise SiteError(f"harvest copied {r.bytes} bytes", "check transfer.harvest")
        os.unlink(os.path.join(st.host_workdir, "big.bin"))
        t, _ = _timed(b.ssh_argv(st.port, st.key_path, kh, f"{b.user}@127.0.0.1:{big}",
                                 os.path.join(dest, "big.bin"), scp=True), timeout=600)
        sc.append(t)
        os.unlink(os.path.join(dest, "big.bin"))
    res["harvest_s"], res["scp_s"] = median(hv), median(sc)
    res.update(measure_small_files(b, st, kh))
    return res


SMALL_FILES = 2000


def measure_small_files(b, st, kh):
    """The copy path's harvest of many small files against a plain tar stream over
    the same guest's SSH (the issue's yardstick), and native cp on the host."""
    from vmwn import ssh, transfer
    _say(f"throughput: harvest of {SMALL_FILES} small files against tar over ssh and cp")
    sub = f"{st.workdir}/small"
    guest = ssh.Guest.connect(st)
    # Only the small files: the big one of measure_throughput goes first.
    status, _, err = guest.run(f"rm -f {shlex.quote(st.workdir)}/big.bin && "
                               f"mkdir -p {shlex.quote(sub)} && cd {shlex.quote(sub)} && "
                               f"i=0; while [ $i -lt {SMALL_FILES} ]; do echo $i > f$i; "
                               "i=$((i+1)); done && sync", timeout=600)
    guest.close()
    if status != 0:
        raise SiteError(f"cannot write small files in the guest: {err[-200:]!r}",
                        "check the guest's disk")
    t0 = time.monotonic()
    r = transfer.harvest(b.cfg, st, timeout=600)
    harvest_s = time.monotonic() - t0
    if r.files < SMALL_FILES:
        raise SiteError(f"harvest copied {r.files} of {SMALL_FILES} files", "check transfer")
    dest = b._udir("tar")
    ssh_cmd = " ".join(shlex.quote(a) for a in b.ssh_argv(
        st.port, st.key_path, kh, f"tar -C {shlex.quote(st.workdir)} -cf - ."))
    t0 = time.monotonic()
    subp.run(["sh", "-c", f"{ssh_cmd} | tar -C {shlex.quote(dest)} -xf -"], timeout=600)
    tar_s = time.monotonic() - t0
    cp_dest = b._udir("cp")
    t0 = time.monotonic()
    subp.run(["cp", "-a", os.path.join(st.host_workdir, "small"), cp_dest], timeout=600)
    cp_s = time.monotonic() - t0
    return {"small_harvest_s": harvest_s, "small_tar_s": tar_s, "small_cp_s": cp_s}


def measure_mounted(b):
    """The mounted data path: a guest writing many small files and one big file
    into its virtio-fs working directory (which is the host's), against the same
    commands run natively on the host as the same user, and native cp."""
    from vmwn import ssh
    _say("mounted: guest writes into its host directory, against the same on the host")
    env = dataclasses.replace(b.cfg.environments["tiny"], data="mounted")
    work = b._udir("mounted")
    jid = f"{b.tag}-m"
    st, _, _, _ = b.create(jid, env=env, host_workdir=work)
    small = (f"mkdir -p {{d}} && cd {{d}} && i=0; while [ $i -lt {SMALL_FILES} ]; do "
             "echo $i > f$i; i=$((i+1)); done")
    big = f"dd if=/dev/zero of={{f}} bs=1M count={BIG_MIB} 2>/dev/null && sync"
    res = {}
    try:
        guest = ssh.Guest.connect(st)
        try:
            for name, cmd in (("small", small.format(d=shlex.quote(work + "/g"))),
                              ("big", big.format(f=shlex.quote(work + "/g.bin")))):
                t0 = time.monotonic()
                status, _, err = guest.run(cmd, timeout=600)
                res[f"guest_{name}_s"] = time.monotonic() - t0
                if status != 0:
                    raise SiteError(f"mounted {name}: {err[-200:]!r}", "check virtiofsd")
        finally:
            guest.close()
    finally:
        b.destroy(jid)
    if len(os.listdir(os.path.join(work, "g"))) != SMALL_FILES:
        raise SiteError("the guest's files did not reach the host", "check the mounted mode")
    for name, cmd in (("small", small.format(d=shlex.quote(work + "/h"))),
                      ("big", big.format(f=shlex.quote(work + "/h.bin")))):
        t0 = time.monotonic()
        subp.run(["su", "-s", "/bin/sh", "-c", cmd, b.user], timeout=600)
        res[f"native_{name}_s"] = time.monotonic() - t0
    t0 = time.monotonic()
    subp.run(["cp", "-a", os.path.join(work, "h"), os.path.join(work, "cp")], timeout=600)
    res["cp_small_s"] = time.monotonic() - t0
    return res


def measure_floor(b, simultaneous=1, reps=None):
    """The same kernel, initrd and devices under qemu-system-x86_64 alone, to SSH
    login: ``reps`` rounds of ``simultaneous`` guests started at once; one dict
    per guest."""
    out = []
    for i in range(reps or b.reps):
        _say(f"floor: plain QEMU{f', {simultaneous} at once' if simultaneous > 1 else ''} "
             f"{i + 1}/{reps or b.reps}")
        if simultaneous == 1:
            out.append(_floor_boot(b, f"floor{i}"))
            continue
        got, errors = [None] * simultaneous, []

        def one(k, i=i):
            try:
                got[k] = _floor_boot(b, f"floor{i}x{k}")
            except VmwnError as e:
                errors.append(e)
        threads = [threading.Thread(target=one, args=(k,)) for k in range(simultaneous)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if errors:
            raise errors[0]
        out += got
    return out


def _floor_boot(b, tag):
    """One plain QEMU guest booted to an SSH login and stopped; its timings."""
    from vmwn import keys, seed, ssh
    e = b.env
    d = os.path.join(b.root, tag)
    os.mkdir(d)
    name = f"{b.tag}-{tag}"
    hostkey, userkey = keys.generate(f"host:{name}"), keys.generate(f"job:{name}")
    key_path = keys.write_private(os.path.join(d, "id"), userkey, 0, 0)
    ctx = seed.context(job_id=name, instance_id=name, hostname=name, user=b.user,
                       uid=b.uid, gid=b.gid, group=b.group, shell=e.ssh_user_shell,
                       workdir=f"/home/{b.user}/bench", hostkey=hostkey, userkey=userkey)
    ud, md = seed.render(b.cfg.site["template_dir"], ctx)
    iso = seed.build_iso(os.path.join(d, "seed.iso"), ud, md)
    overlay = os.path.join(d, "overlay.qcow2")
    subp.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", e.image,
              overlay], timeout=60)
    port = _free_port()
    console, pidfile = os.path.join(d, "console.log"), os.path.join(d, "qemu.pid")
    argv = ["qemu-system-x86_64", "-name", name, "-machine", f"{e.machine}",
            "-accel", "tcg" if e.accel == "qemu" else "kvm", "-m", str(e.memory_mib),
            "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
            "-kernel", e.kernel, "-initrd", e.initrd, "-append", e.cmdline,
            "-drive", f"file={overlay},if=virtio,format=qcow2,discard=unmap",
            "-drive", f"file={iso},if=virtio,format=raw,readonly=on",
            "-serial", f"file:{console}",
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22",
            "-device", "virtio-net-pci,netdev=n0,addr=0x1e",
            "-object", "rng-random,id=rng0,filename=/dev/urandom",
            "-device", "virtio-rng-pci,rng=rng0",
            "-daemonize", "-pidfile", pidfile]
    watch = ConsoleWatch(console)
    t0 = time.monotonic()
    subp.run(argv, timeout=60, fix="check qemu-system-x86_64")
    t_started = time.monotonic()
    with open(pidfile, encoding="ascii") as f:
        pid = int(f.read().strip())
    b.pids.add(pid)
    st = types.SimpleNamespace(job_id=name, bind_address="127.0.0.1", port=port,
                               user=b.user, key_path=key_path,
                               host_key_public=hostkey.public_line)
    def logged_in():
        if not ssh.banner_ready("127.0.0.1", port, timeout=0.5):
            return False
        try:
            ssh.Guest.connect(st, timeout=10).close()
            return True
        except VmwnError:
            return False

    _poll_until(logged_in, t0, 0.02, "the floor guest did not answer SSH", console)
    t1 = time.monotonic()
    watch.stop()
    rss = _rss_mib(pid)
    t2 = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    while _alive(pid):  # QEMU's own exit; reaping the orphan is init's business
        time.sleep(0.005)
    b.pids.discard(pid)
    return dict(boot=t1 - t0, start=t_started - t0, rss=rss,
                kill=time.monotonic() - t2,
                console_to_login=(t1 - watch.at) if watch.at else None)


def _poll_until(probe, since, every, what, where, limit=240.0):
    """Call ``probe`` every ``every`` s until it returns True; SiteError ``limit`` s
    after ``since`` (a time.monotonic() value)."""
    while not probe():
        if time.monotonic() - since > limit:
            raise SiteError(f"{what} in {limit:.0f} s", f"see {where}")
        time.sleep(every)


def measure_naive(b):
    """cp of the base, virsh create, then OpenSSH ssh until the job's first line comes back."""
    from vmwn import keys, seed
    from vmwn.domain import render
    out = []
    e = b.env
    uri = b.cfg.site["libvirt_uri"]
    for i in range(b.reps):
        _say(f"naive: cp + virsh create + ssh {i + 1}/{b.reps}")
        d = os.path.join(b.root, f"naive{i}")
        os.mkdir(d)
        jid = f"{b.tag}-naive{i}"
        port = _free_port()
        t0 = time.monotonic()
        disk = os.path.join(d, "disk.qcow2")
        subp.run(["cp", e.image, disk], timeout=600)
        hostkey, userkey = keys.generate(f"host:{jid}"), keys.generate(f"job:{jid}")
        key_path = keys.write_private(os.path.join(d, "id"), userkey, 0, 0)
        ctx = seed.context(job_id=jid, instance_id=jid, hostname="naive", user=b.user,
                           uid=b.uid, gid=b.gid, group=b.group, shell=e.ssh_user_shell,
                           workdir=f"/home/{b.user}/bench", hostkey=hostkey, userkey=userkey)
        ud, md = seed.render(b.cfg.site["template_dir"], ctx)
        iso = seed.build_iso(os.path.join(d, "seed.iso"), ud, md)
        for p in (d, disk, iso):  # QEMU runs as the job's user (the template's seclabel)
            os.chown(p, b.uid, b.gid)
        xml = render(b.cfg, e, job_id=jid, user=b.user, job_name="naive", port=port,
                     overlay=disk, seed=iso, console_log=os.path.join(d, "console.log"))
        xml_path = os.path.join(d, "domain.xml")
        _write(xml_path, xml)
        kh = b.known_hosts(os.path.join(d, "known_hosts"), port, hostkey.public_line)
        from vmwn.domain import domain_name
        b.domains.add(domain_name(jid))
        subp.run(["virsh", "-q", "-c", uri, "create", xml_path], timeout=120)
        def answered():
            cp = subp.run(b.ssh_argv(port, key_path, kh, f"echo {MARKER}"), timeout=30,
                          check=False)
            return cp.returncode == 0 and MARKER in cp.stdout

        _poll_until(answered, t0, 0.1, "the naive guest did not answer ssh",
                    f"{d}/console.log")
        t1 = time.monotonic()
        subp.run(["virsh", "-q", "-c", uri, "destroy", domain_name(jid)], timeout=120)
        b.domains.discard(domain_name(jid))
        out.append(dict(first=t1 - t0, destroy=time.monotonic() - t1))
    return out


def make_base(path, size):
    """An empty ext4 (label vmwn-home) of ``size`` bytes as a sparse qcow2."""
    raw = path + ".raw"
    with open(raw, "wb") as f:
        f.truncate(size)
    subp.run(["mkfs.ext4", "-q", "-F", "-L", "vmwn-home", "-m", "0", "-i", "4194304",
              "-J", "size=16", "-E", "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0",
              raw], timeout=300)
    subp.run(["qemu-img", "convert", "-O", "qcow2", raw, path], timeout=600)
    os.unlink(raw)
    return path


def measure_scale(b):
    """Prologue time on a 200 MB and a 20 GB (sparse) base image."""
    res = {}
    for label, size in (("200M", 200 * 10 ** 6), ("20G", 20 * 10 ** 9)):
        base = make_base(os.path.join(b.root, f"base-{label}.qcow2"), size)
        env = dataclasses.replace(b.env, image=base)
        totals, overlays = [], []
        for i in range(b.reps):
            _say(f"image size {label}: prologue {i + 1}/{b.reps}")
            jid = f"{b.tag}-s{label}{i}"
            _, ph, _, _ = b.create(jid, env=env)
            totals.append(ph["total"])
            overlays.append(ph.get("overlay"))
            b.destroy(jid)
        res[label] = dict(total=median(totals), overlay=median(overlays))
    return res


def measure_concurrency(b, levels=(1, 2, 4)):
    """n simultaneous VM jobs through ``vmwn run``: jobs per minute, overhead per job."""
    res = {}
    for n in levels:
        _say(f"concurrency: {n} simultaneous VM job(s)")
        walls, errors = [None] * n, []

        def one(k):
            t = time.monotonic()
            try:
                b.vmwn_run(b.plain, "true.sh", ["other=vmwn=tiny"])
                walls[k] = time.monotonic() - t
            except VmwnError as e:
                errors.append(e)
        threads = [threading.Thread(target=one, args=(k,)) for k in range(n)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        total = time.monotonic() - t0
        ok = n - len(errors)
        for e in errors[:1]:
            _say(f"concurrency {n}: {len(errors)} of {n} jobs failed: {e.line()}")
        res[n] = dict(per_min=ok * 60.0 / total, per_job=median(walls), failed=len(errors))
    return res


def measure_novm(b):
    """A job without a VM: the harness with vmwn's hooks against the harness without."""
    n = 5 if b.args.quick else 9
    with_hooks, without = [], []
    for i in range(n):
        _say(f"job without VM {i + 1}/{n}")
        for node, pbs_home, acc in ((b.plain, None, with_hooks), (b.plain, b.bare, without)):
            t0 = time.monotonic()
            b.vmwn_run(node, "true.sh", pbs_home=pbs_home)
            acc.append(time.monotonic() - t0)
    # The starter alone: exec of the shell through vmwn's starter against the shell itself.
    env = {"PATH": "/bin:/usr/bin", "PBS_JOBID": f"{b.tag}-none.{b.host}"}
    st_with, st_without = [], []
    for _ in range(n):
        st_with.append(_timed([b.plain.starter, "/bin/sh"], env=env, input="true\n")[0])
        st_without.append(_timed(["/bin/sh"], env=env, input="true\n")[0])
    # The prologue alone: the installed dispatcher and steps for a plain job, against a
    # node whose prologue does nothing (/bin/true started the same way).
    prologue = os.path.join(b.plain.pbs_home, "mom_priv", "prologue")
    argv = [f"{b.tag}-none.{b.host}", "root", "root", "plain", "walltime=00:01:00",
            "batch", "", "/nonexistent.SC"]
    # pbs_mom writes the job record before the prologue runs; the gate reads it.
    jb = os.path.join(b.plain.pbs_home, "mom_priv", "jobs", f"{argv[0]}.JB")
    os.makedirs(os.path.dirname(jb), exist_ok=True)
    with open(jb, "w") as f:
        f.write("<job><attributes><Variable_List>PBS_O_WORKDIR=/tmp</Variable_List>"
                "</attributes></job>\n")
    pro_with, pro_without = [], []
    for _ in range(n):
        pro_with.append(_timed([prologue, *argv], env={"PATH": "/bin:/usr/bin"}, input="")[0])
        pro_without.append(_timed(["/bin/true", *argv], env={"PATH": "/bin:/usr/bin"},
                                  input="")[0])
    # The epilogue alone, the same way (pbs_mom's ten arguments).
    epilogue = os.path.join(b.plain.pbs_home, "mom_priv", "epilogue")
    eargv = [argv[0], "root", "root", "plain", "1234", "walltime=00:01:00",
             "cput=00:00:00", "batch", "", "0", "/nonexistent.SC"]
    epi_with, epi_without = [], []
    for _ in range(n):
        epi_with.append(_timed([epilogue, *eargv], env={"PATH": "/bin:/usr/bin"}, input="")[0])
        epi_without.append(_timed(["/bin/true", *eargv], env={"PATH": "/bin:/usr/bin"},
                                  input="")[0])
    os.unlink(jb)
    return dict(with_hooks=median(with_hooks), without=median(without),
                starter=median(st_with) - median(st_without),
                prologue=median(pro_with) - median(pro_without),
                epilogue=median(epi_with) - median(epi_without))


# ------------------------------------------------------------------- report

def frss_cold(m):
    """QEMU RSS of a cold-booted vmwn guest (the phases' median)."""
    return median(r.get("rss") for r in m.get("phases", []))


def build_rows(m):
    """Rows and the summary numbers from the measurements dict ``m``."""
    rows, s = [], {}
    jobs, phases, floor = m.get("jobs", []), m.get("phases", []), m.get("floor", [])

    def pm(key):
        return median(r["phases"].get(key) for r in phases)
    fl = median(r["boot"] for r in floor)
    rows.append(Row("floor: qemu start to SSH login", fl))
    rows.append(Row("prologue: configuration load", m.get("config_load")))
    for key in ("keys and seed", "port", "overlay", "render", "define and start",
                "boot to SSH"):
        base = None
        if key == "define and start":
            base = median(r["start"] for r in floor)
        elif key == "boot to SSH":
            base = fl
        rows.append(Row(f"prologue: {key}", pm(key), base, ratio=ratio(pm(key), base)))
    rows.append(Row("prologue: in-process total", pm("total"), fl, ratio=ratio(pm("total"), fl)))
    lag = median(r.get("ssh_detect_lag") for r in phases)
    rows.append(Row("boot: console 'ready' to SSH detected", lag,
                    median(r.get("console_to_login") for r in floor)))
    rows.append(Row("prologue hook (vmwn step)", median(j["prologue"] for j in jobs)))
    rows.append(Row("starter: connect", median(r["connect"] for r in phases)))
    rows.append(Row("starter: script and workdir transfer", median(r["transfer"] for r in phases)))
    rows.append(Row("starter: exec to first byte", median(r["exec_first"] for r in phases)))
    rows.append(Row("starter hook: start to first byte",
                    median(j["starter_first"] for j in jobs)))
    fi = median(j["first_instruction"] for j in jobs)
    s["first_floor"] = ratio(fi, fl)
    rows.append(Row("prologue start to first instruction", fi, fl, ratio=s["first_floor"],
                    goal=("<=", 1.2)))
    naive = median(r["first"] for r in m.get("naive", []))
    s["naive_vmwn"] = ratio(naive, fi)
    rows.append(Row("naive (cp+virsh+ssh) / vmwn to first instruction", fi, naive,
                    ratio=s["naive_vmwn"], goal=(">=", 1.0)))
    rows.append(Row("epilogue: destroy domain (floor: QEMU exit)",
                    median(r["destroy_libvirt"] for r in phases),
                    median(r["kill"] for r in floor)))
    rows.append(Row("epilogue: destroy total", median(r["destroy"] for r in phases),
                    median(r["destroy"] for r in m.get("naive", []))))
    rows.append(Row("epilogue hook (harvest + destroy)", median(j["epilogue"] for j in jobs)))
    rows.append(Row("whole VM job (vmwn run)", median(j["wall"] for j in jobs)))
    sc = m.get("scale", {})
    if sc:
        a, z = sc["200M"]["total"], sc["20G"]["total"]
        s["scale"] = ratio(z, a)
        rows.append(Row("prologue, 20 GB base / 200 MB base", z, a, ratio=s["scale"],
                        goal=("<=", 1.1)))
        rows.append(Row("overlay, 20 GB base / 200 MB base", sc["20G"]["overlay"],
                        sc["200M"]["overlay"], ratio=ratio(sc["20G"]["overlay"],
                                                           sc["200M"]["overlay"])))
    tp = m.get("throughput", {})
    if tp:
        s["relay_ssh"] = ratio(tp["relay"], tp["ssh"])
        rows.append(Row(f"stdout relay ({BIG_MIB} MiB) vs ssh", tp["relay"], tp["ssh"],
                        unit="MiB/s", ratio=s["relay_ssh"], goal=(">=", 0.5)))
        hv, sp = BIG_MIB / tp["harvest_s"], BIG_MIB / tp["scp_s"]
        s["harvest_scp"] = ratio(hv, sp)
        rows.append(Row(f"harvest ({BIG_MIB} MiB file) vs scp", hv, sp, unit="MiB/s",
                        ratio=s["harvest_scp"], goal=(">=", 0.5)))
        if "small_harvest_s" in tp:
            hf, tf = SMALL_FILES / tp["small_harvest_s"], SMALL_FILES / tp["small_tar_s"]
            s["harvest_tar"] = ratio(hf, tf)
            rows.append(Row(f"harvest ({SMALL_FILES} small files) vs tar over ssh", hf, tf,
                            unit="files/s", ratio=s["harvest_tar"], goal=(">=", 0.5)))
            rows.append(Row(f"native cp -a ({SMALL_FILES} small files)",
                            SMALL_FILES / tp["small_cp_s"], unit="files/s"))
    mt = m.get("mounted")
    if mt:
        gs, ns = SMALL_FILES / mt["guest_small_s"], SMALL_FILES / mt["native_small_s"]
        s["mounted_native"] = ratio(gs, ns)
        rows.append(Row(f"mounted: guest writes {SMALL_FILES} small files to the host vs "
                        "the same on the host", gs, ns, unit="files/s",
                        ratio=s["mounted_native"]))
        gb, nb = BIG_MIB / mt["guest_big_s"], BIG_MIB / mt["native_big_s"]
        rows.append(Row(f"mounted: guest writes {BIG_MIB} MiB to the host vs the same on "
                        "the host", gb, nb, unit="MiB/s", ratio=ratio(gb, nb)))
        rows.append(Row(f"native cp -a ({SMALL_FILES} small files, host)",
                        SMALL_FILES / mt["cp_small_s"], unit="files/s"))
    wm = m.get("warm")
    if wm:
        wfi = median(j["first_instruction"] for j in wm["jobs"])
        s["warm_floor"] = ratio(wfi, fl)
        rows.append(Row("warm: prologue start to first instruction", wfi, fl,
                        ratio=s["warm_floor"], goal=("<=", 0.15)))
        if wm.get("mounted_jobs"):
            wmi = median(j["first_instruction"] for j in wm["mounted_jobs"])
            s["warm_mnt_floor"] = ratio(wmi, fl)
            rows.append(Row("warm, mounted: prologue start to first instruction", wmi, fl,
                            ratio=s["warm_mnt_floor"], goal=("<=", 0.15)))
        rows.append(Row("warm / cold: prologue start to first instruction", wfi, fi,
                        ratio=ratio(wfi, fi)))
        w4 = median(j["first_instruction"] for j in wm["jobs4"])
        c4 = median(j["first_instruction"] for j in wm["cold4"])
        f4 = median(r["boot"] for r in wm["floor4"]) if wm.get("floor4") else None
        s["warm4_floor"] = ratio(w4, f4)
        rows.append(Row("warm, 4 at once: prologue start to first instruction "
                        "(floor: 4 at once)", w4, f4, ratio=s["warm4_floor"], goal=("<=", 0.25)))
        if wm.get("mounted_jobs4"):
            wm4 = median(j["first_instruction"] for j in wm["mounted_jobs4"])
            s["warm4_mnt_floor"] = ratio(wm4, f4)
            rows.append(Row("warm, mounted, 4 at once: prologue start to first instruction "
                            "(floor: 4 at once)", wm4, f4, ratio=s["warm4_mnt_floor"],
                            goal=("<=", 0.25)))
        rows.append(Row("warm / cold, 4 at once: to first instruction", w4, c4,
                        ratio=ratio(w4, c4)))
        rows.append(Row("warm: restore (QEMU start and state load)",
                        wm["phases"].get("restore"), median(r["start"] for r in floor)))
        rows.append(Row("warm: restore to SSH (personalisation)",
                        wm["phases"].get("boot to SSH"), fl))
        rows.append(Row("warm: prepare (boot, save)", wm["prepare"]))
        rows.append(Row("warm: refresh (prepare again)", wm["refresh"]))
        rows.append(Row("warm: saved state on disk", wm["state_mib"], unit="MiB"))
        rows.append(Row("warm: prepared disk on disk", wm["disk_mib"], unit="MiB"))
        rows.append(Row("warm: QEMU RSS per restored guest", wm["rss"], frss_cold(m),
                        unit="MiB", ratio=ratio(wm["rss"], frss_cold(m))))
        if wm.get("private4") and wm.get("private_booted"):
            p4 = median(wm["private4"])
            s["warm_private"] = ratio(p4, wm["private_booted"])
            rows.append(Row("warm: memory of its own per restored guest, 4 restored "
                            "(QEMU anonymous + memfd) vs a booted guest's", p4,
                            wm["private_booted"], unit="MiB", ratio=s["warm_private"],
                            goal=("<=", 0.3)))
    for n, c in sorted(m.get("concurrency", {}).items()):
        failed = f" ({c['failed']} of {n} failed)" if c.get("failed") else ""
        rows.append(Row(f"{n} simultaneous VM jobs: jobs per minute{failed}", c["per_min"],
                        unit="/min"))
        rows.append(Row(f"{n} simultaneous VM jobs: time per job", c["per_job"]))
    nv = m.get("novm")
    if nv:
        rows.append(Row("job without VM: vmwn run, hooks vs none", nv["with_hooks"],
                        nv["without"], ratio=ratio(nv["with_hooks"], nv["without"])))
        rows.append(Row("job without VM: extra of all 3 hooks (with epilogue)",
                        (nv["with_hooks"] - nv["without"]) * 1000, unit="ms"))
        rows.append(Row("job without VM: extra of the prologue", nv["prologue"] * 1000,
                        unit="ms"))
        rows.append(Row("job without VM: extra of the starter", nv["starter"] * 1000, unit="ms"))
        epi = nv.get("epilogue")
        if epi is not None:
            rows.append(Row("job without VM: extra of the epilogue", epi * 1000, unit="ms"))
        s["novm_ms"] = (nv["prologue"] + nv["starter"] + (epi or 0.0)) * 1000
        rows.append(Row("job without VM: extra of prologue + starter"
                        + (" + epilogue" if epi is not None else ""), s["novm_ms"], unit="ms",
                        goal=("<=", 50), goal_on="value"))
    rss = median(r.get("rss") for r in phases)
    frss = median(r.get("rss") for r in floor)
    mem = m.get("memory_mib")
    if rss is not None:
        s["rss_extra"] = rss - mem
        rows.append(Row(f"QEMU RSS per guest ({mem} MiB configured)", rss, frss, unit="MiB",
                        ratio=ratio(rss, frss)))
        rows.append(Row("RSS beyond configured memory", s["rss_extra"],
                        (frss - mem) if frss is not None else None, unit="MiB"))
    return rows, s


# --------------------------------------------------------------------- main

def build_parser():
    p = argparse.ArgumentParser(prog="bench/vmwn_bench.py",
                                description="Measure vmwn's per-job overhead against "
                                "baselines measured in the same run (needs root).")
    p.add_argument("--config", default=None, help="vmwn.conf naming the tiny environment")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (2 instead of 3)")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="repetitions of each VM measurement (medians over N)")
    p.add_argument("--user", default=None,
                   help="existing unprivileged job user (default: a temporary account)")
    p.add_argument("--skip", action="append", default=[],
                   choices=("floor", "naive", "scale", "throughput", "concurrency", "novm", "warm",
                            "mounted"),
                   help="leave out a measurement (repeatable)")
    return p


def run(b):
    """Every measurement; one that fails is reported and left out, the rest go on."""
    m = {"memory_mib": b.env.memory_mib, "failed": []}
    skip = set(b.args.skip)
    t = time.monotonic()
    configmod.load(b.vm.config)
    m["config_load"] = time.monotonic() - t
    tp = {}
    steps = [("novm", lambda: measure_novm(b)), ("floor", lambda: measure_floor(b)),
             ("phases", lambda: measure_phases(b, tp if "throughput" not in skip else None)),
             ("mounted", lambda: measure_mounted(b)),
             ("jobs", lambda: measure_vm_jobs(b)), ("warm", lambda: measure_warm(b)),
             ("naive", lambda: measure_naive(b)),
             ("scale", lambda: measure_scale(b)),
             ("concurrency", lambda: measure_concurrency(b))]
    for name, fn in steps:
        if name in skip:
            continue
        try:
            m[name] = fn()
        except Exception as e:  # noqa: BLE001 - e.g. libvirtd restarted: report, go on
            line = e.line() if isinstance(e, VmwnError) else f"{type(e).__name__}: {e}"
            _say(f"{name} not measured: {line}")
            m["failed"].append(f"{name}: {line}")
    m["throughput"] = tp
    return m


def _interrupt(signum, frame):
    """SIGTERM ends the run like Ctrl-C: through the cleanup."""
    raise KeyboardInterrupt


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        print("bench: --jobs must be at least 1", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("bench: must run as root (it starts VMs and plays pbs_mom); run it with sudo",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    old_term = signal.signal(signal.SIGTERM, _interrupt)
    b = None
    t0 = time.monotonic()
    load = os.getloadavg()[0]
    if load > 0.5:
        _say(f"warning: load average {load:.1f} before the run; other work on this "
             "machine inflates every number")
    try:
        b = Bench(args)
        b.setup()
        m = run(b)
    except VmwnError as e:
        print(f"bench: {e.line()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        if b is not None:
            b.cleanup()
        signal.signal(signal.SIGTERM, old_term)
    rows, s = build_rows(m)
    print(format_table(rows))
    print(f"bench: {b.reps} repetitions, {time.monotonic() - t0:.0f} s in all, "
          f"load average {load:.1f} before / {os.getloadavg()[0]:.1f} after")
    for what in m["failed"]:
        print(f"bench: NOT MEASURED {what}")
    print(summary_line(s), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
