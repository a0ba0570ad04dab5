"""A job's own network across its nodes (vmwn.jobnet).

Unit: the plan (VNI, device names, addresses, MACs), the domain's card and the
seed's lines.  Integration: two nodes, each a network namespace of its own
joined by a bridge in a third (addresses only inside them), run a job's two
real guests; the guests reach each other by name over the job's VXLAN
segment, another job's guest on the same nodes reaches neither, and nothing
of either job is left on either node.  Libvirt is the host's, shared by both
nodes: each node's guest keeps its own domain, state and devices.
"""

import contextlib
import ipaddress
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from vmwn import domain, jobnet, seed
from vmwn.errors import SiteError
from vmwn.spec import JobSpec

from vmwn_testlib import ROOT, needs_image, qemu_reachable_dir, write_config

RUN = os.getpid()


def test_vni_is_the_jobs_number_or_a_hash_of_its_id():
    assert jobnet.vni("500123.server.example.org") == 500124
    assert jobnet.vni("77") == 78
    a, b = jobnet.vni("9024[1].server"), jobnet.vni("9024[2].server")
    assert a != b and 1 <= a <= jobnet.VNI_MAX + 1 and 1 <= b <= jobnet.VNI_MAX + 1
    assert jobnet.vni(str(jobnet.VNI_MAX)) == 1  # wraps inside 1 .. 2**24-2


def test_device_names_fit_linux_and_differ_per_job_and_node():
    seen = set()
    for job in ("1.s", "2.s", "1.t"):
        for index in range(3):
            names = jobnet.names(job, index)
            assert all(len(n) <= 15 and n.isalnum() for n in names)
            assert len(set(names)) == 3
            seen.update(names)
    assert len(seen) == 27


def test_plan_takes_this_node_and_its_peers_in_the_jobs_order():
    nodes = ("10.213.22.1", "10.213.22.2", "10.213.22.3")
    net = jobnet.plan("42.s", nodes, 1, port=4790, mtu=1400)
    assert (net.local, net.peers, net.port, net.mtu) == \
        ("10.213.22.2", ("10.213.22.1", "10.213.22.3"), 4790, 1400)
    assert net.address == "10.254.0.2" and jobnet.address(0) == "10.254.0.1"
    assert net.vni == jobnet.vni("42.s") and net.index == 1
    macs = {jobnet.plan("42.s", nodes, i).mac for i in range(3)}
    assert len(macs) == 3 and all(int(m.split(":")[0], 16) & 2 for m in macs)  # local
    assert jobnet.Net.from_dict(json.loads(json.dumps(net.as_dict()))) == net


def test_an_unresolvable_node_is_the_sites_to_fix():
    with pytest.raises(SiteError) as e:
        jobnet.plan("42.s", ("10.213.22.1", "no-such-node.invalid"), 0)
    assert "no-such-node.invalid" in e.value.line()


def test_the_guests_of_a_job_have_names_of_their_own():
    names = {domain.domain_name_of("7.s", i) for i in (None, 0, 1, 2)}
    assert len(names) == 3 and domain.domain_name_of("7.s", None) == domain.domain_name("7.s")
    hosts = {domain.guest_hostname("7.s", i) for i in range(3)}
    assert len(hosts) == 3 and all(h.endswith(f"-n{i}") for h, i in
                                   zip(sorted(hosts), range(3)))
    assert domain.guest_hostname("7.s") not in hosts


def _site(tmp_path):
    from vmwn import config
    return config.load(write_config(str(tmp_path)))


def test_the_domain_has_a_card_on_the_jobs_network_only_for_a_job_on_several_nodes(tmp_path):
    cfg = _site(tmp_path)
    env = cfg.env("tiny")
    alone = ET.fromstring(domain.render(cfg, env, job_id="7.s", user="alice", uid=1, gid=1))
    assert alone.find("devices/interface") is None
    net = jobnet.plan("7.s", ("10.0.0.1", "10.0.0.2"), 1)
    xml = domain.render(cfg, env, job_id="7.s", user="alice", uid=1, gid=1, jobnet=net,
                        name=domain.domain_name_of("7.s", 1))
    card = ET.fromstring(xml).find("devices/interface")
    assert card.get("type") == "ethernet"
    assert card.find("target").attrib == {"dev": net.tap, "managed": "no"}
    assert card.find("mac").get("address") == net.mac
    assert card.find("mtu").get("size") == "1450"
    assert card.find("address").get("slot") == "0x1f"  # after the user network's 0x1e
    assert domain.metadata_of(xml)["node"] == "1"


