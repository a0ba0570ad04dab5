"""harvest(cfg, st) as the epilogue calls it: as root, copying as the job user."""

import os
import pathlib

import pytest

from vmwn import config, transfer
from vmwn.errors import GuestLost

from test_privs import open_tmp, unpriv  # noqa: F401 - fixtures
from test_transfer_guestd import GuestServer


@pytest.fixture
def setup(unpriv, open_tmp):  # noqa: F811
    name, uid, gid, _ = unpriv
    base = pathlib.Path(open_tmp)
    conf = base / "vmwn.conf"
    conf.write_text(f"[site]\nstate_dir = {base}/state\nharvest_max = 1M\nsyslog = no\n")
    cfg = config.load(str(conf))
    srv = GuestServer(str(base / "guest" / "home"), username=name)
    key = srv.write_user_key(str(base / "key"), uid, gid)
    host = base / "host"
    host.mkdir()
    os.chown(host, uid, gid)
    gwork = base / "guest" / "work"
    gwork.mkdir(parents=True)
    st = srv.job_state("7.test", key, str(gwork), str(host), uid=uid, gid=gid)
    yield cfg, st, srv, host, gwork, uid
    srv.close()


def test_harvest_copies_as_the_job_user(setup):
    cfg, st, srv, host, gwork, uid = setup
    (gwork / "out.dat").write_bytes(b"\x01\x02" * 1000)
    (gwork / "sub").mkdir()
    (gwork / "sub" / "log").write_text("log")
    res = transfer.harvest(cfg, st)
    assert (res.files, res.bytes, res.truncated, res.problems) == (2, 2003, False, [])
    assert res.seconds > 0
    assert (host / "out.dat").read_bytes() == b"\x01\x02" * 1000
    for p in (host / "out.dat", host / "sub", host / "sub" / "log"):
        assert os.lstat(p).st_uid == uid


def test_harvest_cannot_write_where_the_user_cannot(setup):
    cfg, st, srv, host, gwork, uid = setup
    os.chown(host, 0, 0)
    os.chmod(host, 0o755)
    (gwork / "out.dat").write_text("x")
    res = transfer.harvest(cfg, st)
    assert res.files == 0
    assert res.problems == ["out.dat: Permission denied"]
    assert os.listdir(host) == []


def test_harvest_honours_harvest_max(setup):
    cfg, st, srv, host, gwork, uid = setup
    (gwork / "a").write_bytes(b"a" * 700000)
    (gwork / "b").write_bytes(b"b" * 700000)
    res = transfer.harvest(cfg, st)
    assert res.truncated and res.files == 1 and len(os.listdir(host)) == 1


def test_harvest_of_a_lost_guest_raises_guestlost(setup):
    cfg, st, srv, host, gwork, uid = setup
    srv.close()
    with pytest.raises(GuestLost):
        transfer.harvest(cfg, st, timeout=30)
