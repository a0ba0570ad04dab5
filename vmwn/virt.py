"""libvirt: start, find and tear down vmwn's domains.

Domains are transient (created, never defined), so destroying one leaves no
configuration behind.  Teardown is idempotent in the manner of vdsm's
virdomain: "no such domain" means the work is already done.
"""

import json
import logging
import os
import time

from .domain import METADATA_NS, parse_metadata_element
from .errors import SiteError, TransientError

log = logging.getLogger(__name__)
_libvirt = None


def _lv():
    """Import libvirt on first use (hooks of jobs without a VM never pay for it)."""
    global _libvirt
    if _libvirt is None:
        import libvirt
        libvirt.registerErrorHandler(lambda ctx, err: None, None)  # no stray stderr lines
        _libvirt = libvirt
    return _libvirt


def connect(uri):
    lv = _lv()
    try:
        return lv.open(uri)
    except lv.libvirtError as e:
        msg = _msg(e)
        fix = ("run this as root: libvirt's system socket is root's"
               if "Permission denied" in msg
               else "start libvirtd (and virtlogd) or fix [site] libvirt_uri")
        raise SiteError(f"cannot reach libvirt at {uri}: {msg}", fix) from None


def _msg(e):
    return " ".join(str(e.get_error_message() or e).split())


def _code(e):
    return e.get_error_code()


class PortTaken(TransientError):
    """QEMU could not bind the forwarded SSH port: another process took it meanwhile."""


class ShareUnreachable(TransientError):
    """QEMU could not connect to a virtiofsd's socket: that virtiofsd no longer waited
    for it (vmwn.share.health says what became of it).  A boot with fresh ones may pass."""


def start(conn, xml, paused=False):
    """Create and start a transient domain from ``xml``; returns the domain.

    ``paused``: QEMU runs but the guest does not until :func:`resume`."""
    lv = _lv()
    flags = getattr(lv, "VIR_DOMAIN_START_VALIDATE", 0)
    if paused:
        flags |= lv.VIR_DOMAIN_START_PAUSED
    try:
        return conn.createXML(xml, flags)
    except lv.libvirtError as e:
        code = _code(e)
        if code in (lv.VIR_ERR_XML_ERROR, lv.VIR_ERR_XML_DETAIL, lv.VIR_ERR_CONFIG_UNSUPPORTED,
                    getattr(lv, "VIR_ERR_XML_INVALID_SCHEMA", -1)):
            raise SiteError(f"libvirt rejects the domain XML: {_msg(e)}",
                            "fix the environment's template") from None
        if code == lv.VIR_ERR_OPERATION_FAILED and "already exists" in _msg(e):
            raise TransientError(f"a domain for this job already exists: {_msg(e)}",
                                 "run 'vmwn reap' or wait for the old one to end") from None
        if "host forwarding rule" in _msg(e):
            raise PortTaken(f"the forwarded SSH port is taken: {_msg(e)}",
                            "retry with another port") from None
        if "-chardev socket,id=chr-vu-" in _msg(e) and "Failed to connect" in _msg(e):
            raise ShareUnreachable(f"QEMU could not connect to the job's virtiofsd: {_msg(e)}",
                                   "the site should look at the node's log for the job") \
                from None
        raise SiteError(f"libvirt cannot start the domain: {_msg(e)}",
                        "see the libvirt log") from None


def save(dom, path):
    """Save a running guest's memory and device state to ``path``; the domain ends."""
    lv = _lv()
    try:
        dom.save(path)
    except lv.libvirtError as e:
        raise SiteError(f"libvirt cannot save the guest: {_msg(e)}",
                        "see the libvirt log") from None


def attach(dom, xml):
    """Add the device ``xml`` to the running (or paused) guest ``dom``."""
    lv = _lv()
    try:
        dom.attachDeviceFlags(xml, lv.VIR_DOMAIN_AFFECT_LIVE)
    except lv.libvirtError as e:
        raise TransientError(f"libvirt cannot add a device to the guest: {_msg(e)}",
                             "the site should look at the node's log for the job") from None


def _libvirt_qemu():
    """libvirt's QEMU module, with libvirt, on first use."""
    import libvirt_qemu
    return libvirt_qemu


def monitor_passes_files():
    """This libvirt passes descriptors to QEMU's monitor (libvirt 8.2 and later), as a
    restore needs."""
    try:
        return hasattr(_libvirt_qemu(), "qemuMonitorCommandWithFiles")
    except ImportError:
        return False


