"""Readiness from the guest's console: the announcement lines, however they arrive."""

from vmwn.errors import SiteError, TransientError
from vmwn.console import Console, guest_failure


def test_ready_is_found_across_partial_writes(tmp_path):
    log = tmp_path / "console.log"
    c = Console(str(log))
    assert c.poll() is None  # no file yet
    log.write_bytes(b"\x1b[2J\x1b[01;01HSeaBIOS\r\n[    0.1] Linux version 6.1\r\nvmwn-gu")
    assert c.poll() is None
    with open(log, "ab") as f:
        f.write(b"est: ready\r\n")
    assert c.poll() == "ready"


def test_error_line_is_reported_once_complete(tmp_path):
    log = tmp_path / "console.log"
    log.write_bytes(b"boot\nvmwn-guest: error: seed not found")
    c = Console(str(log))
    assert c.poll() is None  # the reason is not complete yet
    with open(log, "ab") as f:
        f.write(b" on any disk\npower off\n")
    assert c.poll() == "error: seed not found on any disk"


def test_long_boot_logs_are_read_incrementally(tmp_path):
    log = tmp_path / "console.log"
    log.write_bytes(b"x" * (3 << 20))
    c = Console(str(log))
    for _ in range(3):
        assert c.poll() is None
    assert c.pos == 3 << 20
    with open(log, "ab") as f:
        f.write(b"\nvmwn-guest: ready\n")
    assert c.poll() == "ready"


def test_a_guest_failure_that_may_pass_is_retried_the_others_are_the_sites(tmp_path):
    log = tmp_path / "console.log"
    log.write_bytes(b"vmwn-guest: error: passing: no DHCP lease on eth0: udhcpc: no lease\n")
    said = Console(str(log)).poll()
    e = guest_failure(said, "check the node")
    assert isinstance(e, TransientError)
    assert e.problem == ("the guest could not prepare the job "
                         "(no DHCP lease on eth0: udhcpc: no lease)")
    e = guest_failure("error: seed not found on any disk", "check the node")
    assert type(e) is SiteError and "(error: seed not found on any disk)" in e.problem
