"""vmwn on Debian 13 from a Debian 12 machine: ``scripts/debian13-smoke`` boots the
tiny guest with ``vmwn check --boot`` in both data modes inside a Debian 13 root
(its QEMU 10, libvirt 11, Rust virtiofsd and Python 3.13), in mount and network
namespaces of its own, a job there writes the hostile tree through the mounted mode
(``tests/debian13_tree.py``), this machine's Torque runs a user's VM jobs in both data
modes there (``tests/debian13_torque.py``), and so does Debian 13's Slurm 24.11 with
vmwn's SPANK plugin built there (``tests/debian13_slurm.py``).  On a Debian 13 machine the whole
suite runs there and this test skips; without the root (``make debian13-root``) it
skips too."""

import glob
import os
import re
import subprocess

import pytest

from vmwn_testlib import debian_major, needs_image, ROOT

ROOT13 = "/var/lib/vmwn-debian13"
SMOKE = os.path.join(ROOT, "scripts", "debian13-smoke")
TORQUE = os.environ.get("TORQUE_PREFIX", "/opt/vmwn-torque")


@pytest.mark.integration
@needs_image("tiny")
def test_a_guest_boots_in_both_data_modes_on_debian_13():
    if debian_major() != "12":
        pytest.skip("this machine is not Debian 12: the whole suite runs on its own Debian")
    if not glob.glob(os.path.join(ROOT13, ".vmwn-*")):
        pytest.skip(f"no Debian 13 root in {ROOT13} ('make debian13-root' builds it)")
    r = subprocess.run([SMOKE, "--root", ROOT13], capture_output=True, text=True, timeout=900)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    versions = re.search(r"^debian13-smoke: (13\.\S+), QEMU emulator version (\d+)\.\S+ .*"
                         r"libvirtd \(libvirt\) (\d+)\.\S+, virtiofsd (\S+), Python (3\.\d+)",
                         out, re.M)
    assert versions, out
    assert int(versions.group(2)) >= 10 and int(versions.group(3)) >= 11, versions.groups()
    for data in ("mounted", "copy"):
        assert re.search(rf"^boot tiny\S*: job \S+, data = {data}, as vmwncheck ", out, re.M), out
    assert "share: " in out and "mounted in the guest at the same path: ok" in out
    assert "staged into the guest at the same path: ok" in out
    assert out.count("\nteardown: no domain, virtiofsd, overlay, seed, key, state directory or "
                     "working directory left: ok\nall checks passed\n") == 2, out
    # Two jobs restored from one prepared guest, their directories hot-plugged
    # through the Rust virtiofsd: each unique, its clock the host's, nothing left.
    # In the copy mode QEMU 10 maps the prepared memory private: two restored
    # guests share its pages.
    assert re.search(r"^warm tinywarm \(mounted\): 2 restored, \d+ MiB memory, \d+ KiB "
                     r"state: ok$", out, re.M), out
    assert re.search(r"^warm tinywarmcopy \(copy\): 2 restored, .*, its own memory \d+ MiB "
                     r"per restored guest, \d+ MiB booted \(\S+\), \d+ MiB of the prepared "
                     r"memory shared: ok$", out, re.M), out
    # A job's hostile tree (names that are not UTF-8, 1200 directories, 300 deep,
    # sparse, symlink, fifo) through Debian 13's virtiofsd, every byte on the host.
    torque = os.access(os.path.join(TORQUE, "sbin", "pbs_mom"), os.X_OK)
    if not torque:  # (with Torque, its mounted job below writes the tree)
        assert "\ntree tiny (mounted): ok\n" in out, out
    # This machine's Torque (make torque) in the root, vmwn installed there as a site
    # would: a user's job from its home in each data mode, in a guest, exit 3, its
    # file and hostile tree back, nothing left.
    if torque:
        for env, data in (("tiny", "mounted"), ("tinycopy", "copy")):
            assert re.search(rf"^torque {env} \({data}\): vmwn-\S+, kernel \S+, exit 3, file "
                             r"and tree: ok$", out, re.M), out
    else:
        assert "no Torque built" in out, out
    # Debian 13's Slurm 24.11 with vmwn's SPANK plugin compiled there: a VM job's exit
    # status in scontrol and sacct, a refusal at submission, srun in a guest, the node
    # idle after each and nothing left.
    slurm = re.search(r"^slurm \(slurm-wlm (\d+)\.(\d+)\S*\) ", out, re.M)
    assert slurm and (int(slurm.group(1)), int(slurm.group(2))) >= (24, 11), out
    for what in (r"sbatch --vmwn=tiny, exit 3, file, sacct",
                 r"sbatch --vmwn=nosuch refused at submission",
                 r"srun --vmwn=tiny hostname, 3 jobs"):
        assert re.search(rf"^slurm \(slurm-wlm \S+\) {what}: ok$", out, re.M), out
