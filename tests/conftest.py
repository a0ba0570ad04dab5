"""Shared fixtures: a real unprivileged job user and a Torque node tree in /tmp.

Hooks run as root and the job starter as the job user, exactly as under
pbs_mom, so the node tree lives under a world-searchable temporary directory
(pytest's own tmp_path is private to root).
"""

import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import types

import pytest

from vmwn import netpolicy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_PY = sys.executable
TEST_USER = "vmwntest"


# The outside systems a test may reach only with its marker: programs that boot
# or reach guests, run Torque or slapd, and libvirt's real drivers.  Unit tests
# use libvirt's test:/// driver and the in-process SSH guest.
OUTSIDE_MARKERS = ("integration", "torque", "openpbs", "slapd", "slow")
OUTSIDE_PROGRAMS = frozenset((
    "qemu-system-x86_64", "virsh", "libvirtd", "virtiofsd", "ssh", "scp", "slapd",
    "pbs_server", "pbs_mom", "pbs_sched", "qsub", "qstat", "qdel", "qsig", "qrun", "qmgr"))
# Programs that change the host itself (its firewall, its accounts, its network
# namespaces): never from a unit test.  A stand-in of the same name that a test
# made in a directory of its own is not the host's and may run.
HOST_CHANGERS = frozenset((
    "iptables", "ip6tables", "iptables-legacy", "ip6tables-legacy", "nft",
    "useradd", "userdel", "usermod", "groupadd", "groupdel", "ip"))
SYSTEM_DIRS = ("/usr/sbin", "/sbin", "/usr/bin", "/bin", "/usr/local/sbin", "/usr/local/bin")


def _outside_program(args):
    """The program an argv (list or shell string) starts, if it is an outside one."""
    argv = args if isinstance(args, (list, tuple)) else str(args).split()
    path = os.fsdecode(argv[0]) if argv else ""
    name = os.path.basename(path)
    if name in OUTSIDE_PROGRAMS:
        return name
    if name in HOST_CHANGERS and (os.path.dirname(path) in ("",) + SYSTEM_DIRS):
        return name
    return None


def _unreachable_or_test(uri):
    """libvirt's test driver, or a socket that does not exist (an error-path test)."""
    if uri.startswith("test:///"):
        return True
    m = re.search(r"[?&]socket=([^&]+)", uri)
    return bool(m) and not os.path.exists(m.group(1))


@pytest.fixture(autouse=True)
def _no_outside_systems(request, monkeypatch):
    """A test without one of OUTSIDE_MARKERS fails when it starts an outside program
    or opens libvirt other than its test:/// driver: a unit test that reaches a real
    system by accident would pass or fail for reasons of its own."""
    if any(request.node.get_closest_marker(m) for m in OUTSIDE_MARKERS):
        yield
        return
    real_init = subprocess.Popen.__init__

    def popen_init(self, args, *a, **kw):
        name = _outside_program(args)
        if name:
            pytest.fail(f"{request.node.nodeid} starts {name} without a marker "
                        f"({', '.join(OUTSIDE_MARKERS)})", pytrace=False)
        real_init(self, args, *a, **kw)
    monkeypatch.setattr(subprocess.Popen, "__init__", popen_init)
    # The node's no-loopback cgroup and rules are the integration tests': a unit
    # test's teardown (a reap, a destroy) finds no cgroup v2 here, so it never takes
    # the host's for its own and runs the host's iptables to remove it (another
    # lane's no-loopback guest may just have left it empty).
    monkeypatch.setattr(netpolicy, "MOUNTINFO", os.devnull)
    try:
        import libvirt
    except ImportError:
        libvirt = None
    if libvirt is not None:
        for fn in ("open", "openReadOnly", "openAuth"):
            real = getattr(libvirt, fn)

            def guarded(uri=None, *a, _real=real, _fn=fn, **kw):
                if not _unreachable_or_test(uri or ""):
                    pytest.fail(f"{request.node.nodeid} opens libvirt {uri or '(default)'} "
                                "without a marker; unit tests use test:///", pytrace=False)
                return _real(uri, *a, **kw)
            monkeypatch.setattr(libvirt, fn, guarded)
    yield


