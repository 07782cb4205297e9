"""The attention head split inside training stages (compiler/head_split.py, edgert/head_split/executor.py).

A stage compiled with head_split=True calls the board's split executor for every layer's attention
forward and backward. Checked here on the real MiniLM weights and real batches, dropout on:

* in-process, for k = 0, 1, H/2, H: loss, logits and every gradient of both stages (the
  second stage's dhidden feeds the first stage's backward) equal the unsplit stages *bit for bit*
  (the split runs the same kernels on the same numbers; the dropout salt is folded into the seed)
* on real board processes: training steps with the split (k = 6) equal the single-process
  unsplit pipeline (losses and weights, bit for bit); STATS, PROFILE and the LOAD reply report it
* the tuned k is measured once, persisted, and reused after the boards restart (0 measurements)
* a split point out of range is refused with a message naming the range; a dead worker fails
  only its step with a clear message, and the board keeps serving (the workers restart)

Stages: stage 0 = embeddings + layer 0, stage 1 = layer 5 + head (1 layer each: fast compiles).
"""

from __future__ import annotations

import numpy as np
import psutil
import pytest

from compiler.arch import get_arch
from compiler.build import build_bundle
from compiler.model_spec import StageSpec
from control.cluster import LocalCluster
from control.job import load_model
from control.local import LocalPipeline, OptimConfig
from edgert.artifact import load_manifest
from edgert.contract import seed_vec
from edgert.errors import BoardError, ConfigError
from edgert.head_split import executor as hsx
from edgert.runtime import to_np

pytestmark = pytest.mark.slow
B, T, H, M = 2, 16, 12, 2
OPT = OptimConfig(lr=1e-4, warmup_steps=1, total_steps=3)
TWO_CORES = len(__import__("os").sched_getaffinity(0)) >= 2


@pytest.fixture(scope="module")
def bundles(minilm_dir, build_root):
    model = load_model(minilm_dir, num_labels=2, head_seed=0)
    arch, root = get_arch("host"), build_root / "head_split_stage"
    spec = StageSpec(0, 1, 0, 1, B, T)   # a one-layer model: embeddings, layer 0, head
    out = {}
    for name, split in (("plain", False), ("split", True)):
        build_bundle(root / name, model.dims, spec, arch, model.weights, model.model_id,
                     model.sha256, configs={}, head_split=split)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def micro_batches(real_batch):
    return [[real_batch(B, T, offset=(M * s + j) * B) for j in range(M)] for s in range(3)]


def _fb(pipe, batch):
    loss, logits, grads = pipe.forward_backward(batch, seed_vec(4321, True), 0.5)
    return loss, logits, [to_np(g).copy() for g in grads[0]]


def test_fold_seed_reproduces_the_salt():
    from compiler.kernels.common import keep_mask_numpy

    for seed, salt in ((1, 16), (4321, 23), (2**31 + 5, 57), (-3, 9)):
        want = keep_mask_numpy(4096, seed & 0xFFFFFFFF, salt, 0.1)
        got = keep_mask_numpy(4096, hsx.fold_seed(seed, salt), hsx.LIB_SALT, 0.1)
        assert np.array_equal(got, want), (seed, salt)


