"""The unit tier changes nothing on the host: conftest's guard fails an unmarked
test that runs the host's iptables, useradd or the like, or opens a real libvirt,
and lets a marked one, or a stand-in a test made in its own directory, run."""

import os
import subprocess
import sys
import textwrap

import conftest

INNER = textwrap.dedent('''
    import os, subprocess, pytest

    def test_firewall():
        subprocess.run(["/usr/sbin/iptables", "-w", "-C", "OUTPUT", "-j", "ACCEPT"])

    def test_firewall_by_name():
        subprocess.run("ip6tables -L", shell=True)

    def test_accounts():
        subprocess.run(["useradd", "vmwn-never-made"])

    def test_namespaces():
        subprocess.run(["ip", "netns", "add", "vmwn-never-made"])

    def test_libvirt():
        import libvirt
        libvirt.open("qemu:///system")

    def test_a_stand_in_of_its_own_may_run(tmp_path):
        fake = tmp_path / "iptables"
        fake.write_text("#!/bin/sh\\nexit 0\\n")
        fake.chmod(0o755)
        assert subprocess.run([str(fake), "-L"]).returncode == 0

    @pytest.mark.integration
    def test_marked_may_reach_the_host():
        subprocess.run(["/usr/sbin/iptables", "--version"], capture_output=True)
''')


def test_an_unmarked_test_cannot_change_the_host(tmp_path):
    (tmp_path / "test_inner.py").write_text(INNER)
    tests = os.path.dirname(os.path.abspath(conftest.__file__))
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
         "--rootdir", str(tmp_path), "-o", "markers=integration", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=str(tmp_path),
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([tests, conftest.REPO])))
    out = r.stdout + r.stderr
    failed = sorted(line.split("::")[1].split()[0] for line in out.splitlines()
                    if line.startswith("FAILED"))
    assert failed == ["test_accounts", "test_firewall", "test_firewall_by_name",
                      "test_libvirt", "test_namespaces"], out
    assert "starts iptables without a marker" in out
    assert "starts ip6tables without a marker" in out
    assert "starts useradd without a marker" in out
    assert "opens libvirt qemu:///system without a marker" in out
    assert "2 passed" in out, out


def test_the_guard_names_host_changers_wherever_the_host_keeps_them():
    assert conftest._outside_program(["/usr/sbin/iptables", "-L"]) == "iptables"
    assert conftest._outside_program(["/sbin/useradd", "x"]) == "useradd"
    assert conftest._outside_program("groupadd x") == "groupadd"
    assert conftest._outside_program(["/tmp/pytest-1/fake/iptables"]) is None
    assert conftest._outside_program(["sh", "-c", "true"]) is None
