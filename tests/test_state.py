"""Per-job state records: atomic, private where they must be, and refused in unsafe places."""

import os
import types

import pytest

from vmwn import state
from vmwn.errors import SiteError


def cfg(path):
    return types.SimpleNamespace(site={"state_dir": str(path)})


def record(job_id="9.srv"):
    return state.JobState(job_id=job_id, domain="vmwn-x", env="tiny", user="u", uid=1, gid=1,
                          group="g", bind_address="127.0.0.1", port=40000,
                          host_key_public="ssh-ed25519 AAAA", key_path="/k", workdir="/w",
                          host_workdir="/w", output_dir="/w", overlay="/o", seed="/s",
                          console_log="/c")


def test_round_trip_and_removal(tmp_path):
    c = cfg(tmp_path / "jobs")
    assert not state.exists(c, "9.srv")
    state.save(c, record())
    assert state.exists(c, "9.srv") and state.load(c, "9.srv").port == 40000
    assert [s.job_id for s in state.all_jobs(c)] == ["9.srv"]
    assert os.stat(tmp_path / "jobs").st_mode & 0o777 == 0o711
    assert not [n for n in os.listdir(state.job_dir(c, "9.srv")) if n.endswith(".tmp")]
    assert state.remove(c, "9.srv") and not state.remove(c, "9.srv")
    with pytest.raises(state.NoSuchJob):
        state.load(c, "9.srv")


def test_corrupt_record_is_a_site_error_naming_reap(tmp_path):
    c = cfg(tmp_path / "jobs")
    os.makedirs(state.job_dir(c, "9.srv"))
    with open(state.state_path(c, "9.srv"), "w") as f:
        f.write("{not json")
    with pytest.raises(SiteError, match="corrupt.*vmwn reap"):
        state.load(c, "9.srv")
    assert state.orphan_dirs(c) == [] and state.all_jobs(c) == []


@pytest.mark.parametrize("mode", [0o777, 0o733, 0o751 | 0o020])
def test_a_state_directory_others_can_write_is_refused(tmp_path, mode):
    d = tmp_path / "jobs"
    d.mkdir()
    os.chmod(d, mode)
    with pytest.raises(SiteError, match="chmod 0711"):
        state.save(cfg(d), record())
    assert os.listdir(d) == []


def test_a_state_directory_owned_by_someone_else_is_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to chown")
    d = tmp_path / "jobs"
    d.mkdir(mode=0o711)
    os.chown(d, 4242, 4242)
    with pytest.raises(SiteError, match="not a directory owned by uid 0"):
        state.save(cfg(d), record())
