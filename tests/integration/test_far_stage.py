"""FAR's reconfigured FFN, compiled: same function, learner-only gradients, frozen weights kept.

The reference is the dense compiled stage (itself checked against an independent float64 PyTorch
model in test_stage_gradients.py) on the same real MiniLM weights, regrouped by `compiler.far`.
One encoder layer (a middle stage, layer 2) keeps the builds small; a float64 build isolates the
mathematics from float32 rounding; the whole float32 model (dense and FAR, one stage) is then
compared through priming, the switch, a training step and the export.

Tolerances. float64: outputs and gradients to 1e-12 relative (only summation order differs: the
FFN output is summed over learner and frozen nodes in two GEMMs). float32: 1e-5 relative per tensor
(logits, loss, gradients), 1e-4 on the whole AdamW update.
"""

from __future__ import annotations

import numpy as np
import pytest

from compiler.arch import get_arch
from compiler.build import build_bundle
from compiler.far import FarPlan, far_spec, learner_count, reconfigure, restore, select
from compiler.model_spec import FAR_SPLIT, StageSpec
from control.job import load_model
from control.local import seed_vec
from edgert.runtime import TvmStage, to_np

B, T, LAYER = 2, 32, 2
PRE = f"encoder.layer.{LAYER}."
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(minilm_dir):
    return load_model(minilm_dir, num_labels=2, head_seed=0)


@pytest.fixture(scope="module")
def plan(model):
    # Random learners (a non-trivial permutation), an unaligned count (614: padded GEMM tiles).
    r = learner_count(model.dims.ffn, 0.4)
    scores = {LAYER: np.random.default_rng(3).random(model.dims.ffn)}
    return select(scores, r, "l1")


@pytest.fixture(scope="module")
def data(model, real_batch):
    b = real_batch(B, T)
    # Real activations entering layer 2 are not needed for an equivalence test; the real tokens'
    # word embeddings are a realistic input scale, with the real (padded) attention mask.
    emb = model.weights["embeddings.word_embeddings.weight"][b["input_ids"]].reshape(B * T, -1)
    return emb, b["attention_mask"]


_BUILT: dict[str, dict[str, TvmStage]] = {}


def _stages(model, plan, build_root, dtype):
    """The dense and the FAR build of layer 2 (dropout compiled in; the seed turns it on/off)."""
    if dtype in _BUILT:
        return _BUILT[dtype]
    spec = StageSpec(1, 3, LAYER, LAYER + 1, B, T)
    arch = get_arch("host")
    out = _BUILT[dtype] = {}
    for name, sp, w in (("dense", spec, model.weights),
                        ("far", far_spec(spec, plan), reconfigure(model.weights, plan))):
        d = build_root / f"far_{name}_{dtype}"
        build_bundle(d, model.dims, sp, arch, w, model.model_id, model.sha256, dtype=dtype,
                     configs={})
        out[name] = TvmStage.load(d)
    return out


def _run(st, data, dtype, seed):
    h, mask = data
    outs, saved = st.forward([h.astype(dtype), mask], seed)
    y = to_np(outs[0]).copy()
    dout = np.sin(np.arange(y.size, dtype=dtype)).reshape(y.shape)   # a fixed upstream gradient
    dx, grads = st.backward(saved, dout, seed)
    names = [t.name for t in st.manifest.trainable]
    return y, to_np(dx).copy(), {n: to_np(g).copy() for n, g in zip(names, grads, strict=True)}


