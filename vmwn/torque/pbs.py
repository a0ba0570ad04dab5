"""What Torque tells a hook about a job: argv, resource strings, the .JB job record.

pbs_mom calls the prologue and epilogue families with fixed argv positions and a
minimal environment (docs/admin-guide.md); everything else about the job lives in
the job record ``$PBS_HOME/mom_priv/jobs/<prefix>.JB`` on the mother superior,
or on the server (pbs_python, optional).  This module only parses: it imports
nothing beyond the standard library, so a hook for a job without a VM stays cheap.
"""

import contextlib
import dataclasses
import logging
import os
import re
import socket
import xml.etree.ElementTree as ET

from .. import jobrun
from ..errors import SiteError, UserError

log = logging.getLogger(__name__)

DEFAULT_PROLOGALARM = 300  # seconds; pbs_mom's default for $prologalarm
ALARM_MARGIN = 10          # the mom fires its alarm at $prologalarm - 10


@dataclasses.dataclass(frozen=True)
class PrologueArgs:
    """argv of prologue, prologue.parallel (and prologue.user)."""
    job_id: str
    user: str
    group: str
    job_name: str
    resources: str
    queue: str
    account: str
    script: str  # "" before Torque 5.1.3/6.0.2


@dataclasses.dataclass(frozen=True)
class EpilogueArgs:
    """argv of epilogue, epilogue.parallel (and epilogue.user)."""
    job_id: str
    user: str
    group: str
    job_name: str
    session_id: int
    resources: str
    resources_used: str
    queue: str
    account: str
    exit_status: int
    script: str


def _need(argv, n, family):
    if len(argv) < n:
        raise SiteError(f"{family} called with {len(argv)} arguments, expected at least {n}",
                        "install the vmwn dispatcher as pbs_mom's prologue/epilogue")


def parse_prologue_argv(argv):
    """``argv`` without argv[0]: $1 job id ... $7 account, $8 script path (optional)."""
    _need(argv, 7, "prologue")
    a = list(argv) + [""]
    return PrologueArgs(job_id=a[0], user=a[1], group=a[2], job_name=a[3], resources=a[4],
                        queue=a[5], account=a[6], script=a[7])


def _int(text, what):
    try:
        return int(str(text).strip())
    except ValueError:
        raise SiteError(f"epilogue {what} {text!r} is not a number",
                        "install the vmwn dispatcher as pbs_mom's epilogue") from None


def parse_epilogue_argv(argv):
    """``argv`` without argv[0]: $1 job id ... $10 exit status, $11 script path (optional)."""
    _need(argv, 10, "epilogue")
    a = list(argv) + [""]
    return EpilogueArgs(job_id=a[0], user=a[1], group=a[2], job_name=a[3],
                        session_id=_int(a[4], "session id"), resources=a[5],
                        resources_used=a[6], queue=a[7], account=a[8],
                        exit_status=_int(a[9], "exit status"), script=a[10])


def parse_resources(text):
    """``'nodes=1:ppn=2,walltime=01:00:00,other=vmwn=x'`` -> dict (later pairs win).

    Pairs are joined by ``,``; a value may itself hold ``:`` ``+`` ``=``, so only
    the first ``=`` separates name from value.  Entries without ``=`` are kept
    with an empty value.
    """
    out = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, _, value = item.partition("=")
        out[name.strip()] = value.strip()
    return out


@dataclasses.dataclass(frozen=True)
class NodeSpec:
    """One ``+``-separated part of a ``nodes`` request: a count or a host name."""
    count: int
    host: str
    ppn: int
    properties: tuple


def parse_nodes(text):
    """``'2:ppn=4+node7:ppn=1:gpus=1'`` -> [NodeSpec, ...]."""
    parts = []
    for part in (text or "").split("+"):
        part = part.strip()
        if not part:
            continue
        fields = part.split(":")
        head, rest = fields[0], fields[1:]
        count, host = (int(head), "") if head.isdigit() else (1, head)
        ppn, props = 1, []
        for f in rest:
            name, eq, value = f.partition("=")
            if name == "ppn" and eq:
                if not value.isdigit() or int(value) < 1:
                    raise UserError(f"nodes request {text!r} has a bad ppn {value!r}",
                                    "ask for nodes=1:ppn=N with N >= 1")
                ppn = int(value)
            else:
                props.append(f)
        parts.append(NodeSpec(count=count, host=host, ppn=ppn, properties=tuple(props)))
    return parts


# Torque sizes: an integer, an optional multiplier k m g t p (powers of 1024) and
# an optional unit b (bytes, the default) or w (words of 8 bytes).
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgtp]?)([bw]?)\s*$", re.IGNORECASE)


