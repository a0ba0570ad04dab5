"""The configuration table: defaults, drop-ins, and rejection of anything unknown or bad."""

import pytest

from vmwn import config
from vmwn.errors import SiteError, UserError

BASE = """
[site]
state_dir = /var/tmp/vmwn-state
[env tiny]
image = tiny/disk.qcow2
kernel = tiny/vmlinuz
initrd = tiny/initrd.img
accel = qemu
memory = 256M
"""


def write(tmp_path, text, name="vmwn.conf"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_defaults_and_relative_paths(tmp_path):
    cfg = config.load(write(tmp_path, BASE))
    env = cfg.env("tiny")
    assert env.image == "/var/lib/vmwn/images/tiny/disk.qcow2"
    assert env.memory_mib == 256 and env.vcpus == 1 and env.accel == "qemu"
    assert cfg.site["state_dir"] == "/var/tmp/vmwn-state"
    assert cfg.site["port_range"] == (40000, 40999)


def test_dropins_override_in_name_order(tmp_path):
    path = write(tmp_path, BASE)
    d = tmp_path / "vmwn.conf.d"
    d.mkdir()
    (d / "20-b.conf").write_text("[env tiny]\nmemory = 1G\n")
    (d / "10-a.conf").write_text("[env tiny]\nmemory = 512M\n[env other]\nkernel = /k\n")
    cfg = config.load(path)
    assert cfg.env("tiny").memory_mib == 1024
    assert set(cfg.environments) == {"tiny", "other"}
    assert len(cfg.files) == 3


@pytest.mark.parametrize("text, needle", [
    ("[site]\nstate_dri = /x\n", "unknown key 'state_dri'"),
    ("[sight]\n", "unknown section [sight]"),
    ("[env tiny]\nkernel = /k\naccel = xen\n", "bad value for accel"),
    ("[env tiny]\nkernel = /k\nvcpus = 0\n", "bad value for vcpus"),
    ("[env tiny]\nkernel = /k\nmemory = lots\n", "bad value for memory"),
    ("[env tiny]\nkernel = /k\nmemory = 512k\n", "less than 1 MiB"),
    ("[env tiny]\nkernel = /k\nmemory = 0\n", "at least 1M"),
    ("[env tiny]\ndescription = no disk\n", "neither image nor kernel"),
    ("[env tiny]\nkernel = /k\nvcpus = 8\nmax_vcpus = 2\n", "exceeds max_vcpus"),
    ("[env ../etc]\nkernel = /k\n", "environment names"),
    ("[site]\nbind_address = 0.0.0.0\n", "loopback only"),
    ("[site]\nport_range = 80-90\n", "bad value for port_range"),
    ("[site]\nstate_dir = relative\n", "absolute path"),
    ("[site]\nqueue_defaults = batch:nosuch\n", "unknown environment 'nosuch'"),
    ("[site]\nno equals sign here\n", "cannot parse"),
])
def test_bad_configuration_names_file_key_and_reason(tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(SiteError) as e:
        config.load(path)
    line = str(e.value)
    assert needle in line
    assert "\n" not in line
    if "unknown section" not in needle and "cannot parse" not in needle:
        assert path in line


def test_missing_file_is_a_site_error_with_the_fix(tmp_path):
    with pytest.raises(SiteError, match="no vmwn configuration.*make install"):
        config.load(str(tmp_path / "nope.conf"))


def test_unknown_environment_is_the_users_mistake_and_lists_choices(tmp_path):
    cfg = config.load(write(tmp_path, BASE))
    with pytest.raises(UserError, match=r"unknown vmwn environment 'nosuch'.*tiny"):
        cfg.env("nosuch")


@pytest.mark.parametrize("text, mib", [("256", 256), ("256M", 256), ("2G", 2048), ("2GiB", 2048),
                                       ("512mb", 512), ("1t", 1 << 20)])
def test_sizes(text, mib):
    assert config.parse_size_mib(text) == mib


def test_every_key_is_documented():
    for table in (config.SITE_KEYS, config.ENV_KEYS, config.GRID_KEYS):
        for key in table.values():
            assert key.doc.strip(), key.name
