"""edgert/head_split space + cache: binary search vs exhaustive on synthetic cost curves, selection
determinism, and the versioned cache (round trip, key invalidation, persistence across restart)."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest

from edgert.errors import ConfigError
from edgert.head_split.cache import CACHE_VERSION, CacheKey, SplitCache
from edgert.head_split.space import (HeadSplit, candidates, exhaustive, search_crossing, select,
                                     split_cost)
from edgert.head_split.tuner import tune_head_split


def _noisy(f, seed, amp=0.03):
    """f with fixed multiplicative noise per head count (non-monotone, like real timings)."""
    rng = random.Random(seed)
    noise = {n: 1.0 + rng.uniform(-amp, amp) for n in range(1000)}
    return lambda n: f(n) * noise[n]


CURVES = {  # name -> (cost_a(n), cost_b(n), copy(k)) in ms
    "linear": (lambda n: 1.0 * n, lambda n: 1.5 * n, lambda k: 0.3),
    "affine_launch": (lambda n: 0.5 + n, lambda n: 2.0 + 0.4 * n, lambda k: 0.2),
    "convex": (lambda n: 0.1 * n * n + n, lambda n: 0.8 * n, lambda k: 0.05 * k),
    "concave": (lambda n: 3 * n ** 0.5, lambda n: 2 * n ** 0.7, lambda k: 0.1),
    "a_much_faster": (lambda n: 0.1 * n, lambda n: 5.0 * n, lambda k: 0.5),
    "b_much_faster": (lambda n: 5.0 * n, lambda n: 0.1 * n + 0.01, lambda k: 0.5),
    "equal": (lambda n: 1.0 * n, lambda n: 1.0 * n, lambda k: 0.0),
    "equal_with_copy": (lambda n: 1.0 * n, lambda n: 1.0 * n, lambda k: 2.0),
    "copy_grows_with_b": (lambda n: 2.0 * n, lambda n: 0.5 * n, lambda k: 0.05 * (12 - k)),
    "noisy_linear": (_noisy(lambda n: 1.0 * n, 1), _noisy(lambda n: 1.3 * n, 2), lambda k: 0.2),
    "noisy_convex": (_noisy(lambda n: 0.05 * n * n + 0.5 * n, 3), _noisy(lambda n: n, 4),
                     _noisy(lambda k: 0.3, 5)),
}


@pytest.mark.parametrize("H", [1, 2, 3, 4, 12, 16, 32])
@pytest.mark.parametrize("name", sorted(CURVES))
def test_binary_search_within_5pct_of_exhaustive(name, H):
    a, b, c = CURVES[name]
    best = exhaustive(H, a, b, c)
    got = search_crossing(H, a, b, c)
    assert got.cost <= 1.05 * best.cost, (got, best)
    assert got.cost == split_cost(got.split.k, H, a, b, c)
    if H >= 12:   # fewer model evaluations than exhaustive
        assert len(got.evaluated) <= 5 < H + 1


def test_binary_search_measures_log_h_points():
    calls = {"a": set(), "b": set()}

    def a(n):
        calls["a"].add(n)
        return 1.0 * n

    def b(n):
        calls["b"].add(n)
        return 2.0 * n

    res = search_crossing(64, a, b, lambda k: 0.1)
    assert res.split.k in (42, 43)   # a(k) = b(64 - k) at k = 42.7
    assert len(calls["a"]) <= 10 and len(calls["b"]) <= 10


def test_split_cost_model():
    a, b, c = (lambda n: 2.0 * n), (lambda n: 1.0 * n), (lambda k: 0.5)
    assert split_cost(0, 6, a, b, c) == 6.0          # all on B, no copy
    assert split_cost(6, 6, a, b, c) == 12.0         # all on A, no copy
    assert split_cost(2, 6, a, b, c) == 4.0 + 0.5    # max(4, 4) + copy
    with pytest.raises(ConfigError):
        split_cost(7, 6, a, b, c)


def test_candidates_order_and_ranges():
    cs = candidates(3, ["cpu", "gpu"])
    assert [c.as_dict() for c in cs] == [
        {"cpu": 3, "gpu": 0}, {"cpu": 0, "gpu": 3}, {"cpu": 2, "gpu": 1}, {"cpu": 1, "gpu": 2}]
    assert cs[2].ranges() == {"cpu": (0, 2), "gpu": (2, 3)} and cs[2].k == 2
    assert len(candidates(4, ["a", "b", "c"])) == 15   # compositions of 4 into 3 parts
    assert HeadSplit.from_dict(cs[3].as_dict()) == cs[3]
    with pytest.raises(ConfigError):
        HeadSplit((("a", 1), ("a", 2)))


def test_select_deterministic_ties_by_candidate_order():
    cs = candidates(4, ["a", "b"])
    costs = {c: 1.0 for c in cs}
    assert select(costs) == cs[0]
    for order in (cs, cs[::-1], random.Random(0).sample(cs, len(cs))):
        assert select([(c, costs[c]) for c in order]) == cs[0]
        tie = {c: (0.5 if c in (cs[3], cs[2]) else 1.0) for c in order}
        assert select(tie) == cs[2]
    assert select({cs[1]: float("nan"), cs[2]: 3.0}) == cs[2]
    with pytest.raises(ConfigError):
        select({})


# ------------------------------------------------------------------------------------- cache
def _key(**kw):
    base = dict(board_id="rk3588-01", backends=("cpu", "mali"), source_hash="abc123",
                tvm_version="0.27.0", workload="attn B8 T128 H12 d32 float32")
    return CacheKey(**{**base, **kw})


def test_cache_round_trip_and_invalidation(tmp_path):
    path = tmp_path / "autotune.json"
    c = SplitCache(path)
    assert c.get(_key()) is None
    c.put(_key(), {"split": {"cpu": 5, "mali": 7}, "cost_ms": 3.0})
    assert c.get(_key())["split"] == {"cpu": 5, "mali": 7}
    assert c.get(_key(), retune=True) is None
    for change in (dict(board_id="rk3588-02"), dict(backends=("mali", "cpu")),
                   dict(source_hash="def456"), dict(tvm_version="0.28.0"),
                   dict(workload="attn B8 T64 H12 d32 float32")):
        assert c.get(_key(**change)) is None, change
    assert SplitCache(path).get(_key())["cost_ms"] == 3.0   # a new process reads the file
    assert not list(tmp_path.glob("autotune.json.*[!k]"))   # no temp files left (only .lock)
    data = json.loads(path.read_text())
    data["version"] = CACHE_VERSION + 1                       # a format change invalidates all
    path.write_text(json.dumps(data))
    assert SplitCache(path).get(_key()) is None
    path.write_text("{ not json")                              # corrupt: treated as empty
    assert SplitCache(path).get(_key()) is None
    SplitCache(path).put(_key(), {"split": {"cpu": 1, "mali": 11}, "cost_ms": 1.0})
    assert SplitCache(path).entries()[0]["key"]["board_id"] == "rk3588-01"


def test_tuner_persists_and_reuses_across_restart(tmp_path):
    n = {"calls": 0}

    def counted(f):
        def g(x):
            n["calls"] += 1
            return f(x)
        return g

    a, b, c = CURVES["affine_launch"]
    args = (12, counted(a), counted(b), counted(c))
    key = _key()
    first = tune_head_split(*args, cache=SplitCache(tmp_path / "t.json"), key=key)
    assert not first.from_cache and first.n_measured == n["calls"] > 0
    assert first.cost_ms <= 1.05 * exhaustive(12, a, b, c).cost
    calls = n["calls"]
    again = tune_head_split(*args, cache=SplitCache(tmp_path / "t.json"), key=key)   # "restart"
    assert again.from_cache and again.split == first.split and n["calls"] == calls
    re = tune_head_split(*args, cache=SplitCache(tmp_path / "t.json"), key=key, retune=True)
    assert not re.from_cache and n["calls"] > calls
    other = dataclasses.replace(key, source_hash="recompiled")
    assert not tune_head_split(*args, cache=SplitCache(tmp_path / "t.json"), key=other).from_cache
