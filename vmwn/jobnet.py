"""A job's private network: one VXLAN segment joining its guests on its nodes.

A job that spans several nodes gets a guest on each, and the guests need one
network of their own, as the job's native processes have the cluster's.  Each
guest gets a second network card on the job's segment and nothing else of it:

- a VXLAN device (VNI from the job's number) whose UDP socket lives in the node's
  own network namespace, the one the batch daemon runs in (where the node's
  address is), with every other node of the job as a flooding destination;
- in libvirt's network namespace (where QEMU runs; the same one on an ordinary
  node) a bridge holding that device and a tap, root's, which libvirt opens for
  the guest (``<interface type='ethernet'>``, ``managed='no'``) and hands to its
  QEMU: the job's user gets no device of the node.

None of the three gets an address or an IPv6 link-local one (``addrgenmode
none``): the node takes no part in the segment.  Another job's guest is on
another bridge and VNI and reaches nothing of it.  The three names hash the job
and the guest's index, so nodes that share one libvirt daemon (the tests' nodes
in network namespaces) keep theirs apart.  The guest on the job's i-th node
has address i+1 of :data:`SUBNET`; :func:`hosts` names them all.

Root makes them while the job's VM is prepared, with the job's record saved
first (:func:`up`), and :func:`down` removes whatever of them exists.
"""

import dataclasses
import hashlib
import ipaddress
import os
import re
import shutil
import socket

from . import netns, subp
from .errors import SiteError, UserError

SUBNET = ipaddress.ip_network("10.254.0.0/16")
VNI_MAX = (1 << 24) - 2
FIX = ("the node needs iproute2 and the kernel's vxlan, bridge and tun modules "
       "(modprobe vxlan bridge tun)")


@dataclasses.dataclass(frozen=True)
class Net:
    """One node's part of a job's network, as the job's state record keeps it."""
    vni: int
    index: int
    local: str
    peers: tuple
    port: int
    mtu: int
    bridge: str
    vxlan: str
    tap: str
    mac: str

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        d["peers"] = tuple(d.get("peers", ()))
        return cls(**d)

    def as_dict(self):
        d = dataclasses.asdict(self)
        d["peers"] = list(self.peers)
        return d

    @property
    def address(self):
        return address(self.index)


def vni(job_id):
    """The job's VXLAN id: its number where the id is a number and a server
    (``1234.server``, ``1234``), else a hash of the whole id (array subjobs
    share their number).  Concurrent jobs' numbers differ well within 2**24."""
    m = re.fullmatch(r"(\d+)(\..*)?", job_id)
    n = int(m.group(1)) if m else int(hashlib.sha256(job_id.encode()).hexdigest()[:8], 16)
    return n % VNI_MAX + 1


def names(job_id, index):
    """(bridge, vxlan, tap) device names of the job's guest ``index`` (<= 15 characters)."""
    h = hashlib.sha256(f"{job_id}\0{index}".encode()).hexdigest()[:10]
    return f"vjb{h}", f"vjx{h}", f"vjt{h}"


def address(index):
    """The address of the guest on the job's ``index``-th node."""
    return str(SUBNET.network_address + index + 1)


def mac(job_id, index):
    """A locally administered MAC for the guest ``index``, distinct within the job."""
    h = hashlib.sha256(f"{job_id}\0mac".encode()).digest()
    return "52:56:%02x:%02x:%02x:%02x" % (h[0], h[1], index >> 8 & 0xFF, index & 0xFF)


def plan(job_id, nodes, index, port=4789, mtu=1450):
    """This node's part of the network of a job whose nodes are ``nodes`` (names
    or addresses, in the job's order; this node is ``nodes[index]``)."""
    if len(nodes) > SUBNET.num_addresses - 2:
        raise UserError(f"the job spans {len(nodes)} nodes, more than a job's network "
                        f"holds ({SUBNET.num_addresses - 2})", "ask for fewer nodes")
    addrs = [resolve(n) for n in nodes]
    bridge, vxlan, tap = names(job_id, index)
    return Net(vni=vni(job_id), index=index, local=addrs[index],
               peers=tuple(a for i, a in enumerate(addrs) if i != index and a != addrs[index]),
               port=port, mtu=mtu, bridge=bridge, vxlan=vxlan, tap=tap,
               mac=mac(job_id, index))