@pytest.fixture(autouse=True)
def _fresh_logging():
    """Entry points configure logging once per process; a test is a process of its own."""
    import logging
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    configured = getattr(root, "_vmwn_configured", False)
    yield
    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.setLevel(level)
    root._vmwn_configured = configured


@pytest.fixture(scope="session", autouse=True)
def _warm_mode():
    """With VMWN_TEST_WARM=1, the shared tiny guest is prepared once for the run (the
    first worker of a parallel run prepares it, the others wait for that)."""
    import vmwn_testlib
    if not vmwn_testlib.WARM or not _is_root():
        yield
        return
    from vmwn import config, warm
    base = vmwn_testlib.qemu_reachable_dir()
    try:
        with vmwn_testlib.once_per_run("warm") as first:
            if first:
                cfg = config.load(vmwn_testlib.write_config(base))
                warm.prepare(cfg, cfg.env("tiny"), say=lambda line: None)
        _SHARED_MADE.add("warm")  # removed at the session's end (pytest_sessionfinish)
        yield
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _is_root():
    return os.geteuid() == 0


# Parallel runs (make test: pytest-xdist, --dist loadscope).  A batch system's
# tests share its one cluster, so they run in one worker (a lane), each system in
# its own; any other module's tests are a lane of their own (module fixtures, port
# ranges).  The batch systems' lanes, the longest, are handed out first.  Tests
# marked ``exclusive`` (they stop a host daemon, move the node's configuration or
# measure CPU time, which other lanes' guests would take) run alone, in make
# test's second, serial pass.
BATCH_LANES = ("torque", "openpbs", "slurm")
LANE_MODULES = {"test_torque": "torque", "test_torque_accounting": "torque",
                "test_pbs_python": "torque", "test_openpbs": "openpbs", "test_slurm": "slurm"}
_PARAM_LANE = re.compile(r"\[(torque|openpbs|slurm)\b")  # the shared scenarios' batch
# Torque's longest test, the 100,000-file copy-back (and its 10,000-file sibling),
# is a second lane on the same cluster.
TORQUE_FILES = re.compile(r"test_torque\.py::test_many_files_")
LANES_OF = {"torque": ("torque", "torque-files"), "openpbs": ("openpbs",),
            "slurm": ("slurm",)}


def lane_of(nodeid):
    if TORQUE_FILES.search(nodeid):
        return "torque-files"
    path = nodeid.split("::", 1)[0]
    module = os.path.splitext(os.path.basename(path))[0]
    if module in LANE_MODULES:
        return LANE_MODULES[module]
    m = _PARAM_LANE.search(nodeid)
    return m.group(1) if m else path


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """xdist's scope scheduling, with lanes for scopes (the controller knows nodeids
    only), handed out in collection order (the batch systems' first), and a worker's
    next lane queued only behind the last test of its lane (which a worker holds
    until it knows the next), not behind the last two."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling  # xdist is there: it calls this hook
    config.option.loadscopereorder = False

    class Lanes(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            return lane_of(nodeid)

        def _reschedule(self, node):
            if not node.shutting_down and self.workqueue and \
                    self._pending_of(self.assigned_work[node]) > 1:
                return
            super()._reschedule(node)
    return Lanes(config, log)


def pytest_collection_modifyitems(config, items):
    """Batch-system lanes first; a test marked for a batch system must be in its lane."""
    for item in items:
        marked = [name for name in BATCH_LANES if item.get_closest_marker(name)]
        lane = lane_of(item.nodeid)
        batch = [name for name, lanes in LANES_OF.items() if lane in lanes]
        if marked != batch:
            raise pytest.UsageError(f"{item.nodeid} is marked {marked or 'for no batch system'}"
                                    f" but its lane is {lane}: update LANE_MODULES in "
                                    "tests/conftest.py")
    order = {name: i for i, name in enumerate(("torque", "torque-files") + BATCH_LANES[1:])}
    items.sort(key=lambda item: order.get(lane_of(item.nodeid), len(order)))  # stable


def _xdist_worker(config):
    return hasattr(config, "workerinput")


def _utf8(text):
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@pytest.hookimpl(tryfirst=True)  # before an xdist worker sends the report on
def pytest_runtest_logreport(report):
    """Tests feed vmwn names that are not UTF-8; what they log or fail with then holds
    lone surrogates, which a worker cannot send to the controller as UTF-8."""
    report.sections = [(title, _utf8(text)) for title, text in report.sections]
    if report.longrepr is not None:
        text = str(report.longrepr)
        if _utf8(text) != text:
            report.longrepr = _utf8(text)


_DEBUG_LOG_LINES = 80  # of vmwn's own, written during a failed test, shown with it


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed batch-system test shows what vmwn's hooks, wardens and starters logged
    while it ran (torquelib.DEBUG_LOG; the other lanes' jobs are in it too, each
    line with its job id): a job that ended wrongly under a real daemon says why."""
    if call.when == "setup" and any(item.get_closest_marker(m) for m in OUTSIDE_MARKERS):
        item._vmwn_log_at = _log_size()
    outcome = yield
    report = outcome.get_result()
    start = getattr(item, "_vmwn_log_at", None)
    if not report.failed or start is None or call.when == "setup":
        return
    import torquelib
    try:
        with open(torquelib.DEBUG_LOG, "rb") as f:
            f.seek(start)
            lines = f.read(4 << 20).decode("utf-8", "backslashreplace").splitlines()
    except OSError:
        return
    if lines:
        report.sections.append(("vmwn debug log during the test",
                                "\n".join(lines[-_DEBUG_LOG_LINES:])))


