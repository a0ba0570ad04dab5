"""The site configuration: one declared table of keys, validated on load.

Files are INI: ``/etc/vmwn/vmwn.conf`` then ``/etc/vmwn/vmwn.conf.d/*.conf`` in
name order (later files override earlier ones key by key).  Section ``[site]``
holds node-wide settings, ``[grid]`` the information-system identifiers, and
each ``[env NAME]`` section one execution environment.  Unknown sections, unknown
keys and bad values are rejected with file, key and reason, because a typo that
is silently ignored becomes a job that silently runs in the wrong place.
"""

import configparser
import dataclasses
import glob
import os
import re

from .errors import SiteError

DEFAULT_PATH = "/etc/vmwn/vmwn.conf"
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# templates/ sits beside vmwn/ in a source tree; an installed copy says where in
# [site] template_dir.
SOURCE_TEMPLATES = os.path.join(os.path.dirname(PACKAGE_DIR), "templates")

ENV_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,31}$")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _size(text, plain, example):
    """Bytes of a size such as '512M', '2GiB' or '4096'; a number without a unit is
    in ``plain`` (a key of _UNITS, or '' for bytes)."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"{text!r} is not a size such as {example}")
    n, unit = int(m.group(1)), m.group(2).lower() or plain
    return n * _UNITS.get(unit, 1)


def parse_size_mib(text):
    """'256', '256M', '2G', '2GiB', '512mb' -> MiB (plain numbers are MiB)."""
    b = _size(text, "m", "512M or 2G")
    if b and b < 1 << 20:
        raise ValueError(f"{text!r} is less than 1 MiB")
    return b >> 20


def parse_bytes(text):
    """'100M', '2G', '4096' (bytes) -> bytes."""
    return _size(text, "", "100M or 2G")


def _int_range(lo, hi):
    def conv(text):
        v = int(str(text).strip())
        if not lo <= v <= hi:
            raise ValueError(f"{v} is outside {lo}..{hi}")
        return v
    return conv


def _seconds(text):
    v = float(str(text).strip())
    if v <= 0:
        raise ValueError("must be a positive number of seconds")
    return v


def _bool(text):
    t = str(text).strip().lower()
    if t in ("1", "yes", "true", "on"):
        return True
    if t in ("0", "no", "false", "off"):
        return False
    raise ValueError(f"{text!r} is not yes/no")


def _port_range(text):
    m = re.match(r"^\s*(\d+)\s*-\s*(\d+)\s*$", str(text))
    if not m:
        raise ValueError(f"{text!r} is not a range such as 40000-40999")
    lo, hi = int(m.group(1)), int(m.group(2))
    if not 1024 <= lo <= hi <= 65535:
        raise ValueError("ports must satisfy 1024 <= low <= high <= 65535")
    return (lo, hi)


def _loopback(text):
    t = str(text).strip()
    if not (t.startswith("127.") or t == "::1"):
        raise ValueError("forwarded SSH ports bind to loopback only (127.0.0.0/8 or ::1)")
    return t


def _choice(*allowed):
    def conv(text):
        t = str(text).strip()
        if t not in allowed:
            raise ValueError(f"{t!r} is not one of {', '.join(allowed)}")
        return t
    return conv


def _str(text):
    return str(text).strip()


NETWORKS = ("open", "no-loopback", "none")


def _network(text):
    t = str(text).strip()
    return "open" if t == "user" else _choice(*NETWORKS)(t)  # 'user': the one value of old


def _abspath(text):
    t = str(text).strip()
    if not t.startswith("/"):
        raise ValueError("must be an absolute path")
    return os.path.normpath(t)


def _auto_or_abspath(text):
    t = str(text).strip()
    return t if t == "auto" else _abspath(t)


def _path_list(text):
    """'/home /scratch' (spaces or commas) -> ('/home', '/scratch'), each absolute."""
    out = []
    for item in filter(None, re.split(r"[\s,]+", str(text))):
        p = _abspath(item)
        if p == "/":
            raise ValueError("'/' cannot be shared; name the directories")
        out.append(p)
    return tuple(out)


def _queue_map(text):
    """'batch:tiny, grid:debian12' -> {'batch': 'tiny', 'grid': 'debian12'}."""
    out = {}
    for item in filter(None, (s.strip() for s in str(text).split(","))):
        if ":" not in item:
            raise ValueError(f"{item!r} is not QUEUE:ENV")
        q, e = (s.strip() for s in item.split(":", 1))
        out[q] = e
    return out


@dataclasses.dataclass(frozen=True)
class Key:
    name: str
    default: object
    convert: object
    doc: str


def _k(name, default, convert, doc):
    return Key(name, default, convert, doc)


# The declared table.  ``None`` as default means "unset"; the docs column is
# printed by ``vmwn check --keys`` and copied into docs/admin-guide.md.
SITE_KEYS = {k.name: k for k in [
    _k("state_dir", "/var/lib/vmwn/jobs", _abspath,
       "Per-job state records, keys and seeds live in STATE_DIR/<jobid>/."),
    _k("image_dir", "/var/lib/vmwn/images", _abspath,
       "Base images, kernels and initrds; relative image paths are resolved here."),
    _k("overlay_dir", "/var/lib/vmwn/overlays", _abspath,
       "Per-job copy-on-write overlays (one qcow2 per job)."),
    _k("warm_dir", "/var/lib/vmwn/warm", _abspath,
       "Prepared guests of environments with warm = on (WARM_DIR/<env>/)."),
    _k("template_dir", SOURCE_TEMPLATES, _abspath,
       "Jinja2 templates for domain XML and cloud-init seeds."),
    _k("libvirt_uri", "qemu:///system", _str, "libvirt connection URI."),
    _k("bind_address", "127.0.0.1", _loopback,
       "Host address of forwarded guest SSH ports (loopback only)."),
    _k("port_range", (40000, 40999), _port_range,
       "TCP ports on bind_address handed to per-job SSH forwards."),
    _k("boot_timeout", 90.0, _seconds, "Seconds a guest may take to answer SSH."),
    _k("boot_attempts", 3, _int_range(1, 10),
       "Boots tried per job (a failed boot is retried with a doubling back-off from 2 s)."),
    _k("max_parallel_boots", 0, _int_range(0, 1024),
       "Guests booting at once on this node; more wait their turn (0: number of host CPUs)."),
    _k("start_attempts", 3, _int_range(1, 10),
       "Starts of a job that failed in a way that may pass (the batch system starts it again) "
       "before the job is refused instead."),
    _k("prologue_deadline", 240.0, _seconds,
       "Seconds the prologue may take in all; keep it below $prologalarm - 10."),
    _k("max_vcpus", 0, _int_range(0, 4096),
       "Most vCPUs one job's guest may have on this node (0: number of host CPUs)."),
    _k("max_memory", "0", _str,
       "Most memory one job's guest may have, such as 16G (0: 90% of host memory)."),
    _k("queue_defaults", {}, _queue_map,
       "Environment for jobs of a queue that request none: 'QUEUE:ENV, ...'."),
    _k("stage_in_max", "1G", _str,
       "Largest PBS_O_WORKDIR copied into the guest at job start."),
    _k("harvest_max", "10G", _str,
       "Most bytes the epilogue copies back from the guest's working directory."),
    _k("shared_paths", (), _path_list,
       "Host directories every mounted-mode guest also sees at the same path, such as "
       "'/scratch /cvmfs' (those missing on a node are skipped)."),
    _k("virtiofsd", "auto", _auto_or_abspath,
       "The virtio-fs daemon that serves mounted directories (as the job user): the Rust "
       "virtiofsd (Debian 13) or QEMU's C one (QEMU 7.2 and older, Debian 12), told apart "
       "by its --version; 'auto' is the first of /usr/libexec/virtiofsd and "
       "/usr/lib/qemu/virtiofsd that exists."),
    _k("emulator", "/usr/local/libexec/vmwn/qemu", _abspath,
       "vmwn's QEMU launcher (written by vmwn install): libvirt runs it as the job's user; "
       "QEMU runs under an anchor process whose session the job starter has pbs_mom adopt."),
    _k("qemu", "/usr/bin/qemu-system-x86_64", _abspath, "The QEMU binary the launcher runs."),
    _k("job_network_port", 4789, _int_range(1, 65535),
       "UDP port of the VXLAN segments that join the guests of a job on several nodes "
       "(between the nodes' addresses; vmwn/jobnet.py)."),
    _k("job_secret", "/etc/vmwn/job-secret", _abspath,
       "A file only root reads, the same on every node (32 random bytes or more): the "
       "guests of a job on several nodes get host and login keys derived from it, so "
       "each knows the others'."),
    _k("job_network_mtu", 1450, _int_range(576, 9000),
       "MTU of the guests' card on their job's network: the nodes' MTU less 50 (VXLAN)."),
    _k("pbs_home", "/var/spool/torque", _abspath, "Torque's PBS_HOME on this node."),
    _k("syslog", True, _bool, "Send one line per lifecycle step to syslog (LOG_DAEMON)."),
    _k("debug_log", None, _abspath, "Also append DEBUG lines to this file."),
]}

GRID_KEYS = {k.name: k for k in [
    _k("site_name", "UNKNOWN-SITE", _str, "GLUE site name."),
    _k("ce_id", None, _str,
       "GLUE CE unique id, such as ce.example.org:2119/jobmanager-pbs-batch."),
    _k("cluster", None, _str, "GLUE cluster unique id (usually the CE host name)."),
    _k("subcluster", None, _str, "GLUE subcluster unique id."),
    _k("computing_manager", None, _str, "GLUE 2 computing manager id."),
    _k("computing_service", None, _str, "GLUE 2 computing service id."),
]}

ENV_KEYS = {k.name: k for k in [
    _k("description", "", _str, "One line shown to users and brokers."),
    _k("image", None, _str,
       "Base disk image (qcow2), absolute or relative to image_dir; never written."),
    _k("kernel", None, _str, "Kernel for direct boot, absolute or relative to image_dir."),
    _k("initrd", None, _str, "Initrd for direct boot, absolute or relative to image_dir."),
    _k("cmdline", "console=ttyS0 no_timer_check", _str,
       "Kernel command line for direct boot (no_timer_check: Linux's boot-time timer check "
       "panics a guest whose vCPU is starved, as TCG's is on a busy host)."),
    _k("template", "domain.xml.j2", _str, "Domain template file in template_dir."),
    _k("accel", "kvm", _choice("kvm", "qemu"),
       "Domain type: kvm (hardware) or qemu (TCG software emulation)."),
    _k("network", "open", _network,
       "What the guest may reach (QEMU user networking, connections made as the job's "
       "user): 'open' (anything the job's user can reach, the host's loopback services "
       "included, through 10.0.2.2), 'no-loopback' (the same but no host loopback "
       "service) or 'none' (nothing; vmwn's SSH forward into the guest only)."),
    _k("machine", "pc", _str, "QEMU machine type."),
    _k("vcpus", 1, _int_range(1, 4096), "vCPUs when the job does not say."),
    _k("max_vcpus", 4, _int_range(1, 4096), "Most vCPUs a job may get in this environment."),
    _k("memory", "512M", _str, "Memory when the job does not say."),
    _k("max_memory", "4G", _str, "Most memory a job may get in this environment."),
    _k("data", "mounted", _choice("mounted", "copy"),
       "How the job's files reach the guest: 'mounted' (virtio-fs: working directory, home "
       "and [site] shared_paths at their host paths) or 'copy' (copied in at start, harvested "
       "by the epilogue)."),
    _k("output_dir", "workdir", _str,
       "Where job output lives in the guest: 'workdir' (the path of PBS_O_WORKDIR) "
       "or an absolute guest path."),
    _k("boot_timeout", None, _seconds, "Overrides [site] boot_timeout for this environment."),
    _k("ssh_user_shell", "/bin/sh", _abspath, "Shell of the job user inside the guest."),
    _k("warm", False, _bool,
       "Restore jobs' guests from a prepared, saved guest instead of booting them "
       "('vmwn warm prepare ENV'; docs/performance.md), in either data mode.  Needs a "
       "kernel booted by vmwn and a guest that implements vmwn.warm=1 (the bundled tiny)."),
]}


@dataclasses.dataclass(frozen=True)
class Environment:
    name: str
    description: str
    image: str
    kernel: str
    initrd: str
    cmdline: str
    template: str
    accel: str
    network: str
    machine: str
    vcpus: int
    max_vcpus: int
    memory_mib: int
    max_memory_mib: int
    output_dir: str
    boot_timeout: float
    ssh_user_shell: str
    data: str = "mounted"
    warm: bool = False

    def artefacts(self):
        """The files this environment needs on the node, as (role, path)."""
        return [(r, p) for r, p in (("image", self.image), ("kernel", self.kernel),
                                    ("initrd", self.initrd)) if p]

    def missing(self):
        """Paths of required files that do not exist (empty when bootable)."""
        return [p for _, p in self.artefacts() if not os.path.isfile(p)]


@dataclasses.dataclass(frozen=True)
class Config:
    site: dict
    grid: dict
    environments: dict
    files: tuple

    def __getattr__(self, name):
        site = self.__dict__.get("site", {})
        if name in site:
            return site[name]
        raise AttributeError(name)

    def env(self, name):
        """The environment called ``name``; unknown names are the user's mistake."""
        from .errors import UserError
        if name in self.environments:
            return self.environments[name]
        known = ", ".join(sorted(n for n, e in self.environments.items()
                                 if not e.missing())) or "none installed on this node"
        raise UserError(f"unknown vmwn environment {name!r}",
                        f"request one of: {known}")

    @property
    def max_vcpus_node(self):
        return self.site["max_vcpus"] or (os.cpu_count() or 1)

    @property
    def max_memory_node_mib(self):
        v = parse_size_mib(self.site["max_memory"])
        if v:
            return v
        try:
            pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return 1 << 20
        return int(pages * 0.9) >> 20


