"""Parsing what pbs_mom hands a hook: argv, resource strings, the .JB job record."""

import fcntl
import os
import signal

import pytest

from vmwn.torque import pbs
from vmwn.errors import SiteError, UserError

PRO = ["12.srv.example.org", "alice", "users", "myjob", "nodes=1:ppn=2,walltime=01:00:00",
       "batch", "", "/var/spool/torque/mom_priv/jobs/12.srv.example.org.SC"]


def test_prologue_argv_positions():
    a = pbs.parse_prologue_argv(PRO)
    assert (a.job_id, a.user, a.group, a.job_name, a.queue, a.account) == \
        ("12.srv.example.org", "alice", "users", "myjob", "batch", "")
    assert a.resources == "nodes=1:ppn=2,walltime=01:00:00"
    assert a.script.endswith(".SC")


def test_prologue_argv_without_script_path_from_older_torque():
    assert pbs.parse_prologue_argv(PRO[:7]).script == ""


def test_prologue_argv_too_short_is_a_site_error():
    with pytest.raises(SiteError):
        pbs.parse_prologue_argv(PRO[:5])


def test_epilogue_argv_positions():
    argv = ["7[3].srv", "bob", "grp", "arr", "4242", "mem=1gb", "cput=00:00:01,mem=100kb",
            "short", "acct", "271", "/x/7[3].srv.SC"]
    a = pbs.parse_epilogue_argv(argv)
    assert a.job_id == "7[3].srv" and a.session_id == 4242 and a.exit_status == 271
    assert a.resources_used.startswith("cput=") and a.queue == "short" and a.account == "acct"
    assert pbs.parse_epilogue_argv(argv[:10]).script == ""
    assert pbs.parse_epilogue_argv(argv[:9] + ["-2"]).exit_status == -2


def test_epilogue_argv_bad_number():
    with pytest.raises(SiteError):
        pbs.parse_epilogue_argv(["1.s", "u", "g", "n", "x", "", "", "q", "", "0"])


def test_resources_values_keep_colons_plus_and_equals():
    r = pbs.parse_resources("nodes=2:ppn=4+1:gpus=1,other=vmwn=debian12,walltime=01:02:03,"
                            "mem=4gb")
    assert r == {"nodes": "2:ppn=4+1:gpus=1", "other": "vmwn=debian12",
                 "walltime": "01:02:03", "mem": "4gb"}
    assert pbs.parse_resources("") == {}


def test_nodes():
    assert [(n.count, n.host, n.ppn) for n in pbs.parse_nodes("1:ppn=4:myprop")] == \
        [(1, "", 4)]
    assert pbs.parse_nodes("1:ppn=4:myprop")[0].properties == ("myprop",)
    parts = pbs.parse_nodes("2:ppn=4+node7:ppn=1:gpus=1")
    assert [(n.count, n.host, n.ppn) for n in parts] == [(2, "", 4), (1, "node7", 1)]
    assert pbs.parse_nodes("a+b")[1].host == "b"
    with pytest.raises(UserError):
        pbs.parse_nodes("1:ppn=0")


@pytest.mark.parametrize("text,expected", [
    ("4gb", 4 << 30), ("512mb", 512 << 20), ("1024kb", 1 << 20), ("100", 100),
    ("100b", 100), ("2MB", 2 << 20), ("1kw", 8192), ("1tb", 1 << 40)])
def test_sizes(text, expected):
    assert pbs.size_bytes(text) == expected


def test_bad_size_is_the_users_mistake():
    with pytest.raises(UserError):
        pbs.size_bytes("lots")


def test_seconds():
    assert pbs.seconds("01:00:00") == 3600
    assert pbs.seconds("90") == 90
    assert pbs.seconds("2:30") == 150


def test_variable_list_escaped_commas_round_trip():
    text = r"PBS_O_HOME=/home/a,VMWN_ENV=tiny,LIST=a\,b\,c,EMPTY=,PATHLIKE=C:\x"
    v = pbs.split_variable_list(text)
    assert v == {"PBS_O_HOME": "/home/a", "VMWN_ENV": "tiny", "LIST": "a,b,c", "EMPTY": "",
                 "PATHLIKE": r"C:\x"}
    assert pbs.split_variable_list(pbs.join_variable_list(v)) == v


