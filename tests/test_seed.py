"""The cloud-init seed: hostile values reach YAML only as quoted scalars, keys stay private."""

import os
import stat
import subprocess

import pytest
import yaml

from vmwn import keys, seed

ROOT = os.path.dirname(os.path.dirname(__file__))
TEMPLATES = os.path.join(ROOT, "templates")


def ctx(**kw):
    host = keys.generate("vmwn-host:test")
    user = keys.generate("vmwn-job:test")
    args = dict(job_id="5.srv", instance_id="vmwn-5", hostname="vmwn-5", user="alice",
                uid=1234, gid=2345, group="grp", shell="/bin/sh", workdir="/home/alice/run",
                hostkey=host, userkey=user)
    args.update(kw)
    return seed.context(**args), host, user


@pytest.mark.parametrize("workdir", [
    "/home/alice/a: b", "/tmp/x\ny: z", "/tmp/'\"quoted\"'", "/tmp/- [list]", "/tmp/#comment",
    "/tmp/{flow: map}", "/tmp/&anchor *alias", "/tmp/ü€\U0001F600", "/tmp/!!python/object",
    "/tmp/%TAG", "/tmp/\\backslash\\", "/tmp/\ttab",
])
def test_user_data_survives_hostile_values(workdir):
    c, host, user = ctx(workdir=workdir, job_id=workdir)
    ud, md = seed.render(TEMPLATES, c)
    assert ud.startswith("#cloud-config\n")
    data = yaml.safe_load(ud)
    assert data["bootcmd"][1][-1] == "/home/alice"
    assert data["bootcmd"][2][-1] == workdir
    assert data["bootcmd"][0] == ["groupadd", "-o", "-g", "2345", "grp"]
    u = data["users"][0]
    assert (u["name"], u["uid"], u["primary_group"]) == ("alice", 1234, "grp")
    assert u["ssh_authorized_keys"] == [user.public_line]
    assert data["ssh_keys"]["ed25519_private"].strip() == host.private_openssh.strip()
    assert data["ssh_keys"]["ed25519_public"] == host.public_line
    assert data["ssh_genkeytypes"] == ["ed25519"] and data["disable_root"] is True
    assert yaml.safe_load(md) == {"instance-id": "vmwn-5", "local-hostname": "vmwn-5"}


def test_seed_iso_has_cidata_label_and_both_files(tmp_path):
    c, _, _ = ctx()
    ud, md = seed.render(TEMPLATES, c)
    path = seed.build_iso(str(tmp_path / "seed.iso"), ud, md)
    with open(path, "rb") as f:
        f.seek(0x8000)
        pvd = f.read(2048)
    assert pvd[1:6] == b"CD001" and pvd[40:72].rstrip() == b"cidata"
    # it carries the guest's private host key: private from the moment it has its name
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    # isoinfo comes with genisoimage, which vmwn needs anyway (make deps)
    out = subprocess.run(["isoinfo", "-R", "-f", "-i", path], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert {"/user-data", "/meta-data"} <= set(out.stdout.split())
    assert not [n for n in os.listdir(tmp_path) if n != "seed.iso"]  # no temp files left


def test_private_key_file_is_0600_owned_and_refuses_symlinks(tmp_path):
    pair = keys.generate("c")
    p = keys.write_private(str(tmp_path / "id"), pair, 4321, 4322)
    st = os.lstat(p)
    assert stat.S_IMODE(st.st_mode) == 0o600 and (st.st_uid, st.st_gid) == (4321, 4322)
    assert open(p).read().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    os.symlink("/etc/passwd", tmp_path / "link")
    from vmwn.errors import SiteError
    with pytest.raises(SiteError):
        keys.write_private(str(tmp_path / "link"), pair, 4321, 4322)


def test_keys_are_fresh_and_paramiko_can_load_them(tmp_path):
    import io

    import paramiko
    a, b = keys.generate("x"), keys.generate("x")
    assert a.public_line != b.public_line
    k = paramiko.Ed25519Key.from_private_key(io.StringIO(a.private_openssh))
    assert a.public_line.split()[1] == k.get_base64()
