"""Drift detection, hysteresis and the re-plan decision (control/replan.py; pure, no boards)."""

from __future__ import annotations

import pytest

from compiler.model_spec import ModelDims
from control.partition import BoardSpec, bert_costs, evaluate, plan
from control.replan import (Drift, Watch, decide, drifting, predicted_step_s, ratios,
                            relative_drift, with_speed)
from edgert.errors import ConfigError

# all-MiniLM-L6-v2's shape (the planner's cost model needs only the dims)
MINILM = ModelDims(vocab=30522, hidden=384, layers=6, heads=12, ffn=1536, max_pos=512,
                   type_vocab=2, eps=1e-12, hidden_dropout=0.1, attn_dropout=0.1, num_labels=2)


def minilm_costs():
    return bert_costs(MINILM, 2, 16)


def test_relative_drift_cancels_a_shared_calibration_error():
    # both boards 3x slower than the model predicts: no drift; one of them 4x more: drift 4
    assert relative_drift(ratios([0.3, 0.3], [0.1, 0.1])) == pytest.approx([1.0, 1.0])
    assert relative_drift(ratios([0.3, 1.2], [0.1, 0.1])) == pytest.approx([1.0, 4.0])
    assert drifting([1.0, 1.49], 1.5) == []
    assert drifting([1.0, 1.5], 1.5) == [1]
    assert drifting([1.0, 0.5], 1.5) == [1]        # a board that got faster than planned


def test_watch_needs_patience_consecutive_steps():
    w = Watch(Drift(drift=1.5, patience=3, cooldown=0), skip=1)
    pred = [0.1, 0.1]
    assert w.observe([9.0, 0.1], pred) is None      # warm-up step after deploy: not measured
    assert w.observe([0.1, 0.4], pred) is None
    assert w.observe([0.1, 0.4], pred) is None
    assert w.observe([0.1, 0.1], pred) is None      # one normal step breaks the run of drift
    assert w.observe([0.1, 0.4], pred) is None
    assert w.observe([0.1, 0.5], pred) is None
    r = w.observe([0.1, 0.3], pred)
    assert r == pytest.approx([1.0, 4.0])           # medians over the window


def test_watch_off_and_cooldown():
    off = Watch(Drift(drift=0), skip=0)
    assert all(off.observe([0.1, 10.0], [0.1, 0.1]) is None for _ in range(10))
    w = Watch(Drift(drift=1.5, patience=1, cooldown=2), skip=0)
    assert w.observe([0.1, 0.4], [0.1, 0.1]) is not None
    w.reset(deployed=True, decided=True)            # 1 warm-up + 2 cooldown steps ignored
    assert [w.observe([0.1, 0.4], [0.1, 0.1]) for _ in range(3)] == [None] * 3
    assert w.observe([0.1, 0.4], [0.1, 0.1]) is not None


@pytest.mark.parametrize("bad", [dict(drift=1.0), dict(drift=-2), dict(patience=0),
                                 dict(margin=1.0), dict(cooldown=-1)])
def test_bad_thresholds_say_how_to_fix(bad):
    with pytest.raises(ConfigError, match="must be"):
        Drift(**bad)


def test_a_quarter_speed_board_gets_fewer_layers_and_the_decision_is_stable():
    costs = minilm_costs()
    boards = [BoardSpec("board0"), BoardSpec("board1")]
    even = [(0, 3), (3, 6)]
    cur = evaluate(costs, boards, even, 2)
    # measured: board1 takes 4x its prediction, board0 as predicted
    measured = [t * f for t, f in zip(predicted_step_s(cur), [1.0, 4.0], strict=True)]
    r = ratios(measured, predicted_step_s(cur))
    d = decide(costs, boards, {}, even, r, 2, margin=0.1)
    assert d.move and d.speeds == pytest.approx({"board0": 1.0, "board1": 0.25})
    (a, b), (_, c) = d.proposed.ranges
    assert c - b < 3 and a == 0 and c == 6
    assert d.proposed.bottleneck_ms < 0.9 * d.current.bottleneck_ms
    # independent check: the proposal is the best contiguous split under those speeds
    slow = [with_speed(boards[0], 1.0), with_speed(boards[1], 0.25)]
    best = min(evaluate(costs, slow, [(0, k), (k, 6)], 2).bottleneck_ms for k in range(1, 6))
    assert d.proposed.bottleneck_ms == pytest.approx(best)
    # after the move, times as the new plan predicts: no drift, so no flapping back
    after = evaluate(costs, slow, d.proposed.ranges, 2)
    w = Watch(Drift(drift=1.5, patience=1), skip=0)
    assert all(w.observe(predicted_step_s(after), predicted_step_s(after)) is None
               for _ in range(5))
    # the board recovers its full speed: drift the other way, and the even split comes back
    back = [t * f for t, f in zip(predicted_step_s(after), [1.0, 0.25], strict=True)]
    r2 = w.observe(back, predicted_step_s(after))
    d2 = decide(costs, boards, d.speeds, d.proposed.ranges, r2, 2, margin=0.1)
    assert d2.speeds == pytest.approx({"board0": 1.0, "board1": 1.0})
    assert d2.move and d2.proposed.ranges == plan(costs, boards, 2).ranges


def test_small_drift_within_margin_does_not_move():
    costs = minilm_costs()
    boards = [BoardSpec("board0"), BoardSpec("board1")]
    best = plan(costs, boards, 2).ranges           # running the planner's own split
    pred = predicted_step_s(evaluate(costs, boards, best, 2))
    d = decide(costs, boards, {}, best, ratios([pred[0], pred[1] * 1.05], pred), 2, margin=0.1)
    assert not d.move and "margin 10%" in d.why


def test_cpu_quota_arithmetic_and_errors():
    from control.cgroup import CpuCap

    assert CpuCap.quota_us(0.25, 10_000) == 2500
    assert CpuCap.quota_us(2, 100_000) == 200_000        # two cores' worth
    with pytest.raises(ConfigError, match="fraction of one core"):
        CpuCap.quota_us(0, 10_000)
    with pytest.raises(ConfigError, match="1000 us minimum"):
        CpuCap.quota_us(0.05, 10_000)