def default_path():
    return os.environ.get("VMWN_CONFIG") or DEFAULT_PATH


def config_files(path):
    files = [path] if os.path.isfile(path) else []
    files += sorted(glob.glob(os.path.join(path + ".d", "*.conf")))
    return files


def _convert(key, raw, where):
    try:
        return key.convert(raw)
    except (ValueError, TypeError) as e:
        raise SiteError(f"{where}: bad value for {key.name}: {e}",
                        "fix the configuration file") from None


def load(path=None, required=True):
    """Read and validate the configuration.  Raises SiteError naming file and key."""
    path = path or default_path()
    files = config_files(path)
    if not files and required:
        raise SiteError(f"no vmwn configuration at {path}",
                        "run 'make install' or point VMWN_CONFIG at a vmwn.conf")
    site_raw, grid_raw, env_raw, origin = {}, {}, {}, {}
    for f in files:
        cp = configparser.ConfigParser(interpolation=None, default_section="\0none")
        cp.optionxform = str
        try:
            with open(f, encoding="utf-8") as fh:
                cp.read_file(fh, source=f)
        except (configparser.Error, UnicodeDecodeError, OSError) as e:
            raise SiteError(f"{f}: cannot parse: {' '.join(str(e).split())}",
                            "fix the configuration file") from None
        for sect in cp.sections():
            if sect == "site":
                table, target = SITE_KEYS, site_raw
            elif sect == "grid":
                table, target = GRID_KEYS, grid_raw
            elif sect.startswith("env "):
                name = sect[4:].strip()
                if not ENV_NAME_RE.match(name):
                    raise SiteError(f"{f}: [{sect}]: environment names are 1-32 characters "
                                    "of a-z 0-9 _ . - starting with a letter or digit",
                                    "rename the section")
                table, target = ENV_KEYS, env_raw.setdefault(name, {})
                origin.setdefault((sect, None), f)
            else:
                raise SiteError(f"{f}: unknown section [{sect}]",
                                "use [site], [grid] or [env NAME]")
            for k, v in cp.items(sect):
                if k not in table:
                    raise SiteError(f"{f}: [{sect}]: unknown key {k!r}",
                                    f"known keys: {', '.join(sorted(table))}")
                target[k] = v
                origin[(sect, k)] = f
    site = {k.name: k.default for k in SITE_KEYS.values()}
    for k, v in site_raw.items():
        site[k] = _convert(SITE_KEYS[k], v, f"{origin[('site', k)]}: [site]")
    for k in ("stage_in_max", "harvest_max"):
        _convert(Key(k, None, parse_bytes, ""), site[k], "[site]")
    _convert(Key("max_memory", None, parse_size_mib, ""), site["max_memory"], "[site]")
    grid = {k.name: k.default for k in GRID_KEYS.values()}
    for k, v in grid_raw.items():
        grid[k] = _convert(GRID_KEYS[k], v, f"{origin[('grid', k)]}: [grid]")
    envs = {}
    for name, raw in env_raw.items():
        envs[name] = _environment(name, raw, site, origin)
    for q, e in site["queue_defaults"].items():
        if e not in envs:
            raise SiteError(f"{origin.get(('site', 'queue_defaults'), path)}: [site]: "
                            f"queue_defaults names unknown environment {e!r} for queue {q!r}",
                            "define [env %s] or fix queue_defaults" % e)
    return Config(site=site, grid=grid, environments=envs, files=tuple(files))