def _qmp(dom, command, arguments=None, files=()):
    """QEMU's answer to one QMP command sent through libvirt's monitor connection."""
    lv = _lv()
    cmd = json.dumps({"execute": command, **({"arguments": arguments} if arguments else {})})
    fix = "the site should look at the node's log for the job"
    try:
        lq = _libvirt_qemu()
        if files:
            out, _ = lq.qemuMonitorCommandWithFiles(dom, cmd, list(files), 0)
        else:
            out = lq.qemuMonitorCommand(dom, cmd, 0)
    except (ImportError, AttributeError) as e:  # a libvirt-python older than 8.2
        raise TransientError(f"this libvirt cannot send {command} to QEMU ({e})", fix) from None
    except lv.libvirtError as e:
        raise TransientError(f"QEMU did not take {command}: {_msg(e)}", fix) from None
    reply = json.loads(out)
    if "error" in reply:
        raise TransientError(f"QEMU refused {command}: {reply['error'].get('desc', reply)}",
                             fix)
    return reply.get("return")


def leave_out_memory(dom):
    """From now on a migration of ``dom`` (libvirt's save, a restore) leaves out the
    guest's memory when it is a shared file (vmwn/launcher.c): the file is kept apart."""
    _qmp(dom, "migrate-set-capabilities",
         {"capabilities": [{"capability": "x-ignore-shared", "state": True}]})


# Seconds between two looks at a restore that QEMU is loading (device state only: a
# few milliseconds), doubling up to the last; and the longest a load may take.
LOAD_POLL = (0.002, 0.05)
LOAD_TIMEOUT = 30.0


def load_state(dom, path, timeout):
    """Load the device state at ``path`` into ``dom``, a guest started with ``-incoming
    defer`` whose memory is already in place; returns once QEMU has loaded it (the guest
    then runs, or stays paused if it was started paused)."""
    leave_out_memory(dom)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # root's: QEMU runs as the job's user
    except OSError as e:
        raise TransientError(f"cannot read the saved guest {path}: {e.strerror}",
                             "the site should run 'vmwn warm prepare' for the environment") \
            from None
    try:
        _qmp(dom, "getfd", {"fdname": "vmwn-state"}, files=[fd])
    finally:
        os.close(fd)
    _qmp(dom, "migrate-incoming", {"uri": "fd:vmwn-state"})
    timeout = min(timeout, LOAD_TIMEOUT)
    end, poll = time.monotonic() + timeout, LOAD_POLL[0]
    while True:
        status = (_qmp(dom, "query-migrate") or {}).get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise TransientError(f"QEMU could not load the saved guest ({status})",
                                 "the site should run 'vmwn warm prepare' for the environment")
        if time.monotonic() >= end:
            raise TransientError(f"QEMU did not load the saved guest within {timeout:.0f} s "
                                 f"(it says {status or 'nothing'})",
                                 "the site should look at the node's log for the job")
        time.sleep(poll)
        poll = min(poll * 2, LOAD_POLL[1])


def resume(dom):
    lv = _lv()
    try:
        dom.resume()
    except lv.libvirtError as e:
        raise TransientError(f"libvirt cannot resume the guest: {_msg(e)}",
                             "the site should check libvirtd") from None


def lookup(conn, name):
    """The domain called ``name``, or None."""
    lv = _lv()
    try:
        return conn.lookupByName(name)
    except lv.libvirtError as e:
        if _code(e) == lv.VIR_ERR_NO_DOMAIN:
            return None
        raise SiteError(f"libvirt lookup of {name} failed: {_msg(e)}", "check libvirtd") from None


def is_active(dom):
    lv = _lv()
    try:
        return bool(dom.isActive())
    except lv.libvirtError as e:
        if _code(e) == lv.VIR_ERR_NO_DOMAIN:
            return False
        raise TransientError(f"lost contact with libvirt: {_msg(e)}",
                             "the site should check libvirtd") from None


def paused_on_io_error(dom):
    """True when QEMU stopped the guest because a disk write failed on the host
    (its overlay's file system is full): it will never run again."""
    lv = _lv()
    try:
        state, reason = dom.state()
    except lv.libvirtError:
        return False
    return state == lv.VIR_DOMAIN_PAUSED and reason == lv.VIR_DOMAIN_PAUSED_IOERROR


QEMU_RUN_DIR = "/run/libvirt/qemu"  # qemu:///system's runtime directory
QEMU_LIB_DIR = "/var/lib/libvirt/qemu"  # holds each domain's private directory


def open_domain_dirs(path=QEMU_LIB_DIR):
    """Let QEMUs of any uid reach their own private directory below ``path``.

    libvirt makes each domain's directory (its master key, among others) for
    the domain's uid, inside a directory Debian ships as 0750 libvirt-qemu:
    a QEMU running as the job's user could not enter it.  Search permission
    for others is all it needs; the directories below keep their modes.
    Returns True if the mode was changed."""
    import stat
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return False
    if mode & 0o001:
        return False
    os.chmod(path, mode | 0o001)
    log.info("%s: added search permission for others (QEMU runs as each job's user)", path)
    return True


