"""The stage planner (control/partition.py): optimal against brute force, within every budget."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from compiler.model_spec import ModelDims, parse_split
from control.partition import (
    MIB,
    BoardSpec,
    LayerCost,
    Links,
    ModelCosts,
    PlanError,
    bert_costs,
    evaluate,
    in_flight,
    plan,
)
from edgert.errors import ConfigError
from edgert.schedule import max_in_flight, one_f_one_b

MINILM = ModelDims(vocab=30522, hidden=384, layers=6, heads=12, ffn=1536, max_pos=512, type_vocab=2,
                   eps=1e-12, hidden_dropout=0.1, attn_dropout=0.1, num_labels=2)
BASE12 = ModelDims(vocab=30522, hidden=384, layers=12, heads=12, ffn=1536, max_pos=512,
                   type_vocab=2, eps=1e-12, hidden_dropout=0.1, attn_dropout=0.1, num_labels=2)


def _splits(L: int, K: int):
    for cuts in itertools.combinations(range(1, L), K - 1):
        b = [0, *cuts, L]
        yield list(zip(b[:-1], b[1:], strict=True))


def _brute(costs, boards, n_micro, links, order=None):
    best = None
    for ranges in _splits(costs.layers, len(boards)):
        p = evaluate(costs, boards, ranges, n_micro, links=links, order=order)
        if p.feasible and (best is None or p.bottleneck_ms < best.bottleneck_ms):
            best = p
    return best


def _random_case(rng: random.Random):
    L = rng.randint(1, 8)
    K = rng.randint(1, min(4, L))
    H = rng.choice([2, 4])
    units = [LayerCost("embeddings", rng.uniform(0, 2e9), rng.randint(1, 40) * MIB,
                       rng.randint(0, 4) * MIB, rng.randint(1, 4) * MIB)]
    for i in range(L):  # heterogeneous layers
        fl = rng.uniform(1e9, 2e10)
        units.append(LayerCost(f"layer{i}", fl, rng.randint(1, 10) * MIB, rng.randint(1, 30) * MIB,
                               rng.randint(1, 4) * MIB, split_flops=fl * rng.uniform(0, 0.5),
                               heads=H))
    units.append(LayerCost("head", rng.uniform(0, 1e9), rng.randint(0, 2) * MIB, MIB, 1024))
    costs = ModelCosts(tuple(units), stage_saved_bytes=rng.randint(0, 1) * MIB)
    total = sum(4 * u.param_bytes + 4 * u.saved_bytes + u.out_bytes for u in units)
    boards = [BoardSpec(f"b{k}",
                        None if rng.random() < 0.2 else int(total * rng.uniform(0.15, 1.0)),
                        gflops=rng.uniform(5, 100), mem_gbps=rng.uniform(2, 20),
                        accel_gflops=rng.choice([None, rng.uniform(5, 200)]),
                        accel_sync_ms=rng.uniform(0, 5)) for k in range(K)]
    bw = [[rng.uniform(1e6, 1e9) for _ in range(K)] for _ in range(K)]
    lat = [[rng.uniform(0, 0.01) for _ in range(K)] for _ in range(K)]
    return costs, boards, rng.randint(1, 6), Links(bw, lat)


def test_dp_matches_brute_force_and_respects_budgets():
    rng = random.Random(1234)
    solved = refused = 0
    for _ in range(250):
        costs, boards, n_micro, links = _random_case(rng)
        want = _brute(costs, boards, n_micro, links)
        if want is None:
            with pytest.raises(PlanError, match="short by"):
                plan(costs, boards, n_micro, links=links)
            refused += 1
            continue
        got = plan(costs, boards, n_micro, links=links)
        assert math.isclose(got.bottleneck_ms, want.bottleneck_ms, rel_tol=1e-9), (got, want)
        assert got.feasible
        for s in got.stages:
            assert s.budget is None or s.memory <= s.budget
        # the plan's own numbers are what evaluate() says of its split
        again = evaluate(costs, boards, got.ranges, n_micro, links=links)
        assert math.isclose(again.bottleneck_ms, got.bottleneck_ms, rel_tol=1e-12)
        solved += 1
    assert solved > 100 and refused > 10   # both branches exercised


def test_order_search_matches_brute_force_over_orders():
    rng = random.Random(7)
    for _ in range(25):
        costs, boards, n_micro, links = _random_case(rng)
        best = None
        for perm in itertools.permutations(range(len(boards))):
            p = _brute(costs, boards, n_micro, links, order=perm)
            if p is not None and (best is None or p.bottleneck_ms < best.bottleneck_ms):
                best = p
        if best is None:
            with pytest.raises(PlanError):
                plan(costs, boards, n_micro, links=links, search_order=True)
        else:
            got = plan(costs, boards, n_micro, links=links, search_order=True)
            assert math.isclose(got.bottleneck_ms, best.bottleneck_ms, rel_tol=1e-9)


@pytest.mark.parametrize("K, M", [(1, 1), (2, 4), (3, 2), (4, 8)])
def test_in_flight_is_the_1f1b_schedules(K, M):
    s = one_f_one_b(K, M)
    assert [in_flight(k, K, M) for k in range(K)] == [max_in_flight(s, k) for k in range(K)]


def test_memory_matches_compiled_stage_layout():
    """Per layer: x, ctx, xhat1, h1, xhat2 [M,D]; qkv [M,3D]; probs [B,H,T,T]; rstd1/2 [M];
    u, g [M,F] (compiler/stage.py `_layer_fwd`)."""
    B, T, D, F, H = 8, 64, 384, 1536, 12
    M = B * T
    costs = bert_costs(MINILM, B, T)
    per_layer = 5 * M * D + M * 3 * D + B * H * T * T + 2 * M + 2 * M * F
    assert costs.units[1].saved_bytes == 4 * per_layer
    assert costs.units[1].param_bytes == 4 * (4 * D * D + 2 * D * F + 9 * D + F)
    p = evaluate(costs, [BoardSpec("a"), BoardSpec("b")], [(0, 3), (3, 6)], n_micro=4)
    s1 = p.stages[1]   # 3 layers + head, 1 in flight, outputs loss [1] + logits [B, 2]
    head_saved = 4 * (3 * B * D + 2 * B) + 8 * B
    want_saved = 3 * costs.units[1].saved_bytes + head_saved + 4 * B * T + 4 * (1 + 2 * B)
    assert s1.saved_per_mb == want_saved and s1.in_flight == 1
    assert s1.memory == 4 * s1.params + want_saved


def test_infeasible_says_who_is_short_and_by_how_much():
    costs = bert_costs(MINILM, 8, 128)
    boards = [BoardSpec("tiny0", 150 * MIB), BoardSpec("big", 4096 * MIB)]
    with pytest.raises(PlanError) as e:
        plan(costs, boards, n_micro=4)
    msg = str(e.value)
    assert "tiny0 is short by" in msg and "big is short" not in msg
    # the closest split is 0:1,1:6 (embeddings + one layer on tiny0); the number is its excess
    closest = evaluate(costs, boards, [(0, 1), (1, 6)], n_micro=4)
    short = (closest.stages[0].memory - 150 * MIB) / MIB
    assert "0:1,1:6" in msg and f"short by {short:.1f} MiB" in msg
    assert "Raise" in msg


def test_throttled_board_gets_fewer_layers():
    costs = bert_costs(BASE12, 8, 128)
    boards = [BoardSpec("a"), BoardSpec("slow", gflops=87.0 / 4), BoardSpec("c"), BoardSpec("d")]
    p = plan(costs, boards, n_micro=8)
    n = {s.board: s.layers for s in p.stages}
    assert all(n["slow"] < n[b] for b in "acd"), p.explain()
    assert p.bottleneck_ms < evaluate(costs, boards, parse_split(None, 4, 12), 8).bottleneck_ms


def test_memory_tight_first_board_gets_fewer_layers():
    costs = bert_costs(MINILM, 8, 128)
    loose = [BoardSpec("first"), BoardSpec("second"), BoardSpec("third")]
    # Budget: the embeddings + one layer with 3 micro-batches in flight, and a little.
    one = evaluate(costs, loose, [(0, 1), (1, 3), (3, 6)], n_micro=4).stages[0].memory
    boards = [BoardSpec("first", one + MIB), BoardSpec("second", 4096 * MIB),
              BoardSpec("third", 4096 * MIB)]
    p = plan(costs, boards, n_micro=4)
    assert p.stages[0].layers == 1 and p.feasible
    assert p.stages[0].layers < min(s.layers for s in p.stages[1:])
    assert plan(costs, loose, n_micro=4).to_split() == "0:2,2:4,4:6"
    assert "MiB > budget" in p.stages[0].why
    assert "over budget on first" in p.explain()   # the even split would not fit


def test_link_can_be_the_bottleneck():
    costs = bert_costs(MINILM, 8, 128)
    p = plan(costs, [BoardSpec("a"), BoardSpec("b")], n_micro=4, links=Links(1e6, 0.0))
    act = costs.units[1].out_bytes
    assert math.isclose(p.bottleneck_ms, 2 * act / 1e6 * 1e3) and p.binding().startswith("link")


def test_head_split_to_accelerator_shortens_stage_time():
    costs = bert_costs(BASE12, 8, 128)
    plain = [BoardSpec("a"), BoardSpec("b")]
    accel = [BoardSpec("a"), BoardSpec("b", accel_gflops=200.0, accel_sync_ms=1.0)]
    same = [evaluate(costs, bs, [(0, 6), (6, 12)], 4).stages[1] for bs in (plain, accel)]
    assert same[1].ms < same[0].ms and 0 < same[1].accel_heads <= 12 == same[1].heads
    cpu, acc = plan(costs, plain, n_micro=4), plan(costs, accel, n_micro=4)
    assert acc.bottleneck_ms < cpu.bottleneck_ms
    assert acc.stages[1].layers > cpu.stages[1].layers
    assert "5/12" not in cpu.explain() and f"{acc.stages[1].accel_heads}/12" in acc.explain()


def test_to_split_round_trips_and_explains():
    costs = bert_costs(BASE12, 4, 64)
    boards = [BoardSpec("a", 2048 * MIB), BoardSpec("b", gflops=40.0), BoardSpec("c", gflops=60.0)]
    p = plan(costs, boards, n_micro=4, links=Links(50e6, 0.001))
    assert parse_split(p.to_split(), None, 12) == p.ranges
    text = p.explain()
    for b in "abc":
        assert f"  {b}  " in text
    assert "bottleneck" in text and "<table>" in p._repr_html_()


def test_measured_unit_table_is_used_as_is():
    costs = bert_costs(MINILM, 8, 128)
    ms = (10.0, 100, 100, 100, 100, 100, 100, 5.0)
    p = plan(costs, [BoardSpec("a", unit_ms=ms),
                     BoardSpec("b", unit_ms=tuple(3 * t for t in ms))], 4)
    assert p.to_split() == "0:5,5:6" and math.isclose(p.stages[0].ms, 510.0)
    with pytest.raises(Exception, match="unit_ms has 3 entries"):
        plan(costs, [BoardSpec("a", unit_ms=(1, 2, 3)), BoardSpec("b")], 4)


def test_more_boards_than_layers_is_refused():
    costs = bert_costs(MINILM, 2, 16)
    with pytest.raises(Exception, match="only 6 layers"):
        plan(costs, [BoardSpec(f"b{i}") for i in range(7)], 4)


# ---- objective="memory" -------------------------------------------------------------------------

def _brute_memory(costs, boards, n_micro, links):
    """Feasible split with the least largest-stage footprint; ties: least bottleneck."""
    best = None
    for ranges in _splits(costs.layers, len(boards)):
        p = evaluate(costs, boards, ranges, n_micro, links=links)
        key = (max(s.memory for s in p.stages), p.bottleneck_ms)
        if p.feasible and (best is None or key < best[0]):
            best = (key, p)
    return None if best is None else best[1]


def test_memory_objective_matches_brute_force():
    rng = random.Random(99)
    solved = refused = 0
    for _ in range(250):
        costs, boards, n_micro, links = _random_case(rng)
        want = _brute_memory(costs, boards, n_micro, links)
        if want is None:
            with pytest.raises(PlanError, match="short by"):
                plan(costs, boards, n_micro, links=links, objective="memory")
            refused += 1
            continue
        got = plan(costs, boards, n_micro, links=links, objective="memory")
        assert got.feasible
        assert max(s.memory for s in got.stages) == max(s.memory for s in want.stages)
        assert math.isclose(got.bottleneck_ms, want.bottleneck_ms, rel_tol=1e-9), (got, want)
        # never more memory than the time-optimal plan, never a faster bottleneck than it
        fast = plan(costs, boards, n_micro, links=links)
        assert max(s.memory for s in got.stages) <= max(s.memory for s in fast.stages)
        assert got.bottleneck_ms >= fast.bottleneck_ms * (1 - 1e-9)
        solved += 1
    assert solved > 100 and refused > 10


def test_memory_first_minilm_gives_stage0_fewest_layers():
    """MiniLM's 30522 x 384 word embedding (x4 with grads and Adam moments) sits on stage 0."""
    costs = bert_costs(MINILM, batch=8, seq=64)
    for K in (2, 3, 4):
        boards = [BoardSpec(f"b{k}") for k in range(K)]
        even = evaluate(costs, boards, parse_split(None, K, 6), n_micro=4)
        mem = plan(costs, boards, 4, objective="memory")
        assert mem.stages[0].layers == 1                      # only what it must hold
        largest_mem = max(s.memory for s in mem.stages)
        largest_even = max(s.memory for s in even.stages)
        if K < 4:      # 6 layers over 4 stages: the even split already gives stage 0 one layer
            assert largest_mem < 0.8 * largest_even
            assert mem.bottleneck_ms > 1.2 * even.bottleneck_ms   # the trade-off: unbalanced
        else:
            assert largest_mem == largest_even                 # stage 0 is the floor


def test_unknown_objective_is_refused():
    with pytest.raises(ConfigError, match="objective must be 'time' or 'memory'"):
        plan(bert_costs(MINILM, 8, 64), [BoardSpec("a")], 4, objective="speed")
