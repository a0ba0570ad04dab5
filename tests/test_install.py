"""make install / uninstall into a staging DESTDIR: modes, idempotence, site files kept."""

import os
import pathlib
import stat

import pytest

from vmwn.torque import install
from vmwn.errors import SiteError
from vmwn.torque.hooks import dispatch

from conftest import REPO, VENV_PY

MOM = "var/spool/torque/mom_priv"


def opts(destdir, action="install", *extra):
    return install.build_parser().parse_args(
        [action, "--pbs-home", "/var/spool/torque", "--destdir", str(destdir),
         "--sysconfdir", "/etc", "--prefix", "/usr/local", "--python", VENV_PY, *extra])


def tree(root):
    """Every path under root with its mode, owner and content."""
    out = {}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(d, n)
            st = os.lstat(p)
            content = open(p, "rb").read() if stat.S_ISREG(st.st_mode) else None
            out[os.path.relpath(p, root)] = (stat.S_IMODE(st.st_mode), st.st_uid, content)
    return out


def test_install_layout_modes_and_ownership(tmp_path):
    install.install(opts(tmp_path))
    mom = tmp_path / MOM
    for hook in dispatch.HOOKS:
        st = os.lstat(mom / hook)
        assert stat.S_ISREG(st.st_mode) and st.st_uid == 0
        assert stat.S_IMODE(st.st_mode) == 0o755
        assert (mom / hook).read_text().startswith("#!/bin/sh\n")
    for fam in ("prologue", "epilogue"):
        d = mom / f"{fam}.d"
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o755 and os.stat(d).st_uid == 0
        text = (d / "50-vmwn").read_text()
        assert text.startswith("#!/bin/sh\n")
        assert f"\nPYTHON={VENV_PY}\n" in text
        assert "\nCONFIG=/etc/vmwn/vmwn.conf\n" in text
        assert "\nPBS_HOME=/var/spool/torque\n" in text
        if fam == "epilogue":  # the gate, with the state directory as vmwn.conf says
            assert "\nSTATE_DIR=/var/lib/vmwn/jobs\n" in text
            assert "vmwn_job_dir() {" in text and "@vmwn_job_dir@" not in text
        assert stat.S_IMODE(os.stat(d / "50-vmwn").st_mode) == 0o755
        # the dispatcher names the directory as the node sees it, not the staging path
        assert f"steps=/var/spool/torque/mom_priv/{fam}.d\n" in (mom / fam).read_text()
    starter = tmp_path / "usr/local/libexec/vmwn/job-starter"
    assert stat.S_IMODE(os.stat(starter).st_mode) == 0o755
    assert "from vmwn.torque.hooks.starter import main" in starter.read_text()
    assert starter.read_text().startswith("#!/bin/sh\n# vmwn job starter ($job_starter)")
    assert (mom / "config").read_text().splitlines()[-1] == \
        "$job_starter /usr/local/libexec/vmwn/job-starter"
    conf = tmp_path / "etc/vmwn/vmwn.conf"
    with open("etc/vmwn.conf") as f:
        sample = f.read()
    assert conf.read_text() == sample.replace(
        "[site]\n", "[site]\ntemplate_dir = /usr/local/share/vmwn/templates\n", 1)
    templates = tmp_path / "usr/local/share/vmwn/templates"
    for name in install.BUNDLED_TEMPLATES:
        assert (templates / name).read_text() == (pathlib.Path("templates") / name).read_text()
        assert stat.S_IMODE(os.stat(templates / name).st_mode) == 0o644


def test_uninstall_removes_the_bundled_templates_and_keeps_a_sites_own(tmp_path):
    install.install(opts(tmp_path))
    templates = tmp_path / "usr/local/share/vmwn/templates"
    (templates / "site.xml.j2").write_text("<domain/>")
    install.uninstall(opts(tmp_path, "uninstall"))
    assert sorted(os.listdir(templates)) == ["site.xml.j2"]


def test_installed_step_is_accepted_by_the_dispatcher_contract(tmp_path):
    install.install(opts(tmp_path))
    st = os.stat(tmp_path / MOM / "prologue.d" / "50-vmwn")
    assert st.st_uid == 0 and st.st_mode & 0o500 == 0o500 and not st.st_mode & 0o022


def test_install_is_idempotent(tmp_path):
    install.install(opts(tmp_path))
    first = tree(tmp_path)
    install.install(opts(tmp_path))
    assert tree(tmp_path) == first
    assert (tmp_path / MOM / "config").read_text().count("$job_starter") == 1