def emulator_pid(name):
    """PID of the process libvirt started for domain ``name`` (vmwn's launcher, the
    leader of QEMU's session), from libvirt's pid file; 0 when there is none."""
    try:
        with open(os.path.join(QEMU_RUN_DIR, f"{name}.pid"), encoding="ascii") as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def destroy(conn, name, grace=0.0):
    """Stop and remove domain ``name``: ACPI shutdown for ``grace`` seconds, then force.

    Returns True if a domain was there.  Safe to call any number of times.
    """
    lv = _lv()
    dom = lookup(conn, name)
    if dom is None:
        return False
    try:
        if grace > 0 and dom.isActive():
            try:
                dom.shutdown()
            except lv.libvirtError:
                pass
            end = time.monotonic() + grace
            while time.monotonic() < end and is_active(dom):
                time.sleep(0.1)
        if is_active(dom):
            try:
                dom.destroyFlags(lv.VIR_DOMAIN_DESTROY_GRACEFUL if grace > 0 else 0)
            except lv.libvirtError as e:
                if _code(e) not in (lv.VIR_ERR_NO_DOMAIN, lv.VIR_ERR_OPERATION_INVALID):
                    dom.destroy()
        if dom.isPersistent():
            dom.undefineFlags(getattr(lv, "VIR_DOMAIN_UNDEFINE_NVRAM", 0))
    except lv.libvirtError as e:
        if _code(e) in (lv.VIR_ERR_NO_DOMAIN, lv.VIR_ERR_OPERATION_INVALID):
            return True
        raise SiteError(f"cannot destroy domain {name}: {_msg(e)}",
                        "check libvirtd, then 'vmwn reap'") from None
    return True


def vmwn_domains(conn):
    """[(domain, metadata dict)] for every domain carrying vmwn's metadata."""
    lv = _lv()
    not_ours = (getattr(lv, "VIR_ERR_NO_DOMAIN_METADATA", -1), lv.VIR_ERR_NO_DOMAIN)
    out = []
    try:
        domains = conn.listAllDomains(0)
    except lv.libvirtError as e:
        raise TransientError(f"libvirt cannot list domains: {_msg(e)}", "check libvirtd") from None
    for dom in domains:
        try:
            xml = dom.metadata(lv.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS, 0)
        except lv.libvirtError as e:
            if _code(e) in not_ours:
                continue  # no vmwn metadata, or gone meanwhile
            raise TransientError(f"libvirt cannot read domain metadata: {_msg(e)}",
                                 "check libvirtd") from None
        out.append((dom, parse_metadata_element(xml)))
    return out


def domain_files(dom):
    """The host files a domain's disks, serial and console use ([] if it is gone)."""
    import xml.etree.ElementTree as ET
    try:
        root = ET.fromstring(dom.XMLDesc(0))
    except Exception:  # noqa: BLE001 - gone meanwhile, or unreadable: nothing to judge
        return []
    paths = [el.get("file") or el.get("path") or ""
             for el in root.iterfind("devices/disk/source")]
    paths += [el.get("path") or "" for el in root.iterfind("devices/serial/source")]
    paths += [el.get("path") or "" for el in root.iterfind("devices/console/source")]
    return [p for p in paths if p]


def find_job(conn, job_id, node=None):
    """Domains whose vmwn metadata names ``job_id`` (normally zero or one); with
    ``node``, only its guest on the job's ``node``-th node (nodes that share a
    libvirt daemon hold a guest each)."""
    return [dom for dom, meta in vmwn_domains(conn) if meta.get("id") == job_id
            and (node is None or meta.get("node", "0") == str(node))]


def set_paused(conn, name, paused):
    """Pause (suspend) or resume domain ``name``; doing what is already done is fine."""
    lv = _lv()
    dom = lookup(conn, name)
    if dom is None:
        raise TransientError(f"domain {name} is gone", "nothing to pause or resume")
    try:
        state = dom.state()[0]
        if paused and state != lv.VIR_DOMAIN_PAUSED:
            dom.suspend()
        elif not paused and state == lv.VIR_DOMAIN_PAUSED:
            dom.resume()
    except lv.libvirtError as e:
        raise TransientError(f"cannot {'pause' if paused else 'resume'} domain {name}: "
                             f"{_msg(e)}", "check libvirtd") from None


# Where libvirt's system QEMU driver writes each domain's own log (QEMU's
# command line and stderr); it outlives the transient domain.
QEMU_LOG_DIR = "/var/log/libvirt/qemu"


def remove_domain_log(uri, name):
    """Remove the log libvirt kept for domain ``name``; True if there was one."""
    if not uri.startswith("qemu:///system") or "/" in name:
        return False
    try:
        os.unlink(os.path.join(QEMU_LOG_DIR, f"{name}.log"))
        return True
    except FileNotFoundError:
        return False
