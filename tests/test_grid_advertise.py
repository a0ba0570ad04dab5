"""``vmwn advertise`` without a directory server: content, required keys, refusals."""

import dataclasses
import datetime

import pytest

from vmwn import config
from vmwn.cli import main
from vmwn.errors import SiteError
from vmwn.grid import glue

from test_grid_ldif import read_ldif

GRID = {"site_name": "EXAMPLE-SITE", "ce_id": "ce.example.org:8443/cream-pbs-batch",
        "cluster": "ce.example.org", "subcluster": "sub.ce.example.org",
        "computing_manager": "ce.example.org_ComputingElement_Manager",
        "computing_service": "ce.example.org_ComputingElement"}


def make_config(tmp_path, present=("tiny",), grid=GRID):
    """A vmwn.conf in tmp_path; images of ``present`` environments exist (empty files)."""
    images = tmp_path / "images"
    for env in ("tiny", "debian12"):
        (images / env).mkdir(parents=True, exist_ok=True)
        if env in present:
            for f in ("disk.qcow2", "vmlinuz", "initrd.img"):
                (images / env / f).write_bytes(b"")
    lines = ["[site]", f"image_dir = {images}", "", "[grid]"]
    lines += [f"{k} = {v}" for k, v in grid.items()]
    for env, desc in (("tiny", "Minimal guest"), ("debian12", "Debian 12 (bookworm)")):
        lines += ["", f"[env {env}]", f"description = {desc}", f"image = {env}/disk.qcow2",
                  f"kernel = {env}/vmlinuz", f"initrd = {env}/initrd.img", "accel = qemu"]
    path = tmp_path / "vmwn.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


def entries(text):
    return {dn: attrs for dn, attrs in read_ldif(text)}


def values(attrs, name):
    return [v for a, v in attrs if a == name]


def test_glue1_advertises_present_environments_upper_cased(tmp_path, capsys, caplog):
    path = make_config(tmp_path, present=("tiny",))
    assert main(["--config", str(path), "advertise", "--glue1"]) == 0
    out = capsys.readouterr()
    recs = entries(out.out)
    sub_dn = ("GlueSubClusterUniqueID=sub.ce.example.org,GlueClusterUniqueID=ce.example.org,"
              "mds-vo-name=resource,o=grid")
    cluster_dn = "GlueClusterUniqueID=ce.example.org,mds-vo-name=resource,o=grid"
    assert set(recs) == {cluster_dn, sub_dn}
    sub = recs[sub_dn]
    assert values(sub, "GlueHostApplicationSoftwareRunTimeEnvironment") == ["VMWN-TINY"]
    assert values(sub, "GlueChunkKey") == ["GlueClusterUniqueID=ce.example.org"]
    assert values(sub, "GlueSubClusterUniqueID") == ["sub.ce.example.org"]
    cluster = recs[cluster_dn]
    assert sorted(values(cluster, "GlueForeignKey")) == [
        "GlueCEUniqueID=ce.example.org:8443/cream-pbs-batch", "GlueSiteUniqueID=EXAMPLE-SITE"]
    warned = [r.getMessage() for r in caplog.records if r.name == "vmwn.grid.glue"]
    assert any("not advertising environment debian12" in m for m in warned)
    assert "GLUE2" not in out.out


def test_glue2_one_application_environment_per_present_environment(tmp_path, capsys):
    path = make_config(tmp_path, present=("tiny", "debian12"))
    assert main(["--config", str(path), "advertise", "--glue2"]) == 0
    recs = entries(capsys.readouterr().out)
    assert len(recs) == 2
    names = {}
    for dn, attrs in recs.items():
        assert dn.endswith(",GLUE2GroupID=resource,o=glue")
        assert values(attrs, "objectClass")[-1] == "GLUE2ApplicationEnvironment"
        assert values(attrs, "GLUE2ApplicationEnvironmentComputingManagerForeignKey") == [
            GRID["computing_manager"]]
        (app,) = values(attrs, "GLUE2ApplicationEnvironmentAppName")
        (app_id,) = values(attrs, "GLUE2ApplicationEnvironmentID")
        assert dn.startswith("GLUE2ApplicationEnvironmentID=" + app_id + ",")
        names[app] = values(attrs, "GLUE2EntityOtherInfo")
    assert names == {"VMWN-TINY": ["PBSRequest=-l other=vmwn=tiny"],
                     "VMWN-DEBIAN12": ["PBSRequest=-l other=vmwn=debian12"]}


def test_default_prints_both_glue_versions(tmp_path, capsys):
    path = make_config(tmp_path)
    assert main(["--config", str(path), "advertise"]) == 0
    out = capsys.readouterr().out
    assert "mds-vo-name=resource,o=grid" in out and "GLUE2GroupID=resource,o=glue" in out


def test_no_images_means_nothing_advertised(tmp_path, capsys):
    path = make_config(tmp_path, present=())
    assert main(["--config", str(path), "advertise"]) == 0
    out = capsys.readouterr().out
    assert "VMWN-" not in out
    assert "GLUE2ApplicationEnvironment" not in out


def test_glue1_and_glue2_flags_exclude_each_other(tmp_path):
    path = make_config(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["--config", str(path), "advertise", "--glue1", "--glue2"])
    assert e.value.code == 2


def test_missing_cluster_is_a_site_error(tmp_path, capsys):
    grid = {k: v for k, v in GRID.items() if k != "cluster"}
    path = make_config(tmp_path, grid=grid)
    assert main(["--config", str(path), "advertise", "--glue1"]) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "[grid] cluster is not set" in err


def test_missing_computing_manager_is_a_site_error(tmp_path, capsys):
    grid = {k: v for k, v in GRID.items() if k != "computing_manager"}
    path = make_config(tmp_path, grid=grid)
    assert main(["--config", str(path), "advertise", "--glue2"]) == 3
    assert "computing_manager" in capsys.readouterr().err


def test_subcluster_defaults_to_cluster(tmp_path):
    grid = {k: v for k, v in GRID.items() if k != "subcluster"}
    cfg = config.load(str(make_config(tmp_path, grid=grid)))
    recs = entries("\n".join(glue.glue1_entries(cfg)))
    assert ("GlueSubClusterUniqueID=ce.example.org,GlueClusterUniqueID=ce.example.org,"
            "mds-vo-name=resource,o=grid") in recs


def test_non_ascii_glue1_identifier_is_refused_naming_the_key(tmp_path):
    cfg = config.load(str(make_config(tmp_path)))
    cfg = dataclasses.replace(cfg, grid={**cfg.grid, "site_name": "S\u00e3o-Paulo"})
    with pytest.raises(SiteError) as e:
        glue.glue1_entries(cfg)
    assert "site_name" in str(e.value) and "IA5" in str(e.value)
    # GLUE 2.0 strings are UTF-8 and carry it.
    assert glue.glue2_entries(cfg)


def test_creation_time_is_iso8601_utc(tmp_path):
    cfg = config.load(str(make_config(tmp_path)))
    now = datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc)
    (rec,) = glue.glue2_entries(cfg, now=now)
    assert "GLUE2EntityCreationTime: 2024-05-06T07:08:09Z" in rec