def resolve(node):
    """A node's IPv4 address, as this node resolves it."""
    try:
        infos = socket.getaddrinfo(node, None, socket.AF_INET, socket.SOCK_DGRAM)
    except OSError as e:
        raise SiteError(f"cannot resolve the job's node {node!r}: {e}",
                        "make every node of the job resolve every other one") from None
    return infos[0][4][0]


def hosts(job_id, count, hostname):
    """(address, host name) of every guest of a job of ``count`` nodes, where
    ``hostname(i)`` names the guest on the i-th."""
    return [(address(i), hostname(i)) for i in range(count)]


def _tool(name):
    """A system program by name, wherever the hook's PATH lacks it (``bridge``)."""
    return shutil.which(name, path=subp.SBIN) or name


def _run(argv, where=None, check=True):
    argv = ([_tool("nsenter"), f"--net={where}"] if where else []) + \
        [_tool(argv[0])] + [str(a) for a in argv[1:]]
    cp = subp.run(argv, timeout=30, check=False, fix=FIX)
    if check and cp.returncode != 0:
        raise SiteError(f"cannot make the job's network: {' '.join(argv)}: "
                        f"{(cp.stderr or '').strip()[:200]}", FIX)
    return cp


def _ip(args, where=None, check=True):
    return _run(["ip"] + list(args), where, check)


def up(net):
    """Make this node's part of the job's network (root).  The VXLAN device is made
    in the node's namespace (:func:`vmwn.netns.origin`, or this one) and moved here."""
    origin = netns.origin()
    _ip(["link", "add", net.vxlan, "type", "vxlan", "id", net.vni, "local", net.local,
         "dstport", net.port], origin)
    for peer in net.peers:  # flooding: broadcasts and unknown destinations reach every node
        _run(["bridge", "fdb", "append", "00:00:00:00:00:00", "dev", net.vxlan, "dst", peer],
             origin)
    if origin:
        _ip(["link", "set", net.vxlan, "netns", os.getpid()], origin)
    _ip(["link", "add", net.bridge, "type", "bridge"])
    _ip(["tuntap", "add", "dev", net.tap, "mode", "tap"])
    for dev in (net.bridge, net.vxlan, net.tap):
        _ip(["link", "set", dev, "addrgenmode", "none", "mtu", net.mtu])
    for dev in (net.vxlan, net.tap):
        _ip(["link", "set", dev, "master", net.bridge])
    for dev in (net.vxlan, net.tap, net.bridge):
        _ip(["link", "set", dev, "up"])


def down(net):
    """Remove whatever of this node's part exists (idempotent); returns what was
    removed.  A device is removed only if it is of the kind vmwn made under its
    name (a tap, a bridge, this VNI's VXLAN device); one that stays raises
    SiteError, so that the job's record stays for a later teardown to retry."""
    removed = []
    places = [None] + ([netns.origin()] if netns.origin() else [])
    kinds = ((net.tap, "tun type tap"), (net.bridge, "bridge "),
             (net.vxlan, f"vxlan id {net.vni} "))
    for where in places:
        for dev, kind in kinds:
            shown = _ip(["-d", "-o", "link", "show", "dev", dev], where, check=False)
            if shown.returncode != 0 or kind not in shown.stdout:
                continue
            _ip(["link", "del", dev], where)
            removed.append(f"network device {dev}")
    return removed


__all__ = ["Net", "SUBNET", "vni", "names", "address", "mac", "plan", "resolve", "hosts",
           "up", "down"]
