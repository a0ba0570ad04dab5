"""A whole VM job through ``vmwn run``: prologue boots, starter runs in the guest,
epilogue copies back and destroys.  Needs the tiny image (make guest GUESTS=tiny)."""

import os
import subprocess

import pytest

from conftest import VENV_PY, user_python_path

IMAGES = "/var/lib/vmwn/images/tiny"
pytestmark = pytest.mark.integration



def test_vm_job_end_to_end(world_tmp, test_user):
    if not all(os.path.exists(os.path.join(IMAGES, f))
               for f in ("disk.qcow2", "vmlinuz", "initrd.img")):
        pytest.skip("tiny image not built")
    from vmwn.torque import install
    root = world_tmp
    conf = os.path.join(root, "etc", "vmwn", "vmwn.conf")
    os.makedirs(os.path.dirname(conf))
    with open(conf, "w") as f:
        f.write(f"[site]\nstate_dir = {root}/state\noverlay_dir = {root}/overlays\n"
                f"pbs_home = {root}/torque\nsyslog = no\n\n[env tiny]\n"
                "image = tiny/disk.qcow2\nkernel = tiny/vmlinuz\ninitrd = tiny/initrd.img\n"
                "cmdline = console=ttyS0 no_timer_check quiet\naccel = qemu\nmemory = 256M\n")
    python, path = user_python_path()
    install.install(install.build_parser().parse_args(
        ["install", "--pbs-home", f"{root}/torque", "--sysconfdir", f"{root}/etc",
         "--prefix", f"{root}/prefix", "--python", python, "--pythonpath", path]))
    # Job ids (and so domain names) must not collide with other lanes' jobs sharing
    # this libvirtd: start the sequence somewhere of this node's own (as test_faults).
    with open(os.path.join(root, "torque", "mom_priv", "vmwn-run.seq"), "w") as f:
        f.write(f"{int.from_bytes(os.urandom(3), 'big') * 100}\n")
    submit = os.path.join(root, "submit")
    os.mkdir(submit)
    with open(os.path.join(submit, "job.sh"), "w") as f:
        f.write('#!/bin/sh\ncd "$PBS_O_WORKDIR"\necho "host=$(hostname) user=$(id -un)"\n'
                "cat input.txt\necho made > output.txt\nexit 4\n")
    with open(os.path.join(submit, "input.txt"), "w") as f:
        f.write("staged in\n")
    for n in ("", "job.sh", "input.txt"):
        os.chown(os.path.join(submit, n), test_user.pw_uid, test_user.pw_gid)
    r = subprocess.run([os.path.join(os.path.dirname(VENV_PY), "vmwn"), "--config", conf,
                        "run", "-u", test_user.pw_name, "-l", "other=vmwn=tiny",
                        "--prologalarm", "300", "job.sh"],
                       cwd=submit, capture_output=True, text=True, timeout=600)
    job_id = r.stdout.splitlines()[0]
    seq = job_id.split(".")[0]
    out = open(os.path.join(submit, f"job.sh.o{seq}")).read()
    err = open(os.path.join(submit, f"job.sh.e{seq}")).read()
    assert r.returncode == 4, (r.stdout, r.stderr, out, err)
    assert f"host=vmwn-" in out and f"user={test_user.pw_name}" in out, out
    assert "staged in" in out
    assert "copied back" not in out, (out, err)  # mounted: output.txt was written in place
    assert open(os.path.join(submit, "output.txt")).read() == "made\n"
    assert os.stat(os.path.join(submit, "output.txt")).st_uid == test_user.pw_uid
    # Only the node-wide lock files may remain; no job directory.
    assert [n for n in os.listdir(os.path.join(root, "state")) if not n.startswith(".")] == []
    dom = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
                         capture_output=True, text=True).stdout
    assert f"vmwn-{job_id}" not in dom
