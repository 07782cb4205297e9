"""PEFT in the backprop pipeline: BitFit stages (compiler/peft.py) on the real MiniLM.

The BitFit bundle's backward returns gradients for the biases and the classifier only; they must
equal the independent float64 reference (tests/reference_bert.py) to the same 1e-4 relative bound
as the full model's (test_stage_gradients.py); AdamW keeps state only for them and never moves a
frozen weight.
"""

from __future__ import annotations

import numpy as np
import pytest

from compiler.arch import get_arch
from compiler.build import build_bundle
from compiler.model_spec import split_qkv, stage_specs
from compiler.peft import is_bitfit_trainable, peft_spec
from control.job import load_model
from control.local import LocalPipeline, OptimConfig

from tests import reference_bert as ref

pytestmark = pytest.mark.slow
B, T = 2, 16


@pytest.fixture(scope="module")
def model(minilm_dir):
    return load_model(minilm_dir, num_labels=2, head_seed=0)


@pytest.fixture(scope="module")
def bitfit_bundle(model, build_root):
    (spec,) = stage_specs([(0, model.dims.layers)], B, T)
    spec = peft_spec(spec, model.dims, "bitfit")
    d = build_root / "peft_bitfit" / "stage0"
    build_bundle(d, model.dims, spec, get_arch("host"), model.weights, model.model_id,
                 model.sha256, configs={})
    return d


def test_bitfit_gradients_match_float64_reference(model, bitfit_bundle, real_batch):
    batch = real_batch(B, T, offset=8)
    pipe = LocalPipeline([bitfit_bundle])
    loss, (grads,) = pipe.grads(batch)
    names = {t.name for t in pipe.stages[0].manifest.params}
    assert set(grads) == {n for n in names if is_bitfit_trainable(n)}
    assert len(grads) == 6 * 6 + 1 + 3    # 6 biases per layer (qkv fused), embedding LN, head
    ref_loss, ref_grads = ref.loss_and_grads(model.hf_weights(), batch, config=model.config)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    ours = split_qkv(grads)
    top = max(np.linalg.norm(ref_grads[k]) for k in ours)
    for k, g in ours.items():
        r = ref_grads[k]
        if np.linalg.norm(r) < 1e-7 * top:          # key bias: exactly zero true gradient
            assert np.linalg.norm(g) <= 1e-6 * top, k
        else:
            assert np.linalg.norm(g - r) / np.linalg.norm(r) < 1e-4, k


def test_bitfit_step_moves_only_trainable_params(bitfit_bundle, real_batch):
    pipe = LocalPipeline([bitfit_bundle])
    before = pipe.params()
    pipe.train_step([real_batch(B, T, offset=16)], OptimConfig(lr=1e-3))
    after = pipe.params()
    opt = pipe.optimizer_state()
    for n in before:
        moved = not np.array_equal(before[n], after[n])
        assert moved == is_bitfit_trainable(n), n
        assert (f"m/{n}" in opt) == is_bitfit_trainable(n)
    state_bytes = sum(a.nbytes for a in opt.values())
    assert state_bytes < 0.01 * 2 * sum(a.nbytes for a in before.values())


# ---- LoRA ---------------------------------------------------------------------------------------
RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def lora(model, build_root):
    """A LoRA bundle whose B factors are non-zero (from zero, dA would be exactly zero)."""
    from compiler.peft import lora_init

    (spec,) = stage_specs([(0, model.dims.layers)], B, T)
    spec = peft_spec(spec, model.dims, "lora", rank=RANK, alpha=ALPHA)
    w = {**model.weights, **lora_init(model.dims, spec, seed=1)}
    rng = np.random.default_rng(2)
    for k in w:
        if k.endswith("lora_B"):
            w[k] = (0.05 * rng.standard_normal(w[k].shape)).astype(np.float32)
    d = build_root / "peft_lora" / "stage0"
    build_bundle(d, model.dims, spec, get_arch("host"), w, model.model_id, model.sha256, configs={})
    return d, w, ALPHA / RANK