def pytest_sessionstart(session):
    """The debug log is kept between runs (for whoever looks into a failure after it)
    until it grows past 64 MiB."""
    if _is_root() and not _xdist_worker(session.config) and _log_size() > 64 << 20:
        import torquelib
        os.truncate(torquelib.DEBUG_LOG, 0)


def _log_size():
    import torquelib
    try:
        return os.path.getsize(torquelib.DEBUG_LOG)
    except OSError:
        return 0


def _xdist_controller(config):
    return bool(getattr(config.option, "numprocesses", None)) and not _xdist_worker(config)


_SHARED_MADE = set()  # what this session made that a parallel run's workers share


def pytest_sessionfinish(session):
    """What the workers of a parallel run share is removed once, by the controller,
    when every worker is done (each worker's fixtures leave it in place); a serial
    session removes what it made.  (A pytest a test runs inside removes nothing.)"""
    config = session.config
    if not _is_root() or _xdist_worker(config):
        return
    import torquelib
    import vmwn_testlib
    if _xdist_controller(config) and vmwn_testlib.made_this_run("torque"):
        torquelib.take_down()
        vmwn_testlib.forget_run("torque")  # a later pass of this run brings it up again
    if (_xdist_controller(config) and vmwn_testlib.made_this_run("tinywarm")) \
            or "tinywarm" in _SHARED_MADE:  # before its environment goes
        torquelib.run([torquelib.VMWN, "warm", "drop", "tinywarm"], check=False, timeout=120)
        vmwn_testlib.forget_run("tinywarm")  # a later pass of this run prepares it again
    if _xdist_controller(config) or "envs" in _SHARED_MADE:
        torquelib.remove_test_envs()
    if vmwn_testlib.WARM and (_xdist_controller(config) or "warm" in _SHARED_MADE):
        shutil.rmtree(vmwn_testlib.WARM_DIR, ignore_errors=True)


def account_or_skip(name):
    """A test account made by scripts/test-accounts (make test does it); tests never
    make accounts: a unit test changes nothing on the host."""
    if not _is_root():
        pytest.skip(f"needs root to become the test user {name}")
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pytest.skip(f"no account {name}: run scripts/test-accounts (make test does)")


@pytest.fixture(scope="session")
def test_user():
    """The unprivileged account jobs run as."""
    return account_or_skip(TEST_USER)


@pytest.fixture
def world_tmp():
    """A temporary directory every user can search (mode 0755), removed afterwards."""
    d = tempfile.mkdtemp(prefix="vmwn-test-", dir="/tmp")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def starter_python():
    """An interpreter the test user may execute (the venv's may sit under /root)."""
    from vmwn.torque.install import others_can_execute
    for cand in (VENV_PY, "/usr/bin/python3"):
        if others_can_execute(cand):
            return cand
    pytest.skip("no Python interpreter is executable by unprivileged users")