def _environment(name, raw, site, origin):
    sect = f"env {name}"
    def where(k):
        return f"{origin.get((sect, k), origin.get((sect, None), '?'))}: [{sect}]"

    v = {k.name: k.default for k in ENV_KEYS.values()}
    for k, val in raw.items():
        v[k] = _convert(ENV_KEYS[k], val, where(k))
    for k in ("memory", "max_memory"):
        v[k] = _convert(Key(k, None, parse_size_mib, ""), v[k], where(k))
        if v[k] < 1:
            raise SiteError(f"{where(k)}: bad value for {k}: must be at least 1M",
                            "fix the configuration file")
    if not v["image"] and not v["kernel"]:
        raise SiteError(f"{where('image')}: environment {name!r} has neither image nor kernel",
                        "set image = BASE.qcow2 and/or kernel/initrd")
    if bool(v["initrd"]) and not v["kernel"]:
        raise SiteError(f"{where('initrd')}: initrd without kernel", "set kernel too")
    if v["vcpus"] > v["max_vcpus"]:
        raise SiteError(f"{where('vcpus')}: vcpus {v['vcpus']} exceeds max_vcpus {v['max_vcpus']}",
                        "lower vcpus or raise max_vcpus")
    if v["memory"] > v["max_memory"]:
        raise SiteError(f"{where('memory')}: memory exceeds max_memory",
                        "lower memory or raise max_memory")
    if v["output_dir"] != "workdir" and not v["output_dir"].startswith("/"):
        raise SiteError(f"{where('output_dir')}: output_dir must be 'workdir' or absolute",
                        "fix output_dir")

    if v["warm"] and not v["kernel"]:
        raise SiteError(f"{where('warm')}: warm = on needs a kernel booted by vmwn "
                        "(its guest must implement vmwn.warm=1)", "set kernel or warm = off")

    def resolve(p):
        return None if not p else (p if p.startswith("/") else os.path.join(site["image_dir"], p))

    return Environment(
        name=name, description=v["description"], image=resolve(v["image"]),
        kernel=resolve(v["kernel"]), initrd=resolve(v["initrd"]), cmdline=v["cmdline"],
        template=v["template"], accel=v["accel"], network=v["network"],
        machine=v["machine"], vcpus=v["vcpus"], max_vcpus=v["max_vcpus"],
        memory_mib=v["memory"], max_memory_mib=v["max_memory"], output_dir=v["output_dir"],
        boot_timeout=v["boot_timeout"] or site["boot_timeout"],
        ssh_user_shell=v["ssh_user_shell"], data=v["data"], warm=v["warm"])