def test_lora_gradients_match_float64_reference(model, lora, real_batch):
    """dA, dB from the compiled backward vs the chain rule on the reference's gradient of the merged
    weight W' = W + s B A (dB = s G A^T, dA = s B^T G): same 1e-4 bound; the head too."""
    from compiler.peft import merge_lora

    bundle, w, s = lora
    batch = real_batch(B, T, offset=24)
    pipe = LocalPipeline([bundle])
    loss, (grads,) = pipe.grads(batch)
    assert set(grads) == {k for k in w if ".lora_" in k} | {"classifier.weight", "classifier.bias"}
    ref_loss, rg = ref.loss_and_grads(split_qkv(merge_lora(w, s)), batch, config=model.config)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for li in range(model.dims.layers):
        pre = f"encoder.layer.{li}.attention.self."
        G = np.concatenate([rg[f"{pre}{q}.weight"] for q in ("query", "key", "value")])
        a, b = w[pre + "qkv.lora_A"].astype(np.float64), w[pre + "qkv.lora_B"].astype(np.float64)
        for name, r in ((pre + "qkv.lora_B", s * G @ a.T), (pre + "qkv.lora_A", s * b.T @ G)):
            assert np.linalg.norm(grads[name] - r) / np.linalg.norm(r) < 1e-4, name
    for k in ("classifier.weight", "classifier.bias"):
        assert np.linalg.norm(grads[k] - rg[k]) / np.linalg.norm(rg[k]) < 1e-4, k


def test_merged_lora_export_gives_the_same_outputs(model, lora, real_batch, tmp_path):
    """Train a few LoRA steps, merge into the base weights, export a Hugging Face checkpoint:
    transformers' logits on the merged checkpoint equal the LoRA bundle's (unmerged) logits."""
    import torch
    from transformers import BertForSequenceClassification

    from compiler.export import export_hf_internal

    bundle, _, s = lora
    pipe = LocalPipeline([bundle])
    before = pipe.params()
    for i in range(3):
        pipe.train_step([real_batch(B, T, offset=32 + 2 * i)], OptimConfig(lr=1e-3))
    params = pipe.params()
    assert not np.array_equal(before["encoder.layer.0.attention.self.qkv.lora_A"],
                              params["encoder.layer.0.attention.self.qkv.lora_A"])
    assert np.array_equal(before["encoder.layer.0.attention.self.qkv.weight"],
                          params["encoder.layer.0.attention.self.qkv.weight"])   # frozen base
    batch = real_batch(B, T, offset=60)
    _, logits = pipe.predict(batch)
    out = export_hf_internal(tmp_path / "hf", model.config, params, model.path, 2, lora_scale=s)
    hf = BertForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        got = hf(input_ids=torch.from_numpy(batch["input_ids"]),
                 attention_mask=torch.from_numpy(batch["attention_mask"]),
                 token_type_ids=torch.from_numpy(batch["token_type_ids"])).logits.numpy()
    np.testing.assert_allclose(got, logits, rtol=0, atol=1e-4)
    assert np.abs(logits).max() > 1e-3


def test_frozen_weight_gradients_are_not_computed(model):
    """The stage graph emits every layer's weight-gradient GEMMs; `compiler.build.prune` (applied
    by compile_stage) must drop those of frozen weights: in a LoRA stage no backward call may
    produce a dense weight's gradient shape ([F, D], [D, F], [D, D], [3D, D]), while the full
    stage's backward has each of them."""
    import tvm
    from tvm import relax

    from compiler.build import _graph, prune

    d = model.dims
    D, F = d.hidden, d.ffn
    dense = {(F, D), (D, F), (D, D), (3 * D, D)}

    def out_shapes(spec):
        mod = prune(_graph(d, spec, get_arch("host"), "float32", {}).build(optimizer=True))
        shapes = []

        def visit(e):
            if isinstance(e, relax.Call) and e.op == tvm.ir.Op.get("relax.call_tir"):
                sinfo = e.ty_args[0]
                for t in getattr(sinfo, "fields", None) or [sinfo]:
                    shapes.append(tuple(int(x) for x in t.shape.values))
        relax.analysis.post_order_visit(mod["stage_backward"].body, visit)
        return set(shapes)

    (spec,) = stage_specs([(0, 2)], B, T)
    assert dense <= out_shapes(spec)
    assert not dense & out_shapes(peft_spec(spec, d, "lora", rank=8))