def _rel(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def test_far_layer_matches_dense_layer(model, plan, data, build_root, dtype="float64", tol=1e-12):
    st = _stages(model, plan, build_root, dtype)
    seed = seed_vec(1, False)
    y0, dx0, g0 = _run(st["dense"], data, dtype, seed)
    y1, dx1, g1 = _run(st["far"], data, dtype, seed)
    assert _rel(y1, y0) <= tol, "forward output differs"
    assert _rel(dx1, dx0) <= tol, "input gradient differs"
    # The frozen parts get no gradient at all; the learner parts get the dense gradient's slices.
    frozen = {f"{PRE}{FAR_SPLIT[n][1]}" for n in FAR_SPLIT}
    assert frozen == set(st["far"].manifest.frozen)
    assert not frozen & set(g1)
    want = {n: g for n, g in reconfigure(g0, plan).items() if n not in frozen}
    assert set(g1) == set(want)
    for n, g in g1.items():
        assert _rel(g, want[n]) <= tol, n
    worst = max(_rel(g, want[n]) for n, g in g1.items())
    print(f"{dtype}: forward {_rel(y1, y0):.1e}, dx {_rel(dx1, dx0):.1e}, worst grad {worst:.1e}")


def test_train_step_leaves_frozen_weights_bit_identical(model, plan, data, build_root):
    st = _stages(model, plan, build_root, "float64")["far"]
    before = st.params_numpy()
    m, v = st.zeros_like_params(), st.zeros_like_params()
    assert [tuple(to_np(a).shape) for a in m] == [t.shape for t in st.manifest.trainable]
    seed = seed_vec(7, True)
    for step in (1, 2):
        _, _, grads = _run(st, data, "float64", seed)
        hyper = np.array([1e-3, 0.9, 0.999, 1e-8, 0.01, 1 - 0.9 ** step, 1 - 0.999 ** step, 1.0])
        st.optimizer_step(list(grads.values()), m, v, hyper)
    after = st.params_numpy()
    for n in st.manifest.frozen:
        assert np.array_equal(after[n], before[n]), n
    for t in st.manifest.trainable:
        assert not np.array_equal(after[t.name], before[t.name]), f"{t.name} was not trained"
    # Export layout: dense tensors again; frozen nodes (original indices) hold the checkpoint's
    # values bit for bit, and the round trip through the FAR layout is exact.
    dense = restore(after, plan)
    frozen_nodes = np.asarray(plan.perms[LAYER][plan.learners:])
    for n, axis in (("intermediate.dense.weight", 0), ("intermediate.dense.bias", 0),
                    ("output.dense.weight", 1)):
        got = np.take(dense[PRE + n], frozen_nodes, axis=axis)
        assert np.array_equal(got, np.take(model.weights[PRE + n], frozen_nodes, axis=axis)), n
    again = reconfigure(dense, plan)
    assert all(np.array_equal(again[k], after[k]) for k in after)
    st.set_params(before)   # the module's stages are shared with the equivalence test


def test_far_plan_survives_json(tmp_path, plan):
    plan.save(tmp_path / "plan.json")
    assert FarPlan.load(tmp_path / "plan.json") == plan


def test_switch_to_far_continues_the_dense_run_and_exports_the_dense_layout(
        model, build_root, real_batch, tmp_path):
    """Priming on the dense stages, then FAR: the state carries over exactly, the next step
    trains what the dense step trains (learner slices) and nothing of the frozen parts, and the
    export holds the dense layout."""
    from safetensors.numpy import load_file

    from compiler.export import export_hf
    from compiler.model_spec import split_qkv
    from control.far import FarConfig, plan_from_priming, switch_to_far
    from control.job import compile_bundles
    from control.local import LocalPipeline, OptimConfig

    ck = {"stages": 1, "batch": 2, "seq": 16}
    pipe = LocalPipeline(compile_bundles(model, build_root / "far_run", progress=False, configs={},
                                         **ck))
    opt = OptimConfig(lr=1e-3)
    pipe.train_step([real_batch(2, 16, 0)], opt)                            # priming
    # With the embeddings frozen too (the paper's operating point): their backward is not compiled
    # at all (compiler/stage.py `_embed_bwd`), every other gradient must still be the dense one.
    plan = plan_from_priming(model.weights, pipe.params(), model.dims.layers, model.dims.ffn,
                             FarConfig(retention=0.4, freeze_embeddings=True))
    assert plan.learners == 624 and sorted(plan.perms) == list(range(model.dims.layers))
    far = switch_to_far(pipe, model, plan, build_root / "far_run_far", configs={}, **ck)
    primed = pipe.params()
    assert all(np.array_equal(v, primed[k]) for k, v in restore(far.params(), plan).items())
    probe = real_batch(2, 16, 5)
    np.testing.assert_allclose(far.predict(probe)[1], pipe.predict(probe)[1], rtol=1e-5, atol=1e-6)
    (l0, (g0,)), (l1, (g1,)) = pipe.grads(probe), far.grads(probe)     # float32, dropout off
    assert abs(l1 - l0) <= 1e-6 * abs(l0)
    g0 = reconfigure(g0, plan)
    assert set(g1) == set(g0) - far.stages[0].manifest.frozen
    assert set(plan.freeze) <= far.stages[0].manifest.frozen
    for n, g in g1.items():
        assert _rel(g, g0[n]) <= 1e-5, n

    batch = real_batch(2, 16, 2)
    l_dense, l_far = pipe.train_step([batch], opt), far.train_step([batch], opt)
    assert abs(l_far - l_dense) <= 1e-5 * abs(l_dense)
    want, got, base = reconfigure(pipe.params(), plan), far.params(), reconfigure(primed, plan)
    for n in far.stages[0].manifest.frozen:
        assert np.array_equal(got[n], base[n]), f"{n} changed"
    # The same AdamW update (over all trained tensors: AdamW amplifies the rounding noise of the
    # key biases' exactly-zero gradients, so single tiny tensors are not comparable).
    tr = [t.name for t in far.stages[0].manifest.trainable]
    d_far = np.concatenate([(got[n] - base[n]).ravel() for n in tr])
    d_dense = np.concatenate([(want[n] - base[n]).ravel() for n in tr])
    assert _rel(d_far, d_dense) <= 1e-4

    dense = split_qkv(restore(got, plan))
    out = export_hf(tmp_path / "hf", model.config, dense, model.path, 2)
    back = load_file(str(out / "model.safetensors"))
    for n, v in dense.items():
        key = n if n.startswith("classifier.") else "bert." + n
        assert np.array_equal(back[key], v), n


def test_finetune_far_runs_the_three_phases_and_exports(model, tmp_path):
    """The run mode end to end (same shapes and frozen set as above: the compiled libraries are
    cached)."""
    from transformers import BertForSequenceClassification

    from control.far import FarConfig, finetune_far

    far = FarConfig(retention=0.4, priming_fraction=0.3, freeze_embeddings=True)
    rep = finetune_far(far=far, out_dir=tmp_path,
                       stages=1, steps=4, batch=2, micro_batches=1, seq=16, eval_examples=8,
                       configs={})
    assert len(rep["step_seconds"]["priming"]) == 1 and len(rep["step_seconds"]["far"]) == 3
    assert all(np.isfinite(rep["losses"])) and rep["learners"] == 624
    plan = FarPlan.load(rep["plan"])
    hf = BertForSequenceClassification.from_pretrained(tmp_path / "hf_model")
    w = hf.state_dict()["bert.encoder.layer.3.intermediate.dense.weight"].numpy()
    assert w.shape == (model.dims.ffn, model.dims.hidden)
    # Frozen nodes moved in the one priming step only: AdamW's first step moves each element by at
    # most lr (|m_hat / sqrt(v_hat)| = 1, plus a tiny weight decay), so a row by <= lr * D. The
    # learners trained 3 steps more.
    moved = np.abs(w - model.hf_weights()["encoder.layer.3.intermediate.dense.weight"]).sum(axis=1)
    learn, frozen = list(plan.perms[3][:plan.learners]), list(plan.perms[3][plan.learners:])
    one_step = 2e-4 * model.dims.hidden * 1.01          # finetune_far's default lr
    assert moved[frozen].max() <= one_step < moved[learn].mean() / 1.2
    word = hf.state_dict()["bert.embeddings.word_embeddings.weight"].numpy()   # frozen after priming
    ref = model.hf_weights()["embeddings.word_embeddings.weight"]
    assert np.abs(word - ref).max() <= 2e-4 * 1.01 and rep["far"]["freeze_embeddings"]