@pytest.mark.skipif(not TWO_CORES, reason="needs 2 cores for two pinned backends")
def test_split_stage_equals_unsplit_for_every_kind_of_k(bundles, real_batch):
    batch = real_batch(B, T, offset=40)
    ref = _fb(LocalPipeline([bundles["plain"]]), batch)
    m = load_manifest(bundles["split"])
    shape, p = hsx.attn_shape(m)
    assert (shape.H, p) == (H, 0.1) and hsx.has_split(m)
    ex = hsx.SplitExecutor(bundles["split"] / hsx.SPLIT_LIB, shape, p)
    hsx.install(ex)   # before the VM is created: it resolves the packed functions on load
    try:
        pipe = LocalPipeline([bundles["split"]])
        names = [t.name for t in pipe.stages[0].manifest.trainable]
        for k in (0, 1, H // 2, H):
            ex.set_k(k)
            calls = dict(ex.calls)
            loss, logits, grads = _fb(pipe, batch)
            assert ex.calls == {"fwd": calls["fwd"] + 1, "bwd": calls["bwd"] + 1}
            assert loss == ref[0], k
            assert np.array_equal(logits, ref[1]), k
            for n, g, r in zip(names, grads, ref[2], strict=True):
                assert np.array_equal(g, r), f"k={k}: gradient {n} differs " \
                    f"(max {np.abs(g - r).max():.2e})"
        with pytest.raises(ConfigError, match=r"outside \[0, 12\]"):
            ex.set_k(H + 1)
    finally:
        hsx.install(None)
    assert ex._pw is None   # install(None) stopped the workers


@pytest.mark.skipif(not TWO_CORES, reason="needs 2 cores for two pinned backends")
def test_split_on_a_board_process_equals_single_process(bundles, micro_batches):
    ref = LocalPipeline([bundles["plain"]])
    ref_losses = [ref.train_step(mb, OPT) for mb in micro_batches]
    with LocalCluster(1, timeout=60) as c:
        with pytest.raises(BoardError, match=r"head_split_k must be an integer split point in "
                                             r"\[0, 12\]"):
            c.deploy([bundles["split"]], micro_batches=M, load_options={"head_split_k": H + 1})
        c.deploy([bundles["split"]], micro_batches=M, load_options={"head_split_k": H // 2})
        rep = c.load_replies["board0"]["head_split"]
        assert rep["k"] == H // 2 and rep["source"] == "forced"
        assert rep["split"] == {"cpu0": 6, "cpu1": 6} and rep["layers"] == {"0": 6}
        losses = [c.train_step(mb, OPT) for mb in micro_batches]
        assert losses == ref_losses
        params, want = c.params(), ref.params()
        for name in want:
            assert np.array_equal(params[name], want[name]), name
        assert c.stats(0)["head_split"]["calls"] == {"fwd": 3 * M, "bwd": 3 * M}
        assert c.profile(0)["head_split"]["k"] == H // 2

        # a dead worker fails its step with a clear message; the board keeps serving
        board = psutil.Process(c.boards[0].proc.pid)
        workers = [q for q in board.children() if "edgert.head_split.worker" in " ".join(
            q.cmdline())]
        assert len(workers) == 2
        workers[1].kill()   # (a zombie until the board reaps it: not ours to wait for)
        with pytest.raises(BoardError, match=r"head split: layer 0 attention fwd at split k=6 "
                                             r"failed: worker cpu1 \(core 1\) exited with code -9"):
            c.train_step(micro_batches[0], OPT)
        assert c.profile(0)["head_split"]["k"] == H // 2
        assert np.isfinite(c.train_step(micro_batches[0], OPT))   # workers restarted


@pytest.mark.skipif(not TWO_CORES, reason="needs 2 cores for two pinned backends")
def test_tuned_split_is_persisted_and_reused_after_restart(bundles):
    replies = []
    for restart in (False, True):   # the second cluster is a restart: new board process
        with LocalCluster(1, timeout=120) as c:
            c.deploy([bundles["split"]], micro_batches=M)
            replies.append(c.load_replies["board0"]["head_split"])
            if restart:   # and a re-tune on request
                c.deploy([bundles["split"]], micro_batches=M,
                         load_options={"head_split_retune": True})
                replies.append(c.load_replies["board0"]["head_split"])
    tuned, cached, retuned = replies
    assert tuned["source"] == "tuned" and tuned["n_measured"] > 0
    assert cached["source"] == "cache" and cached["n_measured"] == 0
    assert cached["k"] == tuned["k"] and 0 <= tuned["k"] <= H
    assert cached["cost_ms"] == tuned["cost_ms"]
    assert retuned["source"] == "tuned" and retuned["n_measured"] > 0
