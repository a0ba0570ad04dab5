"""The provider's LDIF against a real OpenLDAP slapd with Debian's GLUE schemas.

slapd listens on 127.0.0.1 on a free port with schema checking on (slapd's
default); LDIF is loaded with ldapadd and read back with ldapsearch the way a
broker queries a site BDII.  Needs: apt-get install slapd glue-schema ldap-utils.
"""

import base64
import ctypes
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from vmwn import config
from vmwn.cli import main
from vmwn.grid import glue

from test_grid_advertise import GRID, make_config

pytestmark = pytest.mark.slapd

SCHEMA_DIR = "/etc/ldap/schema"
SCHEMAS = ["core", "cosine", "Glue-CORE", "Glue-CE", "Glue-CESEBind", "Glue-MDS", "GLUE20"]
ADMIN, PASSWORD = "cn=admin,o=grid", "secret"
GLUE1_BASE, GLUE2_BASE = "mds-vo-name=resource,o=grid", "GLUE2GroupID=resource,o=glue"
VMWN = os.path.join(os.path.dirname(sys.executable), "vmwn")
RESOURCE_LDIF = f"""dn: {GLUE1_BASE}
objectClass: MdsVo
Mds-Vo-name: resource

dn: {GLUE2_BASE}
objectClass: GLUE2Group
GLUE2GroupID: resource
"""
BASE_LDIF = "dn: o=grid\nobjectClass: organization\no: grid\n\n" \
    "dn: o=glue\nobjectClass: organization\no: glue\n\n" + RESOURCE_LDIF


def _slapd_binary():
    for p in ("/usr/sbin/slapd", shutil.which("slapd") or ""):
        if p and os.path.exists(p):
            return p
    return None


def _die_with_parent():
    """Child side: SIGTERM slapd if the test run itself is killed (Linux prctl)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_conf(root):
    lines = [f"include {SCHEMA_DIR}/{s}.schema" for s in SCHEMAS]
    lines += [f"pidfile {root}/slapd.pid", f"argsfile {root}/slapd.args",
              "modulepath /usr/lib/ldap", "moduleload back_mdb"]
    for suffix in ("o=grid", "o=glue"):
        db = root / suffix.split("=")[1]
        db.mkdir()
        lines += ["", "database mdb", f'suffix "{suffix}"', f"directory {db}",
                  "maxsize 67108864"]
        if suffix == "o=grid":
            lines += [f'rootdn "{ADMIN}"', f"rootpw {PASSWORD}"]
        else:
            lines += [f'access to * by dn.exact="{ADMIN}" write by * read']
    conf = root / "slapd.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


class Slapd:
    def __init__(self, url):
        self.url = url

    def ldap(self, argv, input=None):
        return subprocess.run(argv + ["-x", "-H", self.url], input=input, capture_output=True,
                              text=True, timeout=30)

    def add(self, text):
        """ldapadd the LDIF; a schema violation fails the calling test."""
        cp = self.ldap(["ldapadd", "-D", ADMIN, "-w", PASSWORD], input=text)
        assert cp.returncode == 0, f"ldapadd failed: {cp.stderr.strip()}\n--- LDIF ---\n{text}"
        return cp

    def search(self, base, flt, *attrs):
        """[(dn, {attr: [values]})], base64 values decoded."""
        cp = self.ldap(["ldapsearch", "-LLL", "-o", "ldif-wrap=no", "-b", base, flt, *attrs])
        assert cp.returncode in (0, 32), cp.stderr
        out = []
        for block in cp.stdout.split("\n\n"):
            rec = {}
            for line in filter(None, block.split("\n")):
                name, _, rest = line.partition(":")
                if rest.startswith(":"):
                    value = base64.b64decode(rest[1:].strip()).decode("utf-8")
                else:
                    value = rest[1:]
                rec.setdefault(name, []).append(value)
            if rec:
                out.append((rec.pop("dn")[0], rec))
        return out

    def reset(self):
        for base in (GLUE1_BASE, GLUE2_BASE):
            cp = self.ldap(["ldapdelete", "-r", "-D", ADMIN, "-w", PASSWORD, base])
            assert cp.returncode in (0, 32), cp.stderr
        self.add(RESOURCE_LDIF)


@pytest.fixture(scope="session")
def slapd_server(tmp_path_factory):
    binary = _slapd_binary()
    if not binary or not os.path.exists(f"{SCHEMA_DIR}/Glue-CE.schema"):
        pytest.skip("needs slapd, glue-schema and ldap-utils (apt-get install them)")
    root = tmp_path_factory.mktemp("slapd")
    conf = _write_conf(root)
    proc = None
    for _ in range(5):  # the port may be taken between probing and binding
        port = _free_port()
        url = f"ldap://127.0.0.1:{port}"
        log = open(root / "slapd.log", "w")
        proc = subprocess.Popen([binary, "-d", "0", "-f", str(conf), "-h", url + "/"],
                                stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=_die_with_parent)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        if proc.poll() is None:
            break
        log.close()
    else:
        pytest.fail("slapd did not start: " + (root / "slapd.log").read_text()[-1000:])
    server = Slapd(url)
    try:
        server.add(BASE_LDIF)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


@pytest.fixture
def slapd(slapd_server):
    """The session's slapd with only the base entries, for each test."""
    slapd_server.reset()
    return slapd_server


