"""From a parsed job to a request: which environment, vCPUs, memory, limits."""

import grp
import os
import pwd

import pytest

from vmwn import config
from vmwn.torque import pbs, request
from vmwn.errors import SiteError, UserError

from conftest import write_site_config


@pytest.fixture
def cfg(tmp_path):
    path = str(tmp_path / "vmwn.conf")
    write_site_config(path, str(tmp_path), extra_site="queue_defaults = vmq:tiny\n"
                      "max_vcpus = 8\nmax_memory = 3G")
    return config.load(path)


def args(resources="", queue="batch", user="nobody", group=""):
    return pbs.parse_prologue_argv(["5.srv", user, group, "job", resources, queue, ""])


def no_variables():
    raise AssertionError("the Variable_List was read although argv answered")


def test_other_resource_wins_and_does_not_read_the_job_record(cfg):
    c = request.requested_env(cfg, args("nodes=1,other=vmwn=tiny", queue="vmq"),
                              no_variables)
    assert (c.name, c.source) == ("tiny", "-l other")


def test_variable_list_then_queue_default_then_nothing(cfg):
    c = request.requested_env(cfg, args(queue="vmq"), lambda: {"VMWN_ENV": "debian12"})
    assert (c.name, c.source) == ("debian12", "VMWN_ENV")
    c = request.requested_env(cfg, args(queue="vmq"), lambda: {})
    assert c.name == "tiny" and "vmq" in c.source
    assert request.requested_env(cfg, args(), lambda: {}) is None
    assert request.requested_env(cfg, args("other=something"), lambda: {}) is None


def test_empty_request_is_the_users_mistake(cfg):
    with pytest.raises(UserError):
        request.requested_env(cfg, args("other=vmwn="), no_variables)


def test_unknown_environment_names_the_known_ones(cfg):
    choice = request.Choice("nosuch", "-l other")
    with pytest.raises(UserError) as e:
        request.build(cfg, choice, args("other=vmwn=nosuch"), {}, dict)
    assert "nosuch" in str(e.value) and "tiny" in str(e.value)


@pytest.mark.parametrize("res,cores", [
    ("nodes=1:ppn=2", 2), ("ncpus=2", 2), ("procs=1", 1), ("nodes=1", 1),
    ("nodes=node7:ppn=2", 2), ("walltime=01:00:00", None)])
def test_cores(res, cores):
    assert request.cores(pbs.parse_resources(res), {}) == cores


@pytest.mark.parametrize("res,environ,count", [
    ("nodes=2", {}, 2), ("nodes=a+b", {}, 2), ("nodes=1:ppn=2+1:ppn=2", {}, 2),
    ("procs=4", {"PBS_NUM_NODES": "2"}, 2), ("nodes=1:ppn=4", {}, 1), ("", {}, 1)])
def test_nodes_are_counted(res, environ, count):
    assert request.node_count(pbs.parse_resources(res), environ) == count


def test_cores_of_a_job_on_several_nodes_are_the_most_a_node_asks_for():
    assert request.cores(pbs.parse_resources("nodes=1:ppn=2+2:ppn=1"), {}) == 2


def _job_on_two_nodes(cfg, monkeypatch, here, hosts, data="mounted"):
    monkeypatch.setattr(pbs, "server_exec_hosts", lambda job: hosts)
    monkeypatch.setattr(request.socket, "gethostname", lambda: here)
    import dataclasses
    monkeypatch.setitem(cfg.environments, "tiny",
                        dataclasses.replace(cfg.env("tiny"), data=data))
    return request.build(cfg, request.Choice("tiny", "-l other"),
                         args("nodes=2,other=vmwn=tiny"), {"PBS_O_WORKDIR": "/tmp"}, dict)


def test_a_job_on_several_nodes_knows_them_and_this_ones_place(cfg, monkeypatch):
    spec = _job_on_two_nodes(cfg, monkeypatch, "n2.example.org", ["n1.example.org", "n2"])
    assert spec.nodes == ("n1.example.org", "n2") and spec.node_index == 1


def test_a_node_the_job_does_not_name_is_the_sites_to_fix(cfg, monkeypatch):
    with pytest.raises(SiteError, match="this node \\(n3\\) is not among"):
        _job_on_two_nodes(cfg, monkeypatch, "n3", ["n1", "n2"])


def test_nodes_unknown_to_a_node_without_the_server_may_pass(cfg, monkeypatch):
    from vmwn.errors import TransientError
    with pytest.raises(TransientError, match="cannot tell the nodes"):
        _job_on_two_nodes(cfg, monkeypatch, "n1", None)


def test_a_job_on_several_nodes_in_copy_mode_is_refused(cfg, monkeypatch):
    with pytest.raises(UserError, match="needs its files mounted"):
        _job_on_two_nodes(cfg, monkeypatch, "n1", ["n1", "n2"], data="copy")


def test_the_node_file_of_the_mother_superior_names_the_nodes_without_the_server(tmp_path):
    nodefile = tmp_path / "nodes"
    nodefile.write_text("n2\nn2\nn1\n")
    from unittest import mock
    with mock.patch.object(pbs, "server_exec_hosts", lambda job: None):
        assert request.job_nodes("5.srv", {"PBS_NODEFILE": str(nodefile)}, here="n2") == \
            (("n2", "n1"), 0)