def test_the_seed_gives_the_guest_its_address_and_the_jobs_hosts():
    from types import SimpleNamespace as Key
    from vmwn.templating import render_template
    key = Key(public_line="ssh-ed25519 AAAA c", private_openssh="-----BEGIN X-----\n")
    ctx = seed.context(job_id="7.s", instance_id="i", hostname="h-n1", user="alice", uid=5,
                       gid=6, group="lab", shell="/bin/sh", workdir="/home/alice",
                       hostkey=key, userkey=key,
                       jobnet=dict(address="10.254.0.2/16", mtu=1450,
                                   hosts=[("10.254.0.1", "h-n0", "ssh-ed25519 K0 c0"),
                                          ("10.254.0.2", "h-n1", "ssh-ed25519 K1 c1")]))
    ud = render_template(os.path.join(ROOT, "templates"), "user-data.j2", ctx)
    assert '  - [ip, link, set, eth1, mtu, "1450", up]' in ud
    assert '  - [ip, address, add, "10.254.0.2/16", dev, eth1]' in ud
    line = json.dumps(seed.HOSTS_LINE)
    assert f'  - [sh, -c, {line}, hosts, "10.254.0.1", "h-n0", "ssh-ed25519 K0"]' in ud
    assert f'  - [sh, -c, {line}, hosts, "10.254.0.2", "h-n1", "ssh-ed25519 K1"]' in ud
    assert (f'  - [sh, -c, {json.dumps(seed.KEY_LINE)}, key, "alice", "5:6", '
            f'"-----BEGIN X-----\\n"]') in ud
    ctx["jobnet"] = None
    assert "eth1" not in render_template(os.path.join(ROOT, "templates"), "user-data.j2", ctx)


# --- two nodes in network namespaces ------------------------------------------------

def _sh(*argv, check=True):
    cp = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120)
    if check and cp.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, argv))}: {cp.stderr.strip()}")
    return cp


def _links(ns=None):
    """Names of the network devices in namespace ``ns`` (None: this process's)."""
    cp = _sh(*(["ip", "-n", ns] if ns else ["ip"]), "-o", "link", "show")
    return {line.split(":")[1].strip().split("@")[0] for line in cp.stdout.splitlines()}


