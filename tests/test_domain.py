"""Domain XML: golden output, escaping of hostile strings, and libvirt's own acceptance.

libvirt's test driver (``test:///default``) parses and validates the XML with
the same code paths the QEMU driver uses for the generic parts of a domain.
"""

import dataclasses
import os
import xml.etree.ElementTree as ET

import pytest

from vmwn import config, domain, virt
from vmwn.errors import SiteError

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(HERE)
GOLDEN = os.path.join(HERE, "golden", "domain-tiny.xml")

HOSTILE = [
    "<x>&\"'", "]]><evil/>", "a\nb\rc\td", "\x00nul", "\x01\x1b[31mctl", "$(reboot)`id`;|&",
    "'; DROP TABLE jobs; --", "ü€\U0001F600", "\udcff\udcfe", "x" * 5000,
    "{{ 7*7 }}{% raw %}", "--><!--", "&amp;&lt;", "\u2028\u2029", "a: b\n- c: [d]",
]


@pytest.fixture
def cfg(tmp_path):
    p = tmp_path / "vmwn.conf"
    p.write_text(f"""
[site]
template_dir = {ROOT}/templates
state_dir = {tmp_path}/state
image_dir = /images
[env tiny]
image = tiny/disk.qcow2
kernel = tiny/vmlinuz
initrd = tiny/initrd.img
cmdline = console=ttyS0 no_timer_check quiet
accel = qemu
memory = 256M
[env big]
image = /images/big.qcow2
accel = kvm
vcpus = 2
memory = 2G
""")
    return config.load(str(p))


def render(cfg, env="tiny", **kw):
    args = dict(job_id="17.srv.example.org", user="alice", job_name="analysis", port=40001,
                overlay="/ov/17.qcow2", seed="/st/17/seed.iso", console_log="/st/17/console.log",
                created=1700000000, uid=4242, gid=4343)
    args.update(kw)
    return domain.render(cfg, cfg.env(env), **args)


def test_golden(cfg):
    xml = render(cfg)
    if os.environ.get("VMWN_REGOLD"):
        with open(GOLDEN, "w") as f:
            f.write(xml)
    with open(GOLDEN) as f:
        assert xml == f.read()


def test_kvm_environment_without_kernel_boots_from_disk(cfg):
    root = ET.fromstring(render(cfg, env="big"))
    assert root.get("type") == "kvm"
    assert root.find("os/kernel") is None
    assert root.find("os/boot").get("dev") == "hd"
    assert root.find("cpu").get("mode") == "host-passthrough"
    assert root.findtext("vcpu") == "2" and root.findtext("memory") == "2048"


QEMU_NS = "{http://libvirt.org/schemas/domain/qemu/1.0}"


def _qemu_args(xml):
    return [a.get("value") for a in ET.fromstring(xml).iter(QEMU_NS + "arg")]


def test_network_is_user_mode_on_loopback_only(cfg):
    xml = render(cfg)
    root = ET.fromstring(xml)
    assert root.find("devices/interface") is None  # no libvirt network, no bridge
    assert "user,id=vmwnnet0,ipv6=off,hostfwd=tcp:127.0.0.1:40001-:22" in _qemu_args(xml)


def test_network_none_restricts_user_networking(cfg):
    env = dataclasses.replace(cfg.env("tiny"), network="none")
    xml = domain.render(cfg, env, job_id="17.srv", user="alice", port=40001, uid=1, gid=1)
    assert "user,id=vmwnnet0,ipv6=off,restrict=on,hostfwd=tcp:127.0.0.1:40001-:22" in \
        _qemu_args(xml)


def test_qemu_runs_as_the_job_user_and_shared_files_are_never_relabelled(cfg):
    root = ET.fromstring(render(cfg))
    label = root.find("seclabel")
    assert (label.get("type"), label.get("model")) == ("static", "dac")
    assert label.findtext("label") == "+4242:+4343"
    # libvirt relabels what the domain names: the base files are not named.
    assert root.find("os/kernel") is None and root.find("os/initrd") is None
    for disk in root.iter("disk"):
        assert disk.find("source/seclabel").get("relabel") == "no"
    assert root.find("devices/rng/backend").get("model") == "builtin"  # no /dev/urandom
    args = _qemu_args(render(cfg))
    assert args[args.index("-kernel") + 1] == "/images/tiny/vmlinuz"
    assert args[args.index("-initrd") + 1] == "/images/tiny/initrd.img"
    assert root.findtext("devices/emulator") == cfg.site["emulator"]


@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_job_names_stay_text(cfg, hostile):
    xml = render(cfg, job_name=hostile)
    root = ET.fromstring(xml)  # still well-formed
    meta = domain.metadata_of(xml)
    assert meta["id"] == "17.srv.example.org" and meta["user"] == "alice"
    # Markup stays text; characters XML cannot carry at all become U+FFFD, one for one;
    # a carriage return is normalised to a newline by any XML parser.
    expected = domain.xml_text(hostile).replace("\r", "\n")
    assert meta["jobname"] == expected
    assert len(expected) == len(hostile)
    assert root.find("metadata") is not None and len(list(root)) > 5
    assert "<evil" not in [e.tag for e in root.iter()]