def test_existing_mom_config_and_site_files_are_preserved(tmp_path):
    mom = tmp_path / MOM
    (mom / "prologue.d").mkdir(parents=True)
    site_cfg = "$pbsserver head.example.org\n$prologalarm 600\n$usecp *:/home /home"
    (mom / "config").write_text(site_cfg)
    (mom / "prologue.d" / "10-site").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "etc/vmwn").mkdir(parents=True)
    (tmp_path / "etc/vmwn/vmwn.conf").write_text("[site]\n# the site's own\n")
    install.install(opts(tmp_path))
    text = (mom / "config").read_text()
    assert text.startswith(site_cfg + "\n")
    assert "$job_starter /usr/local/libexec/vmwn/job-starter" in text
    assert (tmp_path / "etc/vmwn/vmwn.conf").read_text() == "[site]\n# the site's own\n"

    install.uninstall(opts(tmp_path, "uninstall"))
    assert (mom / "config").read_text() == site_cfg + "\n"
    assert (mom / "prologue.d" / "10-site").exists()
    assert not (mom / "prologue.d" / "50-vmwn").exists()
    assert not (mom / "epilogue.d").exists()
    for hook in dispatch.HOOKS:
        assert not (mom / hook).exists()
    assert not (tmp_path / "usr/local/libexec/vmwn").exists()
    assert (tmp_path / "etc/vmwn/vmwn.conf").read_text() == "[site]\n# the site's own\n"
    # uninstalling twice is harmless
    assert install.uninstall(opts(tmp_path, "uninstall")) == []


def test_foreign_prologue_is_never_overwritten(tmp_path):
    mom = tmp_path / MOM
    mom.mkdir(parents=True)
    (mom / "epilogue").write_text("#!/bin/sh\n# the site's epilogue\n")
    with pytest.raises(Exception) as e:
        install.install(opts(tmp_path))
    assert "epilogue.d" in str(e.value)
    assert (mom / "epilogue").read_text() == "#!/bin/sh\n# the site's epilogue\n"
    assert not (mom / "prologue").exists()   # nothing was half-installed
    install.uninstall(opts(tmp_path, "uninstall"))
    assert (mom / "epilogue").exists()


def test_foreign_job_starter_refused(tmp_path):
    mom = tmp_path / MOM
    mom.mkdir(parents=True)
    (mom / "config").write_text("$job_starter /opt/site/starter\n")
    with pytest.raises(Exception) as e:
        install.install(opts(tmp_path))
    assert "/opt/site/starter" in str(e.value)
    assert (mom / "config").read_text() == "$job_starter /opt/site/starter\n"


def test_template_dir_goes_into_a_new_config(tmp_path):
    install.install(opts(tmp_path, "install", "--template-dir", "/opt/vmwn/templates"))
    text = (tmp_path / "etc/vmwn/vmwn.conf").read_text()
    assert "[site]\ntemplate_dir = /opt/vmwn/templates\n" in text


def test_a_sample_config_naming_its_template_dir_keeps_one(tmp_path):
    """A duplicate key makes a config no vmwn command can read."""
    sample = tmp_path / "sample.conf"
    sample.write_text("[site]\nstate_dir = /var/lib/vmwn/jobs\ntemplate_dir = /srv/t\n\n"
                      "[env tiny]\nimage = tiny/disk.qcow2\n")
    install.install(opts(tmp_path / "a", "install", "--sample-config", str(sample)))
    text = (tmp_path / "a/etc/vmwn/vmwn.conf").read_text()
    assert text == sample.read_text()
    install.install(opts(tmp_path / "b", "install", "--sample-config", str(sample),
                         "--template-dir", "/opt/vmwn/templates"))
    text = (tmp_path / "b/etc/vmwn/vmwn.conf").read_text()
    assert text == sample.read_text().replace("/srv/t", "/opt/vmwn/templates")


def test_command_line_entry(tmp_path, capsys):
    assert install.main(["install", "--pbs-home", "/var/spool/torque", "--destdir",
                         str(tmp_path), "--prefix", "/opt/vmwn"]) == 0
    assert (tmp_path / "opt/vmwn/libexec/vmwn/job-starter").exists()
    assert install.main(["install", "--pbs-home", "relative/path", "--destdir",
                         str(tmp_path)]) == 3     # a SiteError, as for the vmwn command
    assert "absolute" in capsys.readouterr().err


def test_interpreter_usable_by_others():
    assert install.others_can_execute("/bin/sh")
    assert not install.others_can_execute("/nonexistent/python")


def test_admin_guide_documents_every_configuration_key():
    from vmwn import config
    from conftest import REPO
    with open(os.path.join(REPO, "docs", "admin-guide.md")) as f:
        guide = f.read()
    for table in (config.SITE_KEYS, config.ENV_KEYS):
        for k in table.values():
            assert f"| `{k.name}` |" in guide and k.doc in guide, k.name


