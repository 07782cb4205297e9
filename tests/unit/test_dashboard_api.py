"""control/api.py without boards: connect's checks, planning, run settings, results from events."""

from __future__ import annotations

import pytest

from control.api import RunResult, connect
from control.dashboard_state import DashState
from control.partition import MIB, BoardSpec, PlanError
from control.run_config import RunConfig
from edgert.errors import ConfigError
from tests.unit.test_dashboard import fake_run


def test_connect_local_boards_and_budgets():
    s = connect(boards=3, budget_mib=512)
    assert s.n_boards == 3 and [p.name for p in s.profiles] == ["board0", "board1", "board2"]
    assert s.budget_mib == 512 and "board2 (512 MiB)" in repr(s) and "<table>" in s._repr_html_()
    assert connect(boards=1).budget_mib == 0                        # unlimited
    mixed = connect(profiles=[BoardSpec("a", 500 * MIB), BoardSpec("b"), BoardSpec("c", 800 * MIB)])
    assert mixed.budget_mib == 500          # runs enforce one budget: the smallest given


@pytest.mark.parametrize("kw,msg", [({"boards": 0}, "integer >= 1"), ({"boards": 1.5}, ">= 1"),
                                    ({"budget_mib": -1}, ">= 0"),
                                    ({"profiles": []}, "non-empty list"),
                                    ({"profiles": ["phone"]}, "BoardSpec")])
def test_connect_rejects_bad_input_with_a_fix(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        connect(**kw)


def test_plan_uses_the_profiles(minilm_dir):
    s = connect(profiles=[BoardSpec("big", 900 * MIB), BoardSpec("small", 250 * MIB, gflops=20.0)])
    p = s.plan(batch=8, seq=64, micro_batches=2)
    assert p.boards == ["big", "small"] and p.feasible
    assert p.ranges[0][1] > 3                     # the slow, small board gets fewer layers
    with pytest.raises(PlanError, match="short by"):
        connect(boards=2, budget_mib=100).plan(batch=8, seq=128)


def test_run_config_from_session_and_overrides():
    cfg = connect(boards=2, budget_mib=700).config(steps=5, batch=2, seq=16)
    assert (cfg.boards, cfg.budget_mib, cfg.steps, cfg.batch, cfg.seq) == (2, 700, 5, 2, 16)
    base = RunConfig(boards=2, steps=9)
    assert connect(boards=2).config(base, lr=1e-4) == base.replace(lr=1e-4)
    with pytest.raises(ConfigError, match="unknown settings \\['stepz'\\]"):
        connect().config(stepz=3)
    with pytest.raises(ConfigError, match="batch must be an integer >= 1"):
        connect().config(batch=0)


def test_run_result_from_events(tmp_path):
    r = RunResult.from_state(tmp_path, DashState.from_events(fake_run(10)))
    assert r.state == "finished" and r.steps == 10 and len(r.losses) == 10
    assert r.accuracy == (pytest.approx(0.55), pytest.approx(0.6))
    assert r.boards["board1"]["budget_mib"] == 400 and r.boards["board0"]["peak_rss_mib"] == 490
    assert "RunResult(finished, 10 steps" in repr(r) and "55.0% -> 60.0%" in repr(r)
    assert "<td>board1</td>" in r._repr_html_()
