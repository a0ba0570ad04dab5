"""pbs_python (the optional ``pbs`` module) against the real pbs_server on this host.

vmwn asks the server for a job's Variable_List through pbs_python when the job
record is not on the node (vmwn.pbs.server_variables).  These tests need the
module built into the running interpreter (scripts/build-pbs-python VENV) and a
server that answers ``qstat -B`` (scripts/torque-up); otherwise they skip.
"""

import os
import shlex
import subprocess
import sys

import pytest

from vmwn import pbs as vmwn_pbs

try:
    import pbs
except ImportError as e:
    pbs, _NO_PBS = None, (f"pbs_python is not importable here ({e}); "
                          f"run scripts/build-pbs-python {sys.prefix}")
else:
    _NO_PBS = ""

TORQUE_PREFIX = os.environ.get("TORQUE_PREFIX", "/opt/vmwn-torque")
BIN = os.path.join(TORQUE_PREFIX, "bin")

pytestmark = [pytest.mark.torque, pytest.mark.skipif(pbs is None, reason=_NO_PBS)]


def _torque(cmd, *args, user=None, stdin=None):
    """Run a Torque client, as root or as ``user`` (via su), from /tmp."""
    argv = [os.path.join(BIN, cmd), *args]
    if user is not None:
        argv = ["su", "-s", "/bin/sh", user, "-c", shlex.join(argv)]
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60,
                          cwd="/tmp")


@pytest.fixture(scope="module")
def server():
    """The name of the pbs_server answering on this host (skip when none does)."""
    if not os.access(os.path.join(BIN, "qstat"), os.X_OK):
        pytest.skip(f"no Torque clients in {BIN} (run scripts/build-torque)")
    try:
        r = _torque("qstat", "-B")
    except subprocess.TimeoutExpired:
        pytest.skip("no pbs_server answers: qstat -B timed out (run scripts/torque-up)")
    if r.returncode != 0:
        why = (r.stderr or r.stdout).strip().splitlines()
        pytest.skip("no pbs_server answers: qstat -B failed"
                    f"{': ' + why[-1] if why else ''} (run scripts/torque-up)")
    return pbs.pbs_default()


@pytest.fixture
def held_job(server, test_user):
    """A job submitted on hold by the unprivileged test user; deleted afterwards."""
    r = _torque("qsub", "-h", "-N", "vmwn-pbs-python", "-v", r"VMWN_ENV=tiny,OTHER=a\,b",
                user=test_user.pw_name, stdin="true\n")
    assert r.returncode == 0, f"qsub failed: {r.stderr.strip()}"
    job_id = r.stdout.strip()
    assert job_id, "qsub printed no job id"
    try:
        yield job_id
    finally:
        if _torque("qdel", job_id, user=test_user.pw_name).returncode != 0:
            _torque("qdel", "-p", job_id)


def _connect(server):
    conn = pbs.pbs_connect(server)
    assert conn >= 0, f"pbs_connect({server!r}) = {conn}: {pbs.error()}"
    return conn


def test_connect_to_the_default_server(server):
    assert server, "pbs_default() named no server"
    conn = _connect(pbs.pbs_default())
    try:
        status = pbs.pbs_statserver(conn, [], None)
        assert status and status[0].name, "pbs_statserver returned nothing"
    finally:
        pbs.pbs_disconnect(conn)


def test_statjob_returns_the_variable_list(server, held_job, test_user):
    conn = _connect(server)
    try:
        jobs = pbs.pbs_statjob(conn, held_job, [], None)
        assert jobs, f"pbs_statjob({held_job!r}) found nothing: {pbs.error()}"
        attrs = {a.name: a.value for a in jobs[0].attribs}
    finally:
        pbs.pbs_disconnect(conn)
    assert jobs[0].name == held_job
    assert attrs.get("Job_Owner", "").startswith(test_user.pw_name + "@")
    assert "Variable_List" in attrs, f"no Variable_List among {sorted(attrs)}"
    variables = vmwn_pbs.split_variable_list(attrs["Variable_List"])
    assert variables["VMWN_ENV"] == "tiny"
    assert variables["OTHER"] == "a,b"
    assert variables.get("PBS_O_QUEUE"), "the server adds PBS_O_* variables"


def test_statjob_of_only_the_variable_list(server, held_job):
    """An attribute list narrows what the server sends back."""
    want = pbs.new_attrl(1)
    want[0].name = pbs.ATTR_v
    conn = _connect(server)
    try:
        jobs = pbs.pbs_statjob(conn, held_job, want, None)
    finally:
        pbs.pbs_disconnect(conn)
    assert [a.name for a in jobs[0].attribs] == ["Variable_List"]


def test_server_variables_reads_the_job_from_the_server(server, held_job):
    variables = vmwn_pbs.server_variables(held_job)
    assert variables is not None, "server_variables found no Variable_List (see the log)"
    assert variables["VMWN_ENV"] == "tiny"
    assert variables["OTHER"] == "a,b"


def test_server_variables_of_an_unknown_job_is_none(server):
    assert vmwn_pbs.server_variables(f"999999.{server}") is None