JB = """<?xml version="1.0"?>
<job>
  <version>2304</version>
  <jobid>12.srv.example.org</jobid>
  <attributes>
    <Job_Name flags="1">myjob</Job_Name>
    <Resource_List>
      <nodes flags="1">1:ppn=2</nodes>
      <walltime flags="1">01:00:00</walltime>
    </Resource_List>
    <Variable_List flags="1">PBS_O_WORKDIR=/home/alice/run,VMWN_ENV=debian12,X=1\\,2</Variable_List>
  </attributes>
</job>
"""


def test_job_record(tmp_path):
    p = tmp_path / "12.srv.example.org.JB"
    p.write_text(JB)
    rec = pbs.read_job_record(str(p))
    assert rec.variables == {"PBS_O_WORKDIR": "/home/alice/run", "VMWN_ENV": "debian12",
                             "X": "1,2"}
    assert rec.resources == {"nodes": "1:ppn=2", "walltime": "01:00:00"}
    assert rec.attributes["Job_Name"] == "myjob"
    assert pbs.read_job_record(str(tmp_path / "missing.JB")) is None


def test_job_record_not_xml(tmp_path):
    p = tmp_path / "bad.JB"
    p.write_bytes(b"\x00\x01binary record of an old Torque")
    with pytest.raises(SiteError):
        pbs.read_job_record(str(p))


def test_job_record_path_prefers_the_script_prefix():
    assert pbs.job_record_path("/h", "12.srv", "/h/mom_priv/jobs/12.sr.SC") == \
        "/h/mom_priv/jobs/12.sr.JB"
    assert pbs.job_record_path("/h", "12.srv", "") == "/h/mom_priv/jobs/12.srv.JB"


def test_job_variables_from_record(tmp_path):
    jobs = tmp_path / "mom_priv" / "jobs"
    jobs.mkdir(parents=True)
    (jobs / "12.srv.example.org.JB").write_text(JB)
    args = pbs.parse_prologue_argv(PRO[:7])
    assert pbs.job_variables(str(tmp_path), args)["VMWN_ENV"] == "debian12"


def test_server_lookup_is_optional(monkeypatch):
    # pbs_python needs libtorque; without it the lookup answers None, never raises.
    import sys
    monkeypatch.setitem(sys.modules, "pbs", None)  # import pbs raises ImportError
    assert pbs.server_variables("1.srv") is None


def test_mom_config(tmp_path):
    mp = tmp_path / "mom_priv"
    mp.mkdir()
    assert pbs.prologalarm(str(tmp_path)) == 300
    (mp / "config").write_text("$pbsserver srv\n$prologalarm 120\n$job_starter\t/x/y\n"
                               "$prologalarm 200\n")
    assert pbs.prologalarm(str(tmp_path)) == 200
    assert pbs.mom_setting(str(tmp_path), "job_starter") == "/x/y"
    assert pbs.mom_setting(str(tmp_path), "nothing", "d") == "d"
    os.chmod(mp / "config", 0o644)


def test_the_lock_holder_is_asked_of_the_kernel_with_the_platforms_struct_flock(tmp_path):
    """Another process's fcntl write lock on mom.lock names that process (a process's
    own locks never block it, so the holder is a child); none, or a read lock that
    a probe for a write lock would also meet, as the kernel says."""
    priv = tmp_path / "mom_priv"
    priv.mkdir()
    lock = priv / "mom.lock"
    lock.write_text("")
    assert pbs.mom_running(str(tmp_path)) == 0
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the holder: lock, say so, wait for the parent to close its end
        try:
            os.close(r)
            fd = os.open(lock, os.O_RDWR)
            fcntl.lockf(fd, fcntl.LOCK_EX)
            os.write(w, b"x")
            signal.pause()  # until the parent kills it
        finally:
            os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 1) == b"x"
        assert pbs.mom_running(str(tmp_path)) == pid
        assert pbs.mom_running(str(tmp_path / "nosuch")) == 0
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
    assert pbs.mom_running(str(tmp_path)) == 0