def size_bytes(text):
    """``'4gb'`` -> 4294967296; ``'100mw'`` -> words; bad sizes are the user's mistake."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise UserError(f"{text!r} is not a Torque size", "write sizes like 512mb or 4gb")
    n = int(m.group(1)) << (10 * "_kmgtp".index(m.group(2).lower() or "_"))
    return n * (8 if m.group(3).lower() == "w" else 1)


def seconds(text):
    """Torque durations: ``SS``, ``MM:SS`` or ``HH:MM:SS`` (``[[HH:]MM:]SS``) -> seconds."""
    total = 0
    for f in str(text).strip().split(":"):
        if not f.isdigit():
            raise UserError(f"{text!r} is not a duration", "write durations like 01:30:00")
        total = total * 60 + int(f)
    return total


def split_variable_list(text):
    """Variable_List ``'A=1,B=x\\,y'`` -> {'A': '1', 'B': 'x,y'}.

    Torque joins ``NAME=value`` pairs with ``,`` and escapes commas inside values
    with a backslash; a backslash before any other character is kept as it is.
    (The form vmwn run writes into .JB records; pbs_mom's own has no escapes.)
    """
    return _split_pairs(text, escapes=",")


def split_server_variable_list(text):
    """Variable_List as pbs_server sends it: ``,`` joins pairs, ``\\`` escapes any character.

    (pbs_server escapes ``,`` ``"`` ``'`` ``\\`` and newlines; its own decoder
    drops a backslash before any character.)
    """
    return _split_pairs(text, escapes=None)


def _split_pairs(text, escapes):
    """Split ``NAME=value`` pairs at unescaped commas; a backslash escapes the
    characters in ``escapes`` (None: any character) and is kept before others."""
    out, cur, items, i, text = {}, [], [], 0, text or ""
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and (escapes is None or text[i + 1] in escapes):
            cur.append(text[i + 1])
            i += 2
            continue
        if c == ",":
            items.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    items.append("".join(cur))
    for item in items:
        if item:
            name, _, value = item.partition("=")
            out[name] = value
    return out


def join_variable_list(variables):
    """The inverse of :func:`split_variable_list` (commas in values escaped)."""
    return ",".join(f"{k}={str(v).replace(',', chr(92) + ',')}" for k, v in variables.items())


@dataclasses.dataclass
class JobRecord:
    """What vmwn needs from a job record: its variables and its Resource_List."""
    variables: dict
    resources: dict
    attributes: dict


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 on /dev/null for a C library that writes there itself."""
    saved = os.dup(2)
    nul = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(nul, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(nul)


RECORD, SCRIPT = ".JB", ".SC"  # the suffixes of pbs_mom's job files


def jobs_dir(pbs_home):
    """pbs_mom's directory of job files: ``<prefix>.JB`` (the job record), ``.SC``
    (the script), ``.TK`` (tasks).  The one place that names it."""
    return os.path.join(pbs_home, "mom_priv", "jobs")


def job_file(pbs_home, prefix, suffix):
    """``<jobs_dir>/<prefix><suffix>``: a job file as pbs_mom names it."""
    return os.path.join(jobs_dir(pbs_home), prefix + suffix)


def job_record_path(pbs_home, job_id, script=""):
    """The .JB path: beside the .SC named by argv (the true prefix), else by job id."""
    if script and script.endswith(SCRIPT):
        return script[:-len(SCRIPT)] + RECORD
    return job_file(pbs_home, job_id, RECORD)


def is_job_script(pbs_home, path):
    """True for an existing regular file ``<jobs_dir>/NAME.SC``: what pbs_mom names on
    its job starter's stdin."""
    return jobrun.is_spool_file(jobs_dir(pbs_home), SCRIPT, path)


class MomJobs:
    """Which jobs pbs_mom still holds, from ``mom_priv/jobs`` (and pbs_python if present).

    The directory is read at the first question, so that a reap with nothing to
    judge never reads it, and a missing directory fails the reap that asks
    (``SiteError``), not whoever made this object.
    """

    def __init__(self, pbs_home):
        self.dir = jobs_dir(pbs_home)
        self.prefixes = self.ids = None
        self.host = socket.gethostname().split(".")[0]

    def read(self):
        """Read the directory now (``SiteError`` if it is missing); returns self."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            raise SiteError(f"{self.dir} does not exist, so vmwn cannot tell which jobs "
                            "are still on this node", "set [site] pbs_home or pass "
                            "--pbs-home") from None
        self.prefixes = {n[:-3] for n in names if n.endswith((RECORD, SCRIPT))}
        self.ids = set()
        for n in names:
            if n.endswith(RECORD):
                self.ids.update(self._record_ids(os.path.join(self.dir, n)))
        return self

    @staticmethod
    def _record_ids(path):
        """Job ids named inside a .JB record (the prefix may be shortened by Torque)."""
        try:
            with open(path, "rb") as f:
                root = ET.fromstring(f.read(1 << 20))
        except (OSError, ET.ParseError):
            return set()
        return {t.strip() for t in (root.findtext("jobid"), root.findtext("jobid_")) if t}

    def present(self, job_id):
        if self.prefixes is None:
            self.read()
        if job_id in self.prefixes or job_id in self.ids:
            return True
        return self._server_says_here(job_id)

    def _server_says_here(self, job_id):
        """True when pbs_python is installed and the server runs the job on this host
        (its mother superior or one of its sisters)."""
        attrs = _server_attributes(job_id, ("job_state", "exec_host"))
        if attrs is None:
            log.info("pbs_python cannot tell; job %s judged by the mom's files alone", job_id)
            return False
        return attrs.get("job_state") in ("R", "E") and \
            self.host in (h.split(".")[0] for h in exec_hosts(attrs.get("exec_host", "")))


def read_job_record(path):
    """Parse Torque's XML job record (4.5+).  Missing file -> None."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise SiteError(f"cannot read job record {path}: {e.strerror}",
                        "check permissions of mom_priv/jobs") from None
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise SiteError(f"job record {path} is not XML: {e}",
                        "vmwn reads Torque 4.5+ XML job records") from None
    attrs = root.find("attributes")
    if attrs is None:
        attrs = root
    attributes, resources = {}, {}
    for el in attrs:
        if el.tag == "Resource_List":
            for r in el:
                resources[r.tag] = (r.text or "").strip()
        else:
            attributes[el.tag] = el.text or ""
    variables = split_variable_list(attributes.get("Variable_List", ""))
    return JobRecord(variables=variables, resources=resources, attributes=attributes)


def server_variables(job_id):
    """Variable_List from the server via pbs_python, or None when unavailable.

    Root on the server host always may read it; root on another mom host must
    be one of the server's operators or managers (docs/admin-guide.md).
    """
    value = _server_attribute(job_id, "Variable_List")
    return None if value is None else split_server_variable_list(value)


def server_exec_hosts(job_id):
    """The job's hosts in the server's order (``exec_host``, the mother superior
    first, each host once), or None when pbs_python cannot tell."""
    value = _server_attribute(job_id, "exec_host")
    return None if value is None else exec_hosts(value)


def exec_hosts(value):
    """``'tq2/0-1+tq1/0'`` -> ``['tq2', 'tq1']``."""
    out = []
    for part in value.split("+"):
        host = part.strip().split("/")[0]
        if host and host not in out:
            out.append(host)
    return out


def _server_attribute(job_id, name):
    """One attribute of the job from the server via pbs_python, or None."""
    attrs = _server_attributes(job_id, (name,))
    return None if attrs is None else attrs.get(name)


def _server_attributes(job_id, names):
    """The job's attributes ``names`` from the server via pbs_python ({name: value}
    of those it has), or None when pbs_python is missing or cannot ask."""
    try:
        import pbs  # noqa: PLC0415 - optional, needs libtorque
    except ImportError:
        return None
    conn = -1
    try:
        with _quiet_stderr():  # libtorque prints connection failures: fd 2 is the job's .e
            conn = pbs.pbs_connect(pbs.pbs_default())
        if conn < 0:
            log.warning("pbs_python cannot reach pbs_server for %s", job_id)
            return None
        want = pbs.new_attrl(len(names))
        for i, name in enumerate(names):
            want[i].name = name
        out = {}
        for job in pbs.pbs_statjob(conn, job_id, want, None) or []:
            out.update((a.name, a.value) for a in job.attribs if a.name in names)
        return out
    except Exception as e:  # noqa: BLE001 - pbs_python raises assorted types
        log.warning("pbs_python lookup of %s failed: %s", job_id, e)
    finally:
        if conn >= 0:
            try:
                pbs.pbs_disconnect(conn)
            except Exception:  # noqa: BLE001
                pass
    return None


def job_variables(pbs_home, args):
    """The job's Variable_List: the .JB record on this node, else pbs_python, else {}."""
    rec = read_job_record(job_record_path(pbs_home, args.job_id, args.script))
    if rec is not None:
        return rec.variables
    return server_variables(args.job_id) or {}


def read_mom_config(pbs_home):
    """``mom_priv/config`` as a list of (name, value) for ``$name value`` lines."""
    path = os.path.join(pbs_home, "mom_priv", "config")
    out = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                line = line.strip()
                if line.startswith("$"):
                    name, *value = line.split(None, 1)
                    out.append((name[1:], value[0].strip() if value else ""))
    except FileNotFoundError:
        pass
    return out


def mom_setting(pbs_home, name, default=None):
    """The last value of ``$name`` in mom_priv/config (pbs_mom reads top to bottom)."""
    value = default
    for n, v in read_mom_config(pbs_home):
        if n == name:
            value = v
    return value


def prologalarm(pbs_home):
    """``$prologalarm`` in seconds (300 when unset or unreadable)."""
    v = mom_setting(pbs_home, "prologalarm")
    try:
        return int(v) if v is not None else DEFAULT_PROLOGALARM
    except ValueError:
        return DEFAULT_PROLOGALARM


def hook_alarm(pbs_home, prologalarm_seconds=None):
    """Seconds after a hook's start at which pbs_mom kills it: ``$prologalarm`` (or
    ``prologalarm_seconds``) less the mom's margin."""
    if prologalarm_seconds is None:
        prologalarm_seconds = prologalarm(pbs_home)
    return prologalarm_seconds - ALARM_MARGIN



TM_ADOPT_JOBID = 114  # tm_.h
TM_ERRORS = {17000: "pbs_mom cannot be reached (TM_ESYSTEM)",
             17002: "the connection to pbs_mom failed (TM_ENOTCONNECTED)",
             17006: "pbs_mom has no such job (TM_ENOTFOUND)",
             17007: "tm_adopt was already called in this process (TM_BADINIT)",
             17008: "the session is not the caller's (TM_EPERM)",
             999: "pbs_mom refused the adoption (TM_ERROR; see its log)"}


class AdoptFailed(SiteError):
    """pbs_mom was not told of the VM: it neither charges nor limits it."""


def adopt(job_id, pid):
    """Make pbs_mom count the session ``pid`` leads as one of the job's tasks.

    Torque's ``tm_adopt`` (what ``pbs_track -a`` calls): from then on pbs_mom
    adds the session's CPU time and memory to the job's ``resources_used``,
    checks them against the job's cput/vmem limits, and kills the session
    with the job.  The caller must own the session leader and run in the
    job (its PBS_JOBCOOKIE); libtorque is the one pbs_python was built on.
    """
    import ctypes
    if not os.environ.get("PBS_JOBCOOKIE"):
        # libtorque would spend 5 s retrying a mom that cannot know this process.
        raise AdoptFailed("no PBS_JOBCOOKIE: this process does not run in a pbs_mom job, "
                          "so the VM is not counted as the job's",
                          "run vmwn's job starter only as pbs_mom's $job_starter")
    try:
        import pbs._pbs  # noqa: F401,PLC0415 - loads libtorque through its RUNPATH
        lib = ctypes.CDLL("libtorque.so.2")
    except (ImportError, OSError) as e:
        raise AdoptFailed(f"cannot load libtorque for tm_adopt: {e}",
                          "install pbs_python built on this node's Torque ('make "
                          "pbs-python')") from None
    lib.tm_adopt.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
    lib.tm_adopt.restype = ctypes.c_int
    rc = lib.tm_adopt(job_id.encode(), TM_ADOPT_JOBID, int(pid))
    if rc != 0:
        raise AdoptFailed(f"pbs_mom did not adopt the VM's session {pid} into job "
                          f"{job_id}: {TM_ERRORS.get(rc, f'tm_adopt returned {rc}')}",
                          "check that pbs_mom runs and that [site] emulator is vmwn's "
                          "launcher")


def mom_running(pbs_home):
    """The pid of the pbs_mom that holds ``mom_priv/mom.lock`` (its fcntl write lock), or 0
    (-1: there is a lock, but this process may not ask whose).  Imports what only
    ``vmwn run`` needs here: hooks import this module for every job."""
    import ctypes
    import errno
    import fcntl

    class Flock(ctypes.Structure):  # struct flock, laid out by the platform's C types
        _fields_ = [("l_type", ctypes.c_short), ("l_whence", ctypes.c_short),
                    ("l_start", ctypes.c_int64), ("l_len", ctypes.c_int64),  # off_t
                    ("l_pid", ctypes.c_int)]
    try:
        fd = os.open(os.path.join(pbs_home, "mom_priv", "mom.lock"), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return 0
    try:
        probe = Flock(l_type=fcntl.F_WRLCK, l_whence=os.SEEK_SET)  # who would block it
        try:
            got = Flock.from_buffer_copy(fcntl.fcntl(fd, fcntl.F_GETLK, bytes(probe)))
        except OSError as e:
            return 0 if e.errno != errno.EACCES else -1
        return got.l_pid if got.l_type != fcntl.F_UNLCK else 0
    finally:
        os.close(fd)