def user_python_path():
    """An interpreter the job user can run, and the sys.path entries that give it vmwn."""
    from vmwn.torque.install import others_can_execute
    site = os.path.join(os.path.dirname(os.path.dirname(VENV_PY)), "lib",
                        f"python{sys.version_info[0]}.{sys.version_info[1]}", "site-packages")
    if others_can_execute(VENV_PY):
        return VENV_PY, ""
    if others_can_execute("/usr/bin/python3"):
        return "/usr/bin/python3", os.pathsep.join([REPO, site])
    pytest.skip("no interpreter the job user can run")


def write_site_config(path, root, extra_site=""):
    from vmwn_testlib import write_launcher
    os.makedirs(os.path.dirname(path), exist_ok=True)
    launcher = write_launcher(root)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"""[site]
emulator = {launcher}
state_dir = {root}/state
overlay_dir = {root}/overlays
pbs_home = {root}/torque
syslog = no
{extra_site}
[env tiny]
image = tiny/disk.qcow2
kernel = tiny/vmlinuz
initrd = tiny/initrd.img
accel = qemu
memory = 256M
max_memory = 2G
max_vcpus = 2
""")


@pytest.fixture
def node(world_tmp, test_user):
    """vmwn installed into a fresh PBS_HOME, with a site config and a submit directory."""
    root = world_tmp
    sysconfdir = os.path.join(root, "etc")
    config = os.path.join(sysconfdir, "vmwn", "vmwn.conf")
    write_site_config(config, root, extra_site="queue_defaults = vmq:tiny")
    from vmwn.torque import install
    opts = install.build_parser().parse_args(
        ["install", "--pbs-home", f"{root}/torque", "--sysconfdir", sysconfdir,
         "--prefix", f"{root}/prefix", "--python", VENV_PY,
         "--starter-python", starter_python(), "--pythonpath", REPO])
    install.install(opts)
    submit = os.path.join(root, "submit")
    os.mkdir(submit)
    os.chown(submit, test_user.pw_uid, test_user.pw_gid)
    return types.SimpleNamespace(root=root, pbs_home=f"{root}/torque",
                                 mom_priv=f"{root}/torque/mom_priv", config=config,
                                 submit=submit, user=test_user,
                                 starter=f"{root}/prefix/libexec/vmwn/job-starter")


@pytest.fixture(scope="session")
def test_environments():
    """The environments the batch systems' tests use, in vmwn.conf.d for the session."""
    import torquelib
    if not _is_root():
        pytest.skip("the batch systems' tests need root")
    torquelib.write_test_envs()  # idempotent
    _SHARED_MADE.add("envs")  # removed at the session's end (pytest_sessionfinish)
    yield


@pytest.fixture(scope="session")
def prepared_tinywarm(test_environments):
    """The batch systems' tinywarm (warm, mounted), prepared once for the run with the
    installed command, as a site prepares it (the first worker of a parallel run
    prepares it, the others wait); dropped at the session's end."""
    import torquelib
    import vmwn_testlib
    vmwn_testlib.install_runtime()
    with vmwn_testlib.once_per_run("tinywarm") as first:
        if first:
            cp = torquelib.run([torquelib.VMWN, "warm", "prepare", "tinywarm"], check=False,
                               timeout=300)
            assert cp.returncode == 0, f"vmwn warm prepare tinywarm: {cp.stderr.strip()}"
    _SHARED_MADE.add("tinywarm")  # dropped at the session's end (pytest_sessionfinish)
    yield "tinywarm"


@pytest.fixture(scope="session")
def torque_cluster(request, test_user, test_environments):
    """The one-host Torque cluster with vmwn installed by 'make install' (tests/torquelib).
    A parallel run's two Torque lanes share it: the first brings it up, the
    controller takes it down once both have ended."""
    import torquelib
    import vmwn_testlib
    if not _xdist_worker(request.config):
        torquelib.bring_up()
        yield torquelib.Cluster(test_user)
        torquelib.take_down()
        return
    with vmwn_testlib.once_per_run("torque") as first:
        if first:
            torquelib.bring_up()
    yield torquelib.Cluster(test_user)
