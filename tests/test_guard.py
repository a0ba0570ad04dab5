"""tests/conftest.py's guard: a unit test cannot reach a real outside system by
accident (a real VM, libvirtd, SSH, Torque or slapd); its marker says it may."""

import subprocess

import pytest


def test_an_unmarked_test_that_starts_an_outside_program_fails():
    with pytest.raises(pytest.fail.Exception, match="starts virsh without a marker"):
        subprocess.run(["/usr/bin/virsh", "--version"], capture_output=True)
    with pytest.raises(pytest.fail.Exception, match="starts qsub without a marker"):
        subprocess.run("qsub -l other=vmwn=tiny job.sh", shell=True)
    # Local tools stay allowed.
    assert subprocess.run(["true"]).returncode == 0


def test_an_unmarked_test_that_opens_the_real_libvirt_fails():
    libvirt = pytest.importorskip("libvirt")
    with pytest.raises(pytest.fail.Exception, match="opens libvirt qemu:///system"):
        libvirt.open("qemu:///system")
    conn = libvirt.open("test:///default")  # the test driver is what unit tests use
    assert conn.getType() == "TEST"
    conn.close()


@pytest.mark.integration
def test_the_marker_lifts_the_guard():
    assert subprocess.Popen.__init__.__qualname__ == "Popen.__init__"