def _filter_value(value):
    """RFC 4515: every byte as \\XX, so any value is a safe filter assertion."""
    return "".join(f"\\{b:02x}" for b in value.encode("utf-8"))


def test_schema_checking_is_on(slapd):
    bad = (f"dn: GLUE2ApplicationEnvironmentID=x,{GLUE2_BASE}\n"
           "objectClass: GLUE2ApplicationEnvironment\nGLUE2ApplicationEnvironmentID: x\n")
    cp = slapd.ldap(["ldapadd", "-D", ADMIN, "-w", PASSWORD], input=bad)
    assert cp.returncode != 0
    assert "object class violation" in cp.stderr.lower()


def test_glue1_output_of_the_command_is_found_by_the_broker_query(slapd, tmp_path):
    path = make_config(tmp_path, present=("tiny",))
    cp = subprocess.run([VMWN, "--config", str(path), "advertise", "--glue1"],
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    slapd.add(cp.stdout)
    found = slapd.search(GLUE1_BASE, "(GlueHostApplicationSoftwareRunTimeEnvironment=VMWN-TINY)")
    assert len(found) == 1
    dn, attrs = found[0]
    assert attrs["GlueSubClusterUniqueID"] == [GRID["subcluster"]]
    assert attrs["GlueHostApplicationSoftwareRunTimeEnvironment"] == ["VMWN-TINY"]
    assert attrs["GlueChunkKey"] == [f"GlueClusterUniqueID={GRID['cluster']}"]
    # The image of debian12 is missing: not advertised.
    assert slapd.search(GLUE1_BASE,
                        "(GlueHostApplicationSoftwareRunTimeEnvironment=VMWN-DEBIAN12)") == []
    # The subcluster hangs below its cluster, as GLUE 1.3 navigation expects.
    (cluster,) = slapd.search(GLUE1_BASE, "(objectClass=GlueCluster)")
    below = slapd.search(cluster[0], "(objectClass=GlueSubCluster)")
    assert [d for d, _ in below] == [dn]


def test_gip_provider_script_output_loads(slapd, tmp_path):
    """The installed provider, run the way BDII runs it: no arguments, LDIF on stdout."""
    provider = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "gip", "vmwn-provider")
    path = make_config(tmp_path, present=("tiny",))
    env = {"VMWN_BIN": VMWN, "VMWN_CONFIG": str(path), "PATH": "/usr/bin:/bin"}
    cp = subprocess.run([provider], capture_output=True, text=True, timeout=60, env=env)
    assert cp.returncode == 0, cp.stderr
    slapd.add(cp.stdout)
    assert len(slapd.search(
        GLUE1_BASE, "(GlueHostApplicationSoftwareRunTimeEnvironment=VMWN-TINY)")) == 1
    assert len(slapd.search(GLUE2_BASE, "(GLUE2ApplicationEnvironmentAppName=VMWN-TINY)")) == 1


def test_glue2_output_is_found_by_the_broker_query(slapd, tmp_path, capsys):
    path = make_config(tmp_path, present=("tiny",))
    assert main(["--config", str(path), "advertise", "--glue2"]) == 0
    slapd.add(capsys.readouterr().out)
    flt = ("(&(objectClass=GLUE2ApplicationEnvironment)"
           "(GLUE2ApplicationEnvironmentAppName=VMWN-TINY))")
    found = slapd.search(GLUE2_BASE, flt)
    assert len(found) == 1
    attrs = found[0][1]
    assert attrs["GLUE2ApplicationEnvironmentComputingManagerForeignKey"] == [
        GRID["computing_manager"]]
    assert attrs["GLUE2ApplicationEnvironmentDescription"] == ["Minimal guest"]
    assert slapd.search(GLUE2_BASE, flt.replace("VMWN-TINY", "VMWN-DEBIAN12")) == []


