"""pbs_python (the optional ``pbs`` module) against the real pbs_server on this host.

vmwn asks the server for a job's Variable_List through pbs_python when the job
record is not on the node (vmwn.torque.pbs.server_variables).  These tests need the
module built into the running interpreter (scripts/build-pbs-python VENV) and a
server that answers ``qstat -B`` (scripts/torque-up); otherwise they skip.
"""

import os
import pwd
import shlex
import subprocess
import sys

import pytest

from vmwn.torque import pbs as vmwn_pbs

try:
    import pbs
except ImportError as e:
    pbs, _NO_PBS = None, (f"pbs_python is not importable here ({e}); "
                          f"run scripts/build-pbs-python {sys.prefix}")
else:
    _NO_PBS = ""

TORQUE_PREFIX = os.environ.get("TORQUE_PREFIX", "/opt/vmwn-torque")
BIN = os.path.join(TORQUE_PREFIX, "bin")

# integration too: it brings the shared Torque cluster up ('make install') and down.
pytestmark = [pytest.mark.torque, pytest.mark.integration,
              pytest.mark.skipif(pbs is None, reason=_NO_PBS)]


def _torque(cmd, *args, user=None, stdin=None):
    """Run a Torque client, as root or as ``user`` (via su), from /tmp."""
    argv = [os.path.join(BIN, cmd), *args]
    if user is not None:
        argv = ["su", "-s", "/bin/sh", user, "-c", shlex.join(argv)]
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60,
                          cwd="/tmp")


@pytest.fixture(scope="module")
def server(torque_cluster):
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


def _submit_held(user, variables, env=()):
    """qsub -h as ``user`` (a job that never runs); returns the job id."""
    argv = [os.path.join(BIN, "qsub"), "-h", "-N", "vmwn-pbs-python", "-v", variables]
    cmd = shlex.join(["env", *env, *argv]) if env else shlex.join(argv)
    r = subprocess.run(["su", "-s", "/bin/sh", user, "-c", cmd], input="true\n",
                       capture_output=True, text=True, timeout=60, cwd="/tmp")
    assert r.returncode == 0, f"qsub failed: {r.stderr.strip()}"
    job_id = r.stdout.strip()
    assert job_id, "qsub printed no job id"
    return job_id


def _delete(job_id, user):
    if _torque("qdel", job_id, user=user).returncode != 0:
        _torque("qdel", "-p", job_id)


# Values with a comma, a quote and a backslash travel through the environment:
# qsub -v NAME (no value) copies NAME from qsub's environment and escapes
# " ' \\ , and newlines with a backslash, as the server does on the wire.
JOB_ENV = ("OTHER=a,b", "QUOTE=it's", "BSLASH=a\\b")


@pytest.fixture
def held_job(server, test_user):
    """A job submitted on hold by the unprivileged test user; deleted afterwards."""
    job_id = _submit_held(test_user.pw_name, "VMWN_ENV=tiny,OTHER,QUOTE,BSLASH", env=JOB_ENV)
    try:
        yield job_id
    finally:
        _delete(job_id, test_user.pw_name)


@pytest.fixture(scope="module")
def other_user():
    """A second unprivileged account: neither the job owner nor a manager."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create the second user")
    name = "vmwnpy"
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True)
    return name


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
    # What the wire carries: pbs_server's encode_arst escapes , " ' \\ and newline.
    assert "OTHER=a\\,b," in attrs["Variable_List"]
    assert "QUOTE=it\\'s," in attrs["Variable_List"]
    assert "BSLASH=a\\\\b," in attrs["Variable_List"]


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


def test_server_variables_unescapes_quotes_and_backslashes(server, held_job):
    """The server escapes more than commas; a value must come back as it was set."""
    variables = vmwn_pbs.server_variables(held_job)
    assert variables is not None, "server_variables found no Variable_List (see the log)"
    assert variables["QUOTE"] == "it's"
    assert variables["BSLASH"] == "a\\b"


def test_server_variables_of_an_unknown_job_is_none(server):
    assert vmwn_pbs.server_variables(f"999999.{server}") is None


def test_qsub_v_splits_at_every_comma(server, test_user):
    """Torque 6.1's qsub -v knows no escapes: ``-v OTHER=a\\,b`` sets OTHER to 'a\\'
    and an empty ``b``, which the server then reads back as OTHER='a,b='.  A value
    with a comma has to come from qsub's environment (``-v OTHER`` or ``-V``)."""
    job_id = _submit_held(test_user.pw_name, r"VMWN_ENV=tiny,OTHER=a\,b")
    try:
        r = _torque("qstat", "-f", "-1", job_id)
        assert r.returncode == 0, r.stderr
        line = next(ln for ln in r.stdout.splitlines() if "Variable_List = " in ln)
        variables = vmwn_pbs.split_variable_list(line.split(" = ", 1)[1])
        assert variables["VMWN_ENV"] == "tiny"
        assert variables["OTHER"] == "a,b="
    finally:
        _delete(job_id, test_user.pw_name)


def test_only_owner_operator_or_manager_sees_the_variable_list(server, held_job, other_user):
    """Variable_List is a private attribute: root on the server host (always a
    manager) and the owner see it, anyone else gets the job without it (with
    query_other_jobs) or no job at all (the default)."""
    r = _torque("qstat", "-f", "-1", held_job, user=other_user)
    assert "Variable_List" not in r.stdout
    if r.returncode == 0:
        assert "Job_Owner" in r.stdout
