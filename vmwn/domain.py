"""The libvirt domain description: rendered from a template, checked before use.

The template is the site's to edit (network, devices, accelerator); this module
supplies the variables, insists the result is well-formed XML that still names
the domain and carries vmwn's metadata, and reads that metadata back so vmwn
recognises its own domains without parsing names.
"""

import re
import time
import xml.etree.ElementTree as ET

from .errors import SiteError
from .templating import render_template

METADATA_NS = "https://vmwn.org/xmlns/job/1.0"
DOMAIN_PREFIX = "vmwn-"


_XML_BAD = re.compile("[^\x09\x0a\x0d\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xml_text(value):
    """Replace characters XML 1.0 cannot carry at all (NUL, controls, lone surrogates).

    Escaping handles markup; these are not markup but would make any document
    invalid, so free text such as a job name loses them instead of the job failing.
    """
    return _XML_BAD.sub("\ufffd", str(value))


def domain_name(job_id):
    from .state import safe_name
    return DOMAIN_PREFIX + safe_name(job_id)


def domain_name_of(job_id, index):
    """The domain of the job's guest on its ``index``-th node (None: a one-node job).
    Nodes that share a libvirt daemon keep their guests' names apart."""
    return domain_name(job_id) + (f"-n{index}" if index else "")


def guest_hostname(job_id, index=None):
    """A valid single-label host name for the job's guest (RFC 1123: a-z 0-9 -, <= 63);
    with ``index``, for its guest on the job's ``index``-th node (``-nINDEX``).

    Array subjob ids (``9024[1].server``) and the like keep their digits and a
    hash of the whole id, so distinct jobs keep distinct names.
    """
    from .state import safe_name
    head, _, digest = safe_name(job_id).rpartition("-")
    tail = f"-{digest}" + (f"-n{index}" if index is not None else "")
    label = re.sub(r"[^a-z0-9]+", "-", head.lower()).strip("-")[:63 - 5 - len(tail)]
    return f"vmwn-{label.strip('-')}{tail}" if label.strip("-") else f"vmwn{tail}"


def render(cfg, env, *, job_id, user, job_name="", vcpus=None, memory_mib=None, port=0,
           overlay=None, seed="/dev/null", console_log="/dev/null", created=None, shares=(),
           uid=None, gid=None, warm=False, ram=None, restore=None, name=None, jobnet=None):
    """The domain XML for one job, validated; raises SiteError if the template is unfit.

    QEMU runs as ``uid``:``gid`` (the job's; looked up from ``user`` when not
    given, nobody for a user this node does not know).  ``warm``: the guest
    is (or is restored from) a prepared one (vmwn/warm.py); ``ram``: the file
    of the prepared guest's memory; ``restore``: the guest is restored from it
    (QEMU waits for its device state) instead of booted, its memory a copy of
    the file ('copy') or the file mapped private ('map').  ``name`` replaces the job's
    domain name (for the preparing guest).  ``jobnet``: the guest's card on its
    job's network (vmwn.jobnet.Net), for a job that spans nodes.
    """
    if uid is None or gid is None:
        uid, gid = _ids_of(user)
    ctx = dict(
        name=name or domain_name(job_id), job_id=xml_text(job_id), user=xml_text(user),
        job_name=xml_text(job_name),
        created=int(created if created is not None else time.time()),
        port=int(port), bind_address=cfg.site["bind_address"], metadata_ns=METADATA_NS,
        env=env, vcpus=int(vcpus or env.vcpus), memory_mib=int(memory_mib or env.memory_mib),
        overlay=overlay if overlay is not None else (env.image and "/dev/null"),
        seed=seed, console_log=console_log,
        shares=[dict(tag=s.tag, socket=s.socket) for s in shares],
        uid=int(uid), gid=int(gid), emulator=cfg.site["emulator"], qemu=cfg.site["qemu"],
        warm=bool(warm), ram=ram or "", restore=_restore(restore),
        # What a site's template copied from an earlier bundle names: it still renders,
        # and a restore through it fails its load and boots cold (node log).
        incoming=bool(restore), autostart=False,
        jobnet=dict(tap=jobnet.tap, mac=jobnet.mac, mtu=int(jobnet.mtu),
                    index=int(jobnet.index)) if jobnet else None,
    )
    xml = render_template(cfg.site["template_dir"], env.template, ctx, xml=True)
    check(xml, ctx["name"], ctx["job_id"], f"{cfg.site['template_dir']}/{env.template}")
    return xml


_FILESYSTEM = re.compile(r"[ \t]*<filesystem\b.*?</filesystem>[ \t]*\n?", re.S)


def without_filesystems(xml):
    """``xml`` without its ``<filesystem>`` devices, and those devices' XML.

    A guest restored from a prepared one (saved without them: QEMU cannot save
    a vhost-user device) gets the job's shares hot-plugged once it runs."""
    devices = [m.group(0).strip() for m in _FILESYSTEM.finditer(xml)]
    return _FILESYSTEM.sub("", xml), devices


def _restore(how):
    if how not in (None, "copy", "map"):
        raise ValueError(f"restore={how!r}")
    return how or ""


def _ids_of(user):
    import pwd
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return NOBODY, NOBODY
    return pw.pw_uid, pw.pw_gid


NOBODY = 65534


def check(xml, name, job_id, where):
    """Reject XML that would not give vmwn a domain it can find and tear down."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise SiteError(f"template {where} renders malformed XML ({e})",
                        "fix the template") from None
    if root.tag != "domain":
        raise SiteError(f"template {where} renders <{root.tag}>, not <domain>", "fix the template")
    if root.findtext("name") != name:
        raise SiteError(f"template {where} does not set <name> to {{{{ name }}}}",
                        "keep <name>{{ name }}</name> in the template")
    meta = metadata_of(xml)
    if meta.get("id") != job_id:
        raise SiteError(f"template {where} lacks vmwn metadata for the job",
                        "keep the <metadata><vmwn:job> block of the bundled template")


def metadata_of(xml):
    """vmwn's metadata fields from a domain's XML ({} if the domain is not vmwn's)."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return {}
    job = root.find(f"metadata/{{{METADATA_NS}}}job")
    return {} if job is None else _fields(job)


def parse_metadata_element(xml):
    """Fields of the ``<job>`` element libvirt returns from metadata() (namespace stripped)."""
    try:
        return _fields(ET.fromstring(xml))
    except ET.ParseError:
        return {}


def _fields(job):
    return {child.tag.split("}", 1)[-1]: (child.text or "") for child in job}