def test_both_versions_together_load(slapd, tmp_path):
    path = make_config(tmp_path, present=("tiny", "debian12"))
    cp = subprocess.run([VMWN, "--config", str(path), "advertise"],
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    slapd.add(cp.stdout)
    (sub,) = slapd.search(GLUE1_BASE, "(objectClass=GlueSubCluster)")
    assert sorted(sub[1]["GlueHostApplicationSoftwareRunTimeEnvironment"]) == [
        "VMWN-DEBIAN12", "VMWN-TINY"]
    apps = slapd.search(GLUE2_BASE, "(objectClass=GLUE2ApplicationEnvironment)")
    assert sorted(a["GLUE2ApplicationEnvironmentAppName"][0] for _, a in apps) == [
        "VMWN-DEBIAN12", "VMWN-TINY"]


def test_nothing_present_loads_and_advertises_nothing(slapd, tmp_path):
    cfg = config.load(str(make_config(tmp_path, present=())))
    slapd.add(glue.advertise(cfg))
    assert slapd.search(GLUE1_BASE, "(GlueHostApplicationSoftwareRunTimeEnvironment=VMWN-*)") == []
    assert slapd.search(GLUE2_BASE, "(objectClass=GLUE2ApplicationEnvironment)") == []


HOSTILE_ASCII = {
    "site_name": "Site, Inc.=+x",
    "cluster": " lead,comma=eq+plus\"q\\b<;>:",
    "subcluster": "#sub\nnew, trail ",
    "ce_id": "ce:8443/cream-pbs-batch,o=evil\ndn: o=evil",
}


def test_hostile_glue1_identifiers_round_trip(slapd, tmp_path):
    cfg = config.load(str(make_config(tmp_path, present=("tiny",))))
    cfg = dataclasses.replace(cfg, grid={**cfg.grid, **HOSTILE_ASCII})
    slapd.add(glue.advertise(cfg, glue2=False))
    clusters = slapd.search(GLUE1_BASE, "(objectClass=GlueCluster)")
    assert len(clusters) == 1
    cdn, cattrs = clusters[0]
    assert cattrs["GlueClusterUniqueID"] == [HOSTILE_ASCII["cluster"]]
    assert sorted(cattrs["GlueForeignKey"]) == sorted([
        "GlueCEUniqueID=" + HOSTILE_ASCII["ce_id"],
        "GlueSiteUniqueID=" + HOSTILE_ASCII["site_name"]])
    flt = f"(GlueSubClusterUniqueID={_filter_value(HOSTILE_ASCII['subcluster'])})"
    (sub,) = slapd.search(cdn, flt)
    assert sub[1]["GlueHostApplicationSoftwareRunTimeEnvironment"] == ["VMWN-TINY"]
    assert sub[1]["GlueSubClusterUniqueID"] == [HOSTILE_ASCII["subcluster"]]
    assert sub[1]["GlueChunkKey"] == ["GlueClusterUniqueID=" + HOSTILE_ASCII["cluster"]]
    # Nothing leaked into other entries or DNs.
    everything = slapd.search("o=grid", "(objectClass=*)", "dn")
    assert len(everything) == 4  # o=grid, resource, cluster, subcluster


def test_hostile_glue2_values_with_non_ascii_round_trip(slapd, tmp_path):
    manager = " S\u00e3o Paulo, Grid=+Manager\n\u65e5\u672c #"
    cfg = config.load(str(make_config(tmp_path, present=("tiny",))))
    cfg = dataclasses.replace(cfg, grid={**cfg.grid, "computing_manager": manager})
    env = dataclasses.replace(cfg.environments["tiny"],
                              description="caf\u00e9\nline two: <x> , y")
    cfg = dataclasses.replace(cfg, environments={**cfg.environments, "tiny": env})
    slapd.add(glue.advertise(cfg, glue1=False))
    flt = ("(&(objectClass=GLUE2ApplicationEnvironment)"
           "(GLUE2ApplicationEnvironmentAppName=VMWN-TINY))")
    (found,) = slapd.search(GLUE2_BASE, flt)
    attrs = found[1]
    assert attrs["GLUE2ApplicationEnvironmentComputingManagerForeignKey"] == [manager]
    assert attrs["GLUE2ApplicationEnvironmentID"] == [manager + "_VMWN-TINY"]
    assert attrs["GLUE2ApplicationEnvironmentDescription"] == ["caf\u00e9\nline two: <x> , y"]
    by_fk = slapd.search(GLUE2_BASE, "(GLUE2ApplicationEnvironmentComputingManagerForeignKey="
                         f"{_filter_value(manager)})")
    assert [d for d, _ in by_fk] == [found[0]]