@pytest.mark.parametrize("job_id", ["1.srv", "123[4].srv.example.org", "9" * 200,
                                    "../../etc/passwd", "a b;c"])
def test_domain_names_are_safe_and_distinct(job_id):
    name = domain.domain_name(job_id)
    assert name.startswith("vmwn-") and len(name) <= 64
    assert all(c.isalnum() or c in "._-" for c in name)
    assert domain.domain_name(job_id + "x") != name


def test_libvirt_test_driver_accepts_and_reads_back_metadata(cfg):
    conn = virt.connect("test:///default")
    try:
        xml = render(cfg, job_name="<x>&\"'")
        dom = virt.start(conn, xml)
        assert not dom.isPersistent()  # transient: destroy leaves no definition
        found = virt.vmwn_domains(conn)
        metas = [m for d, m in found if d.name() == dom.name()]
        assert metas and metas[0]["id"] == "17.srv.example.org" and metas[0]["jobname"] == "<x>&\"'"
        assert [d.name() for d in virt.find_job(conn, "17.srv.example.org")] == [dom.name()]
        assert virt.destroy(conn, dom.name()) is True
        assert virt.destroy(conn, dom.name()) is False  # idempotent
        assert virt.find_job(conn, "17.srv.example.org") == []
    finally:
        conn.close()


def test_libvirt_rejects_broken_template_as_site_error(cfg, tmp_path):
    conn = virt.connect("test:///default")
    try:
        bad = render(cfg).replace("<memory unit='MiB'>256</memory>", "")
        bad = bad.replace("<vcpu placement='static'>1</vcpu>", "<vcpu>many</vcpu>")
        # Named as the template's fault (every libvirt error says "libvirt").
        with pytest.raises(SiteError, match="libvirt rejects the domain XML") as e:
            virt.start(conn, bad)
        assert e.value.fix == "fix the environment's template"
    finally:
        conn.close()


def test_template_that_drops_metadata_is_rejected(cfg, tmp_path):
    tdir = tmp_path / "t"
    tdir.mkdir()
    src = open(os.path.join(ROOT, "templates", "domain.xml.j2")).read()
    (tdir / "domain.xml.j2").write_text(src.replace("<vmwn:id>{{ job_id }}</vmwn:id>", ""))
    cfg.site["template_dir"] = str(tdir)
    with pytest.raises(SiteError, match="lacks vmwn metadata"):
        render(cfg)


def test_template_with_undefined_variable_is_a_one_line_site_error(cfg, tmp_path):
    tdir = tmp_path / "t"
    tdir.mkdir()
    (tdir / "domain.xml.j2").write_text("<domain>{{ no_such_var }}</domain>")
    cfg.site["template_dir"] = str(tdir)
    with pytest.raises(SiteError) as e:
        render(cfg)
    assert "no_such_var" in str(e.value) and "\n" not in str(e.value)


def test_unreachable_libvirt_is_a_site_error():
    with pytest.raises(SiteError, match="cannot reach libvirt.*start libvirtd"):
        virt.connect("qemu+unix:///system?socket=/nonexistent/sock")


@pytest.mark.parametrize("message, fix", [
    ("Failed to connect socket to '/var/run/libvirt/libvirt-sock': Permission denied",
     "run this as root: libvirt's system socket is root's"),
    ("Failed to connect socket to '/var/run/libvirt/libvirt-sock': Connection refused",
     "start libvirtd (and virtlogd) or fix [site] libvirt_uri"),
])
def test_an_unreachable_libvirt_names_the_right_fix(monkeypatch, message, fix):
    """An operator without root is told so, not to start a libvirtd that runs."""
    import libvirt

    def refuse(uri):
        libvirt.virResetLastError()  # else the error carries an earlier test's last error
        raise libvirt.libvirtError(message)
    monkeypatch.setattr(libvirt, "open", refuse)
    with pytest.raises(SiteError) as e:
        virt.connect("qemu:///system")
    assert message in e.value.problem and e.value.fix == fix


def test_qemu_that_cannot_reach_a_virtiofsd_is_a_boot_that_may_pass():
    """QEMU refused at a virtiofsd's socket: the warden boots again with fresh ones
    (TransientError), where any other failure to start is the site's."""
    import libvirt
    from vmwn.errors import TransientError
    message = ("internal error: qemu unexpectedly closed the monitor: qemu-system-x86_64: "
               "-chardev socket,id=chr-vu-fs0,path=/j/fs0.sock: Failed to connect to "
               "'/j/fs0.sock': Connection refused")

    class Conn:
        def __init__(self, message):
            self.message = message

        def createXML(self, xml, flags):
            libvirt.virResetLastError()
            raise libvirt.libvirtError(self.message)
    with pytest.raises(virt.ShareUnreachable) as e:
        virt.start(Conn(message), "<domain/>")
    assert isinstance(e.value, TransientError) and "Connection refused" in e.value.problem
    with pytest.raises(SiteError, match="cannot start the domain") as e:
        virt.start(Conn("internal error: process exited while connecting to monitor"),
                   "<domain/>")
    assert not isinstance(e.value, TransientError)
