"""The epilogue's harvest fits inside pbs_mom's alarm, with time kept for the destroy."""

import types

import pytest

import vmwn.torque.hooks as hooks
from vmwn.torque.hooks import epilogue


def node(tmp_path, alarm=None):
    mom = tmp_path / "mom_priv"
    mom.mkdir()
    (mom / "config").write_text("$logevent 255\n" + (f"$prologalarm {alarm}\n" if alarm else ""))
    return types.SimpleNamespace(pbs_home=str(tmp_path))


@pytest.mark.parametrize("alarm, expected", [
    (None, 270.0),   # default 300: 300 - 10 (pbs_mom's margin) - 20 (destroy)
    (900, 870.0),    # a site that raised it for many-file jobs gets all of it
    (100, 70.0),     # 100 - 10 (pbs_mom's margin) - 20 (destroy)
    (40, 10.0),
    (20, 5.0),       # never below a few seconds: a tiny alarm still tries
])
def test_harvest_budget_leaves_the_destroy_its_share(tmp_path, monkeypatch, alarm, expected):
    monkeypatch.setattr(hooks, "session_age", lambda: 0.0)
    assert epilogue.budget(node(tmp_path, alarm), None) == expected


def test_time_already_used_by_earlier_steps_counts(tmp_path, monkeypatch):
    monkeypatch.setattr(hooks, "session_age", lambda: 30.0)
    assert epilogue.budget(node(tmp_path, 100), None) == 40.0


def test_a_hook_run_by_hand_from_an_old_session_has_spent_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(hooks, "session_age", lambda: 5000.0)
    n = node(tmp_path, 100)
    assert hooks.alarm_spent(n.pbs_home) == (90, 0.0)
    assert epilogue.budget(n, None) == 70.0