def test_qemu_launcher_installed_beside_the_starter_and_removed_with_it(tmp_path):
    install.install(opts(tmp_path))
    launcher = tmp_path / "usr/local/libexec/vmwn/qemu"
    st = os.stat(launcher)
    assert stat.S_IMODE(st.st_mode) == 0o755 and st.st_uid == 0
    assert launcher.read_bytes().startswith(b"\x7fELF")  # the C launcher, no interpreter
    assert b"vmwn's QEMU launcher" in launcher.read_bytes()
    keeper = launcher.parent / "keeper"  # and the keeper beside it, also removed with it
    assert os.access(keeper, os.X_OK) and b"usage: vmwn-keeper" in keeper.read_bytes()
    # the default prefix needs no configuration: [site] emulator's default is this path
    assert not (tmp_path / "etc/vmwn/vmwn.conf.d" / install.DROPIN).exists()
    install.uninstall(opts(tmp_path))
    assert not launcher.exists() and not keeper.exists() and not launcher.parent.exists()


def test_another_prefix_names_the_launcher_in_a_dropin(tmp_path):
    o = opts(tmp_path)
    o.prefix = "/opt/vmwn"
    install.install(o)
    dropin = tmp_path / "etc/vmwn/vmwn.conf.d" / install.DROPIN
    assert "emulator = /opt/vmwn/libexec/vmwn/qemu\n" in dropin.read_text()
    from vmwn import config
    cfg = config.load(str(tmp_path / "etc/vmwn/vmwn.conf"))
    assert cfg.site["emulator"] == "/opt/vmwn/libexec/vmwn/qemu"
    install.uninstall(o)
    assert not dropin.exists()


def test_foreign_launcher_is_never_overwritten(tmp_path):
    p = tmp_path / "usr/local/libexec/vmwn/qemu"
    p.parent.mkdir(parents=True)
    p.write_text("#!/bin/sh\nexec /usr/bin/qemu-system-x86_64 \"$@\"\n")
    with pytest.raises(SiteError, match="is not vmwn's"):
        install.install(opts(tmp_path))
    assert "exec /usr/bin/qemu" in p.read_text()


def test_a_wheel_installs_a_node_with_its_console_command(tmp_path):
    """pip install of the wheel, then vmwn-install: hooks, starter, launcher, templates and
    the sample configuration, as 'make install' installs them from the source tree."""
    import subprocess
    import sys
    import shutil
    import zipfile
    # Built from a copy of the tracked files: a checkout's build/ may hold modules
    # that no longer exist, and setuptools would put them in the wheel.
    src = tmp_path / "src"
    tracked = subprocess.run(["git", "-C", REPO, "ls-files", "-z"], capture_output=True,
                             check=True).stdout.decode().split("\0")
    for rel in filter(None, tracked):
        if os.path.isfile(os.path.join(REPO, rel)):
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.join(REPO, rel), src / rel)
    wheels = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                        "--no-build-isolation", "-w", str(wheels), str(src)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    whl = next(wheels.glob("vmwn-*.whl"))
    modules = {n for n in zipfile.ZipFile(whl).namelist()
               if n.startswith("vmwn/") and n.endswith(".py")}
    assert modules == {rel for rel in tracked if rel.startswith("vmwn/") and rel.endswith(".py")}
    assert "vmwn/torque/hooks/jobdir.sh" in zipfile.ZipFile(whl).namelist()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    r = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps",
                        "--disable-pip-version-check", str(whl)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    root = tmp_path / "node"
    r = subprocess.run([str(venv / "bin" / "vmwn-install"), "install", "--destdir", str(root),
                        "--qstat", ""], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr
    # The wheel's venv has no pbs_python: the site is told what that costs.
    assert "pbs_python is not importable" in r.stderr and "VMWN_ENV" in r.stderr
    mom = root / "var/spool/torque/mom_priv"
    for fam in ("prologue", "epilogue"):
        assert "from vmwn.torque.hooks." in (mom / f"{fam}.d" / "50-vmwn").read_text()
    assert (root / "usr/local/libexec/vmwn/job-starter").read_text().startswith("#!/bin/sh")
    from vmwn import relay
    built = [("qemu", b"vmwn's QEMU launcher"), ("keeper", b"usage: vmwn-keeper")] + \
        ([("relay", b"usage: vmwn-relay")] if relay.buildable() else [])
    for name, mark in built:  # built from the wheel's C sources
        assert mark in (root / "usr/local/libexec/vmwn" / name).read_bytes(), name
    conf = (root / "etc/vmwn/vmwn.conf").read_text()
    assert "template_dir = /usr/local/share/vmwn/templates" in conf
    share = venv / "share" / "vmwn"
    for name in ("domain.xml.j2", "meta-data.j2", "user-data.j2"):
        assert (root / "usr/local/share/vmwn/templates" / name).read_bytes() == \
            (share / "templates" / name).read_bytes()