class Nodes:
    """Two nodes (network namespaces) on a switch (a bridge in a third), each with a
    vmwn configuration of its own, running tests/jobnet_node.py as its hook."""

    def __init__(self, base):
        tag = f"{RUN % 100000}"
        self.switch, self.ns = f"vjs{tag}", [f"vja{tag}", f"vjb{tag}"]
        self.addr = ["10.213.22.1", "10.213.22.2"]
        self.conf = []
        secret = os.path.join(base, "job-secret")  # the same on every node
        with open(os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(os.urandom(32))
        for i, ns in enumerate(self.ns):
            d = os.path.join(base, f"node{i}")
            os.makedirs(d)
            self.conf.append(write_config(d, site_extra=f"job_secret = {secret}",
                                          ports=f"{41500 + 200 * i}-{41699 + 200 * i}"))

    def __enter__(self):
        _sh("ip", "netns", "add", self.switch)
        _sh("ip", "-n", self.switch, "link", "add", "sw", "type", "bridge")
        _sh("ip", "-n", self.switch, "link", "set", "sw", "up")
        for i, ns in enumerate(self.ns):
            _sh("ip", "netns", "add", ns)
            _sh("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name",
                f"p{i}", "netns", self.switch)
            _sh("ip", "-n", self.switch, "link", "set", f"p{i}", "master", "sw", "up")
            _sh("ip", "-n", ns, "addr", "add", f"{self.addr[i]}/24", "dev", "eth0")
            _sh("ip", "-n", ns, "link", "set", "eth0", "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        return self

    def __exit__(self, *exc):
        for ns in self.ns + [self.switch]:
            _sh("ip", "netns", "del", ns, check=False)

    def run(self, i, *args):
        """The node's hook: ``up JOB INDEX NODE...`` or ``down JOB``, as a process."""
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
        return subprocess.Popen(["ip", "netns", "exec", self.ns[i], sys.executable,
                                 os.path.join(ROOT, "tests", "jobnet_node.py"), args[0],
                                 self.conf[i], *map(str, args[1:])],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env)

    def up(self, job, indexes=(0, 1)):
        procs = [self.run(i, "up", job, i, *self.addr) for i in indexes]
        for p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, f"up {job}: {err.strip()[-600:]}"

    def down(self, job, indexes=(0, 1)):
        for i in indexes:
            p = self.run(i, "down", job)
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, f"down {job}: {err.strip()[-600:]}"

    def cfg(self, i):
        from vmwn import config
        return config.load(self.conf[i])

    def record(self, i, job):
        from vmwn import state
        return state.load(self.cfg(i), job)

    def remains(self, job, index):
        """What of ``job``'s guest on node ``index`` is left, anywhere."""
        from vmwn import state, virt
        cfg = self.cfg(index)
        found = []
        conn = virt.connect(cfg.site["libvirt_uri"])
        try:
            found += [f"domain {d.name()}" for d in virt.find_job(conn, job, index)]
        finally:
            conn.close()
        if os.path.lexists(state.job_dir(cfg, job)):
            found.append(f"state {state.job_dir(cfg, job)}")
        mine = set(jobnet.names(job, index))
        found += [f"device {d}" for d in (_links() | _links(self.ns[index])) & mine]
        return found


def _in_guest(st, command):
    from vmwn.ssh import Guest
    with Guest.connect(st) as g:
        status, out, err = g.run(command, timeout=60)
    return status, out.decode(errors="replace"), err.decode(errors="replace")


def _banner(st, host):
    """The first bytes the SSH server at ``host``:22 sends, asked from the guest of ``st``."""
    return _in_guest(st, f"echo | nc -w 5 {host} 22 | head -c 7")[1]


needs_netns = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")


@pytest.mark.integration
@needs_netns
@needs_image("tiny")
def test_a_jobs_guests_on_two_nodes_reach_each_other_and_no_other_job(tmp_path):
    base = qemu_reachable_dir()
    job, other = f"{700000 + RUN % 90000}.jobnet", f"{800000 + RUN % 90000}.jobnet"
    with contextlib.ExitStack() as stack:
        nodes = stack.enter_context(Nodes(base))
        stack.callback(subprocess.run, ["rm", "-rf", base])
        stack.callback(nodes.down, job)
        nodes.up(job)
        g0, g1 = nodes.record(0, job), nodes.record(1, job)
        assert g0.domain != g1.domain and g0.jobnet["vni"] == g1.jobnet["vni"]
        name0, name1 = domain.guest_hostname(job, 0), domain.guest_hostname(job, 1)
        status, out, _ = _in_guest(g0, "hostname; cat /sys/class/net/eth1/mtu; "
                                       "ip -o -4 addr show dev eth1; cat /etc/hosts")
        assert status == 0
        lines = out.splitlines()
        assert lines[0] == name0 and lines[1] == "1450"
        assert "inet 10.254.0.1/16" in lines[2]
        assert f"10.254.0.1 {name0}" in lines and f"10.254.0.2 {name1}" in lines
        # By name, both ways, over the segment between the two namespaces.
        assert _banner(g0, name1) == "SSH-2.0"
        assert _banner(g1, name0) == "SSH-2.0"
        # And as the job's user with the job's key, each host key pinned: the other
        # guest by name or address; a host the seed did not name is refused.
        assert _in_guest(g0, f"ssh {name1} hostname") == (0, name1 + "\n", "")
        assert _in_guest(g1, "ssh 10.254.0.1 'id -un; hostname'")[:2] == \
            (0, f"alice\n{name0}\n")
        status, _, err = _in_guest(g0, "ssh -o ConnectTimeout=10 127.0.0.1 true")
        assert status == 255 and "Host key verification failed" in err

        # Another job on the same two nodes, its guest on the first only: its
        # address is the first job's first guest's, and the rest is out of reach.
        stack.callback(nodes.down, other, (0,))
        nodes.up(other, (0,))
        o0 = nodes.record(0, other)
        assert o0.jobnet["vni"] != g0.jobnet["vni"]
        assert _banner(o0, "10.254.0.2") == ""
        assert _banner(g0, name1) == "SSH-2.0"  # the first job's segment still works
        nodes.down(other, (0,))
        assert nodes.remains(other, 0) == []

        nodes.down(job)
        assert nodes.remains(job, 0) == [] and nodes.remains(job, 1) == []
        assert _links(nodes.ns[0]) == {"lo", "eth0"} == _links(nodes.ns[1])


@pytest.mark.integration
@needs_netns
@needs_image("tiny")
def test_a_network_that_cannot_be_made_fails_the_start_and_leaves_nothing(tmp_path):
    """The tap's name is taken on the node: the start fails with the reason, and
    the VXLAN device and bridge made before it are gone with the job's record."""
    base = qemu_reachable_dir()
    job = f"{900000 + RUN % 90000}.jobnet"
    tap = jobnet.names(job, 0)[2]
    with contextlib.ExitStack() as stack:
        nodes = stack.enter_context(Nodes(base))
        stack.callback(subprocess.run, ["rm", "-rf", base])
        _sh("ip", "link", "add", tap, "type", "bridge")  # not a tap: vmwn leaves it
        stack.callback(_sh, "ip", "link", "del", tap, check=False)
        p = nodes.run(0, "up", job, 0, *nodes.addr)
        _, err = p.communicate(timeout=300)
        assert p.returncode == 1
        line = err.strip().splitlines()[-1]
        assert line.startswith("cannot make the job's network: ") and tap in line, err
        assert line.endswith("(modprobe vxlan bridge tun)")
        _sh("ip", "link", "del", tap)
        assert nodes.remains(job, 0) == []
        assert _links(nodes.ns[0]) == {"lo", "eth0"}


def test_the_tiny_guest_knows_the_seeds_lines():
    with open(os.path.join(ROOT, "vmwn", "guest", "tiny-init"), encoding="utf-8") as f:
        init = f.read()
    assert f"HOSTS_LINE='{seed.HOSTS_LINE}'" in init
    assert f"KEY_LINE='{seed.KEY_LINE}'" in init


def test_derived_keys_are_the_same_on_every_node_and_differ_per_secret_and_label():
    from vmwn import keys
    label = "host\0j\0" "1"
    a, b = keys.derive(b"s" * 32, label, "x"), keys.derive(b"s" * 32, label, "y")
    assert a.public_line.split()[:2] == b.public_line.split()[:2]
    others = {keys.derive(b"t" * 32, "host\0j\0" "1", "x").public_line.split()[1],
              keys.derive(b"s" * 32, "host\0j\0" "2", "x").public_line.split()[1]}
    assert a.public_line.split()[1] not in others and len(others) == 2


def test_a_job_secret_others_may_read_or_too_short_is_refused(tmp_path):
    from vmwn import keys
    path = tmp_path / "secret"
    with pytest.raises(SiteError, match="cannot read the job secret"):
        keys.read_secret(str(path))
    path.write_bytes(b"x" * 32)
    path.chmod(0o644)
    if os.geteuid() == 0:
        with pytest.raises(SiteError, match="not a file only root reads"):
            keys.read_secret(str(path))
        path.chmod(0o600)
        assert keys.read_secret(str(path)) == b"x" * 32
        path.write_bytes(b"x" * 16)
        with pytest.raises(SiteError, match="16 bytes, fewer than 32"):
            keys.read_secret(str(path))
    else:  # the file is this user's, not root's
        with pytest.raises(SiteError, match="not a file only root reads"):
            keys.read_secret(str(path))


def test_a_job_on_several_nodes_is_checked_like_any_other():
    from types import SimpleNamespace
    env = SimpleNamespace(name="tiny")
    ok = dict(job_id="1.s", user="alice", uid=5, gid=5, group="lab", job_name="j", env=env,
              vcpus=1, memory_mib=64, workdir="/home/alice", host_workdir="/home/alice")
    JobSpec(**ok, nodes=("n1", "n2.example.org"), node_index=1)
    for bad in (dict(nodes=("n1", "n2"), node_index=2), dict(nodes=("n1", "-x"), node_index=0),
                dict(nodes=("n1", "a b"), node_index=0)):
        with pytest.raises(SiteError):
            JobSpec(**ok, **bad)
    assert ipaddress.ip_address(jobnet.address(1)) in jobnet.SUBNET


def test_the_guests_node_file_names_the_guests_where_the_hosts_were():
    from vmwn.jobrun import guest_nodefile
    guests = [("tq2", "g-n0"), ("tq1.example.org", "g-n1")]
    assert guest_nodefile(b"tq2\ntq2\ntq1.example.org\n", guests) == b"g-n0\ng-n0\ng-n1\n"
    assert guest_nodefile(b"tq2.example.org\ntq1\n", guests) == b"g-n0\ng-n1\n"
    assert guest_nodefile(b"tq2\nother\n", guests) == b"g-n0\nother\n"
    assert guest_nodefile(b"tq2\n", []) == b"tq2\n"  # a one-node job's is its own
