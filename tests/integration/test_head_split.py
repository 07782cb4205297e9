"""Head-split attention on two real CPU backends (edgert/head_split, docs/head_split.md).

* for every split point k in 0..H, attention fwd + bwd run as heads [0, k) + [k, H) equals the full
  kernel: ctx and probs concatenated, dqkv scattered back (in-process, and on two pinned workers)
* the two workers (processes pinned to cores 0 and 1) really run concurrently
* the binary search on the measured per-backend costs is within 5% of exhaustive search
* the tuned split is persisted and reused after a restart without measuring again
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import tvm

from compiler.arch import get_arch
from compiler.head_split import compile_split_library
from compiler.kernels.attention import build_attention_bwd, build_attention_fwd, subset_columns
from edgert.artifact import sha256_file
from edgert.contract import AttnShape, kernel_name
from edgert.head_split.cache import CacheKey, SplitCache, tvm_version
from edgert.head_split.space import exhaustive, search_crossing, split_cost
from edgert.head_split.tuner import tune_head_split
from edgert.head_split.workers import PinnedWorkers

B, T, H, d, P_DROP = 2, 16, 12, 32, 0.1
SHAPE = AttnShape(B, T, H, d)
TWO_CORES = len(__import__("os").sched_getaffinity(0)) >= 2


@pytest.fixture(scope="module")
def lib():
    # From the session's compile cache: the same library as test_head_split_stage's bundle.
    path, _ = compile_split_library(SHAPE, P_DROP, get_arch("host"))
    return tvm.runtime.load_module(str(path)), path


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    qkv = (rng.standard_normal((B * T, 3 * H * d)) * 1.5).astype("float32")
    mask = np.ones((B, T), "float32")
    mask[0, T - 4:] = 0.0
    dctx = rng.standard_normal((B * T, H * d)).astype("float32")
    return qkv, mask, np.array([1234, 1], "int64"), dctx


@pytest.fixture(scope="module")
def workers(lib):
    if not TWO_CORES:
        pytest.skip("needs 2 cores for two pinned backends")
    with PinnedWorkers(str(lib[1]), SHAPE) as pw:
        yield pw


def _run(ex, heads, qkv, mask, seed, dctx):
    """In-process fwd + bwd of one head subset on its gathered columns."""
    n = heads[1] - heads[0]
    t = lambda x: tvm.runtime.tensor(np.ascontiguousarray(x))  # noqa: E731
    ctx, P = t(np.zeros((B * T, n * d), "float32")), t(np.zeros((B, n, T, T), "float32"))
    g, q, s = t(np.zeros((B * T, 3 * n * d), "float32")), t(qkv), t(seed)
    ex[kernel_name("fwd", *heads)](q, t(mask), s, ctx, P)
    ex[kernel_name("bwd", *heads)](q, P, t(dctx), s, g)
    return ctx.numpy(), P.numpy(), g.numpy()


def _assert_same(got, want, what):
    """Bit-exact when it is; otherwise float32 round-off only (1e-6 relative)."""
    for name, a, b in zip(("ctx", "probs", "dqkv"), got, want, strict=True):
        if not np.array_equal(a, b):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.abs(b).max(),
                                       err_msg=f"{what}: {name}")


@pytest.fixture(scope="module")
def full(lib, data):
    return _run(lib[0], (0, H), *data)


def test_split_equals_unsplit_every_k_in_process(lib, data, full):
    qkv, mask, seed, dctx = data
    inexact = []
    for k in range(H + 1):
        parts = [hs for hs in ((0, k), (k, H)) if hs[1] > hs[0]]
        ctx, P, g = [], [], np.zeros_like(full[2])
        for h0, h1 in parts:
            cols = subset_columns(H, d, (h0, h1))
            c_k, P_k, g_k = _run(lib[0], (h0, h1), qkv[:, cols], mask, seed, dctx[:, h0 * d:h1 * d])
            ctx.append(c_k)
            P.append(P_k)
            g[:, cols] = g_k
        got = (np.concatenate(ctx, axis=1), np.concatenate(P, axis=1), g)
        _assert_same(got, full, f"k={k}")
        inexact += [k] if not all(np.array_equal(a, b) for a, b in zip(got, full)) else []
    print(f"split points not bit-exact (float32 round-off only): {inexact}")


def test_split_equals_unsplit_every_k_on_pinned_workers(workers, data, full):
    assert [w["affinity"] for w in workers.worker_info] == [[0], [1]]
    workers.set_inputs(*data)
    for k in range(H + 1):
        _assert_same(workers.run_split(k), full, f"pinned workers k={k}")


def test_workers_run_concurrently(workers, data):
    workers.set_inputs(*data)
    # Another process on the machine can only make the two look serialised (never concurrent), so
    # up to 3 attempts: overlap seen once proves the workers can run at the same time.
    tries = []
    for _ in range(3):
        solo = [workers.backend_ms(i, H, io=False, reps=300, warmup=20).mean * 300 for i in (0, 1)]
        t0 = time.perf_counter()
        for i in (0, 1):
            workers._send(i, {"op": "attn", "h0": 0, "h1": H, "io": False, "reps": 300,
                              "warmup": 20})
        for i in (0, 1):
            workers._recv(i)
        both = (time.perf_counter() - t0) * 1e3
        tries.append((both, solo))
        # serialised would take solo[0] + solo[1]; concurrent ~max(solo) (+ warm-up)
        if both < 0.8 * sum(solo):
            break
    else:
        raise AssertionError(f"the two workers never overlapped: (both ms, solo ms) {tries}")


def test_measured_search_within_5pct_and_persisted(workers, data, lib, tmp_path):
    workers.set_inputs(*data)
    table_a = {n: workers.cost(0, n, reps=15) for n in range(1, H + 1)}
    table_b = {n: workers.cost(1, n, reps=15) for n in range(1, H + 1)}
    table_c = {k: workers.copy_ms(k, reps=15).median for k in range(1, H)}
    tables = (table_a.__getitem__, table_b.__getitem__, table_c.__getitem__)
    best = exhaustive(H, *tables, backends=workers.names)
    got = search_crossing(H, *tables, backends=workers.names)
    assert got.cost <= 1.05 * best.cost, (got, best)
    assert got.cost == split_cost(got.split.k, H, *tables)

    calls = []

    def live(fn):
        def measure(n):
            calls.append(n)
            return fn(n)
        return measure

    args = (H, live(lambda n: workers.cost(0, n)), live(lambda n: workers.cost(1, n)),
            live(lambda k: workers.copy_ms(k).median))
    key = CacheKey(board_id="test-host", backends=workers.names, source_hash=sha256_file(lib[1]),
                   tvm_version=tvm_version(),
                   workload=f"attn_fwd_bwd B{B} T{T} H{H} d{d} float32 p{P_DROP}")
    first = tune_head_split(*args, cache=SplitCache(tmp_path / "autotune.json"), key=key)
    assert not first.from_cache and 0 < len(calls) < 2 * H + (H - 1)   # fewer than exhaustive
    n_calls = len(calls)
    again = tune_head_split(*args, cache=SplitCache(tmp_path / "autotune.json"), key=key)
    assert again.from_cache and again.split == first.split and len(calls) == n_calls
    print(f"measured search: {got.split} {got.cost:.4f} ms vs exhaustive {best.split} "
          f"{best.cost:.4f} ms; live tune chose {first.split} with {n_calls} measurements")