def test_memory_from_mem_or_pmem_times_cores():
    assert request.memory_mib({"mem": "2gb"}, 4) == 2048
    assert request.memory_mib({"pmem": "512mb"}, 3) == 1536
    assert request.memory_mib({"mem": "1gb", "pmem": "2gb"}, 2) == 1024
    assert request.memory_mib({}, 2) is None
    assert request.memory_mib({"mem": "1000kb"}, 1) == 1


def test_build_sizes(cfg):
    choice = request.Choice("tiny", "-l other")
    r = request.build(cfg, choice, args("nodes=1:ppn=2,pmem=600mb,other=vmwn=tiny"),
                      {"PBS_O_WORKDIR": "/home/x/run/"}, no_variables)
    assert (r.vcpus, r.memory_mib, r.env.name) == (2, 1200, "tiny")
    assert r.workdir == r.host_workdir == "/home/x/run"
    assert r.uid == pwd.getpwnam("nobody").pw_uid
    assert r.group == grp.getgrgid(pwd.getpwnam("nobody").pw_gid).gr_name


def test_defaults_and_memory_floor(cfg):
    choice = request.Choice("tiny", "queue")
    r = request.build(cfg, choice, args("mem=64mb"), {}, lambda: {"PBS_O_WORKDIR": "/srv/w"})
    assert r.vcpus == 1                      # the environment's default
    assert r.memory_mib == 256               # never below what the image needs
    assert r.workdir == "/srv/w"             # from the Variable_List when env lacks it


@pytest.mark.parametrize("res,limit", [
    ("nodes=1:ppn=3", "max_vcpus of environment tiny"),
    ("mem=3gb", "max_memory of environment tiny"),
])
def test_over_an_environment_limit_names_the_limit(cfg, res, limit):
    with pytest.raises(UserError) as e:
        request.build(cfg, request.Choice("tiny", "x"), args(res), {"PBS_O_WORKDIR": "/w"},
                      dict)
    assert limit in str(e.value)


def test_over_the_node_limit(tmp_path):
    path = str(tmp_path / "vmwn.conf")
    write_site_config(path, str(tmp_path), extra_site="max_vcpus = 1\nmax_memory = 1G")
    c = config.load(path)
    with pytest.raises(UserError) as e:
        request.build(c, request.Choice("tiny", "x"), args("ncpus=2"), {"PBS_O_WORKDIR": "/w"},
                      dict)
    assert "the node's max_vcpus" in str(e.value)
    with pytest.raises(UserError) as e:
        request.build(c, request.Choice("tiny", "x"), args("mem=1500mb"),
                      {"PBS_O_WORKDIR": "/w"}, dict)
    assert "the node's max_memory" in str(e.value)


def test_unknown_user_is_the_sites_problem(cfg):
    with pytest.raises(SiteError):
        request.build(cfg, request.Choice("tiny", "x"), args(user="no-such-user-vmwn"),
                      {"PBS_O_WORKDIR": "/w"}, dict)


def test_relative_workdir_refused(cfg):
    with pytest.raises(UserError):
        request.build(cfg, request.Choice("tiny", "x"), args(), {"PBS_O_WORKDIR": "w"}, dict)


def test_spec_is_the_lifecycles(cfg):
    r = request.build(cfg, request.Choice("tiny", "x"), args(), {"PBS_O_WORKDIR": "/w"}, dict)
    spec = r
    assert (spec.job_id, spec.vcpus, spec.memory_mib, spec.queue) == ("5.srv", 1, 256, "batch")
    assert os.path.isabs(spec.workdir)


def test_a_working_directory_cut_at_a_comma_is_named(cfg, tmp_path):
    """Torque splits Variable_List at commas: a job submitted from 'run,2' arrives
    with PBS_O_WORKDIR '.../run'.  The user is told why, before any VM is made."""
    (tmp_path / "run,2").mkdir()
    with pytest.raises(UserError, match="cuts PBS_O_WORKDIR at a comma") as e:
        request.build(cfg, request.Choice("tiny", "x"), args(),
                      {"PBS_O_WORKDIR": str(tmp_path / "run")}, dict)
    assert str(tmp_path / "run") in e.value.problem and "no comma" in e.value.fix
    # A directory that exists, or is missing for another reason, is not judged here.
    (tmp_path / "run").mkdir()
    assert request.build(cfg, request.Choice("tiny", "x"), args(),
                         {"PBS_O_WORKDIR": str(tmp_path / "run")}, dict).workdir \
        == str(tmp_path / "run")
    assert request.build(cfg, request.Choice("tiny", "x"), args(),
                         {"PBS_O_WORKDIR": str(tmp_path / "other")}, dict)


def test_no_unchecked_spec_can_be_made(cfg):
    """lifecycle takes a JobSpec as it is: constructing one is what checks it."""
    from vmwn.spec import JobSpec
    good = dict(job_id="5.srv", user="alice", uid=1000, gid=1000, group="lab", job_name="j",
                env=cfg.env("tiny"), vcpus=1, memory_mib=256, workdir="/home/alice",
                host_workdir="/home/alice")
    assert JobSpec(**good).user == "alice"
    for bad, error in ((dict(uid=0), UserError), (dict(user="a b"), SiteError),
                       (dict(workdir="/etc"), UserError), (dict(vcpus=0), SiteError)):
        with pytest.raises(error):
            JobSpec(**{**good, **bad})
