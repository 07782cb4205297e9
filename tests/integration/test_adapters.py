"""Bottleneck adapters (compiler/adapters.py) on the real MiniLM weights, cut to 2 layers.

The compiled adapter stage is checked against an independent float64 torch forward written here
from the adapter equations (the BERT pieces - LayerNorm, GELU, linear, mask - come from
tests/reference_bert.py, which is itself checked against transformers):

    hd = dropout(dense(x));  a = hd + up(gelu(down(hd)));  y = LayerNorm(a + residual)

at both sites of every layer (attention output, FFN output). Tolerances as for the full model
(test_stage_gradients.py): 1e-4 relative per gradient tensor, 1e-5 relative on the loss.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from compiler.adapters import ADAPTERS_FILE, adapter_init, is_adapter_trainable, load_adapters
from compiler.arch import get_arch
from compiler.build import build_bundle
from compiler.kernels.common import keep_mask_numpy
from compiler.model_spec import StageSpec, split_qkv, stage_specs
from compiler.peft import peft_spec
from compiler.stage import _salt
from control.job import load_model
from control.local import LocalPipeline, OptimConfig
from edgert.contract import seed_vec
from edgert.errors import ConfigError, ModelError
from edgert.runtime import to_np
from tests import reference_bert as ref

pytestmark = pytest.mark.slow
B, T, L, R = 2, 16, 2, 8


@pytest.fixture(scope="module")
def model(minilm_dir):
    m = load_model(minilm_dir, num_labels=2, head_seed=0)
    return dataclasses.replace(m, dims=dataclasses.replace(m.dims, layers=L))


def _spec(model, dropout=True):
    (spec,) = stage_specs([(0, L)], B, T, dropout)
    return peft_spec(spec, model.dims, "adapter", adapter_size=R)


def _bundle(model, build_root, name, spec, weights):
    d = build_root / name / "stage0"
    build_bundle(d, model.dims, spec, get_arch("host"), weights, model.model_id, model.sha256,
                 configs={})
    return d


@pytest.fixture(scope="module")
def adapter(model, build_root):
    """An adapter stage whose up projections are non-zero (from zero, every down gradient is 0)."""
    spec = _spec(model)
    w = {**model.weights, **adapter_init(model.dims, spec, seed=1)}
    rng = np.random.default_rng(3)
    for k in w:
        if ".adapter.up." in k or k.endswith("adapter.down.bias"):
            w[k] = (0.05 * rng.standard_normal(w[k].shape)).astype(np.float32)
    return _bundle(model, build_root, "adapter_nz", spec, w), w


# ---- the independent float64 reference ----------------------------------------------------------
def _adapter(p, pre, x):
    """x + up(gelu(down(x))) from the adapter's four tensors."""
    u = ref._linear(x, p[pre + "adapter.down.weight"], p[pre + "adapter.down.bias"])
    return x + ref._linear(ref._gelu(u), p[pre + "adapter.up.weight"], p[pre + "adapter.up.bias"])


def _layer(p, pre, h, mask_add, heads, eps, masks):
    bsz, t, hid = h.shape
    dh = hid // heads

    def split(x):
        return x.reshape(bsz, t, heads, dh).permute(0, 2, 1, 3)

    a = pre + "attention."
    q, k, v = (split(ref._linear(h, p[f"{a}self.{n}.weight"], p[f"{a}self.{n}.bias"]))
               for n in ("query", "key", "value"))
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh) + mask_add, dim=-1)
    probs = ref._drop(probs, masks, a + "probs")
    ctx = (probs @ v).permute(0, 2, 1, 3).reshape(bsz, t, hid)
    att = ref._drop(ref._linear(ctx, p[a + "output.dense.weight"], p[a + "output.dense.bias"]),
                    masks, a + "output")
    att = _adapter(p, a + "output.", att)                    # adapter 1: after dropout, before LN
    h1 = ref._layer_norm(att + h, p[a + "output.LayerNorm.weight"], p[a + "output.LayerNorm.bias"],
                         eps)
    g = ref._gelu(ref._linear(h1, p[pre + "intermediate.dense.weight"],
                              p[pre + "intermediate.dense.bias"]))
    z = ref._drop(ref._linear(g, p[pre + "output.dense.weight"], p[pre + "output.dense.bias"]),
                  masks, pre + "output")
    z = _adapter(p, pre + "output.", z)                      # adapter 2
    return ref._layer_norm(z + h1, p[pre + "output.LayerNorm.weight"],
                           p[pre + "output.LayerNorm.bias"], eps)


def reference(weights, batch, config, masks=None):
    """float64 loss and gradients of every tensor in `weights` (HF names + adapter names)."""
    p = {k: torch.tensor(np.asarray(v), dtype=torch.float64, requires_grad=True)
         for k, v in weights.items()}
    mt = None if masks is None else {k: torch.as_tensor(v, dtype=torch.float64)
                                     for k, v in masks.items()}
    ids = torch.as_tensor(batch["input_ids"])
    e = "embeddings."
    x = (p[e + "word_embeddings.weight"][ids] + p[e + "position_embeddings.weight"][:T][None]
         + p[e + "token_type_embeddings.weight"][torch.as_tensor(batch["token_type_ids"])])
    x = ref._drop(ref._layer_norm(x, p[e + "LayerNorm.weight"], p[e + "LayerNorm.bias"],
                                  config.layer_norm_eps), mt, "embeddings")
    mask_add = ref.additive_mask(torch.as_tensor(batch["attention_mask"]), torch.float64)
    for i in range(L):
        x = _layer(p, f"encoder.layer.{i}.", x, mask_add, config.num_attention_heads,
                   config.layer_norm_eps, mt)
    pooled = torch.tanh(ref._linear(x[:, 0], p["pooler.dense.weight"], p["pooler.dense.bias"]))
    logits = ref._linear(ref._drop(pooled, mt, "classifier"), p["classifier.weight"],
                         p["classifier.bias"])
    loss = ref.cross_entropy(logits, torch.as_tensor(batch["labels"]))
    grads = torch.autograd.grad(loss, list(p.values()))
    return float(loss.detach()), {k: g.numpy() for k, g in zip(p, grads, strict=True)}


def _hf_with_adapters(w):
    """The stage's tensors (first L layers) under checkpoint names, adapters kept."""
    keep = {k: v for k, v in w.items()
            if not k.startswith("encoder.layer.") or int(k.split(".")[2]) < L}
    return split_qkv(keep)


def _compare(grads, ref_grads, names):
    assert set(grads) == set(names)
    for k in names:
        r, g = ref_grads[k], grads[k]
        err = np.linalg.norm(g - r) / np.linalg.norm(r)
        assert err < 1e-4, (k, err)


# ---- tests --------------------------------------------------------------------------------------
def test_adapter_gradients_match_float64_reference(model, adapter, real_batch):
    bundle, w = adapter
    batch = real_batch(B, T, offset=8)
    pipe = LocalPipeline([bundle])
    loss, (grads,) = pipe.grads(batch)
    trainable = [t.name for t in pipe.stages[0].manifest.trainable]
    assert len(trainable) == 2 + L * (4 + 8) + 2   # emb LN, per layer 2 LN + 2 adapters, head
    ref_loss, rg = reference(_hf_with_adapters(w), batch, model.config)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    _compare(grads, rg, trainable)
    assert min(np.abs(grads[k]).max() for k in trainable if ".adapter." in k) > 0


def test_adapter_training_step_with_dropout_matches_reference(model, adapter, real_batch):
    """Dropout on: the adapters sit after each dense's dropout (same hash masks as without)."""
    bundle, w = adapter
    batch, seed, d = real_batch(B, T, offset=20), 4242, model.dims

    def m(n, salt, p, shape):
        return keep_mask_numpy(n, seed, salt, p).reshape(shape)

    masks = {"embeddings": m(B * T * d.hidden, _salt(-1, 0), d.hidden_dropout, (B, T, d.hidden)),
             "classifier": m(B * d.hidden, _salt(-2, 0), d.hidden_dropout, (B, d.hidden))}
    for li in range(L):
        pre = f"encoder.layer.{li}."
        masks[pre + "attention.probs"] = m(B * d.heads * T * T, _salt(li, 0), d.attn_dropout,
                                           (B, d.heads, T, T))
        masks[pre + "attention.output"] = m(B * T * d.hidden, _salt(li, 1), d.hidden_dropout,
                                            (B, T, d.hidden))
        masks[pre + "output"] = m(B * T * d.hidden, _salt(li, 2), d.hidden_dropout,
                                  (B, T, d.hidden))
    pipe = LocalPipeline([bundle])
    loss, _, (gs,) = pipe.forward_backward(batch, seed_vec(seed, True), 1.0)
    grads = {t.name: to_np(g).copy() for t, g in zip(pipe.stages[0].manifest.trainable, gs,
                                                     strict=True)}
    ref_loss, rg = reference(_hf_with_adapters(w), batch, model.config, masks)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    _compare(grads, rg, list(grads))


def test_zero_initialised_adapters_give_exactly_the_base_model(model, build_root, real_batch):
    """up = 0: logits and loss bit-for-bit equal to the base model's (compiled without dropout;
    the adapter stage has dropout kernels, off at run time: they multiply by exactly 1)."""
    base_spec = stage_specs([(0, L)], B, T, False)[0]
    base = LocalPipeline([_bundle(model, build_root, "adapter_base", base_spec, model.weights)])
    spec = _spec(model)   # the same library as the `adapter` fixture's (compile cache)
    w = {**model.weights, **adapter_init(model.dims, spec, seed=0)}
    zero = LocalPipeline([_bundle(model, build_root, "adapter_zero", spec, w)])
    for off in (0, 40):
        batch = real_batch(B, T, offset=off)
        lb, xb = base.predict(batch)
        lz, xz = zero.predict(batch)
        np.testing.assert_array_equal(xz, xb)
        assert lz == lb
    assert np.abs(xb).max() > 1e-3


def test_frozen_params_get_no_gradients_or_optimizer_state(model, adapter, real_batch):
    bundle, _ = adapter
    pipe = LocalPipeline([bundle])
    man = pipe.stages[0].manifest
    names = [t.name for t in man.params]
    assert set(man.frozen) == {n for n in names if not is_adapter_trainable(n)}
    assert "encoder.layer.0.attention.self.qkv.weight" in man.frozen
    assert "encoder.layer.1.output.LayerNorm.weight" not in man.frozen
    before = pipe.params()
    pipe.train_step([real_batch(B, T, offset=4)], OptimConfig(lr=1e-3))
    after, opt = pipe.params(), pipe.optimizer_state()
    for n in names:
        trained = is_adapter_trainable(n)
        assert (not np.array_equal(before[n], after[n])) == trained, n
        assert (f"m/{n}" in opt) == trained and (f"v/{n}" in opt) == trained, n
    ratio = sum(a.nbytes for a in opt.values()) / (2 * sum(a.nbytes for a in before.values()))
    assert ratio < 0.02   # AdamW state of the trained tensors only (~1% of the stage's weights)


def test_export_and_reload_continue_exactly(model, adapter, build_root, real_batch, tmp_path):
    """Export = HF checkpoint (base + trained LayerNorms/head) + adapters.safetensors; loading
    both back into a bundle gives the trained pipeline's logits bit for bit."""
    from safetensors import safe_open

    from compiler.export import export_hf_internal

    bundle, _ = adapter
    pipe = LocalPipeline([bundle])
    pipe.train_step([real_batch(B, T, offset=6)], OptimConfig(lr=1e-3))
    out = export_hf_internal(tmp_path / "hf", model.config,
                             {**pipe.params(), **_other_layers(model)}, model.path, 2)
    with safe_open(str(out / "model.safetensors"), "numpy") as f:
        base_keys = set(f.keys())
    assert "bert.encoder.layer.0.attention.self.query.weight" in base_keys
    assert not any(".adapter." in k for k in base_keys)
    back = load_model(out)
    ad, r = load_adapters(out)
    assert r == R and len(ad) == 8 * L
    spec = _spec(model)
    again = LocalPipeline([_bundle(model, build_root, "adapter_reload", spec,
                                   {**back.weights, **ad})])
    batch = real_batch(B, T, offset=50)
    np.testing.assert_array_equal(again.predict(batch)[1], pipe.predict(batch)[1])
    (tmp_path / "hf" / ADAPTERS_FILE).write_bytes(b"garbage")
    with pytest.raises(ModelError, match="export it again"):
        load_adapters(out)
    export_hf_internal(out, model.config, back.weights, model.path, 2)   # no adapters this time
    assert not (out / ADAPTERS_FILE).exists()                           # the old ones are gone


def _other_layers(model):
    """The checkpoint's layers beyond the stage's L (export writes the full config's layers)."""
    return {k: v for k, v in model.weights.items()
            if k.startswith("encoder.layer.") and int(k.split(".")[2]) >= L}


def test_bad_adapter_config_is_a_clear_error(model):
    (spec,) = stage_specs([(0, L)], B, T)
    for bad in (0, -4):
        with pytest.raises(ConfigError, match="adapter_size >= 1"):
            peft_spec(spec, model.dims, "adapter", adapter_size=bad)
    lora = peft_spec(spec, model.dims, "lora", rank=4)
    with pytest.raises(ConfigError, match="cannot be combined with LoRA"):
        peft_spec(lora, model.dims, "adapter", adapter_size=8)
    with pytest.raises(ConfigError, match="cannot be combined with FAR"):
        StageSpec(0, 1, 0, L, B, T, ffn_learners=64, adapter_size=8)
    with pytest.raises(ConfigError, match="adapter_size >= 1"):
        adapter_init(model.dims, spec)


# ---- the training job and the CLI ---------------------------------------------------------------
def test_train_peft_on_a_board_then_continue_from_the_export(tmp_path):
    """`finetune_peft` (what `edgert train --peft adapter` runs): 2 steps on a local board, export;
    a second run started from that export loads its adapters and starts where the first ended."""
    from control.peft_train import PeftConfig, finetune_peft

    peft = PeftConfig("adapter", adapter_size=R)
    kw = dict(stages=1, batch=B, seq=T, micro_batches=1, eval_examples=4, lr=1e-3, configs={},
              layers=L)   # the `adapter` fixture's shapes: its compiled library is reused
    first = finetune_peft(peft=peft, out_dir=tmp_path / "a", steps=2, boards=True, **kw)
    assert len(first.losses) == 2 and len(first.boards) == 1
    hf = tmp_path / "a" / "hf_model"
    assert (hf / ADAPTERS_FILE).is_file() and (hf / "model.safetensors").is_file()
    second = finetune_peft(peft=peft, model_dir=hf, out_dir=tmp_path / "b", steps=1,
                           boards=False, export=False, **kw)
    assert second.before == first.after
    with pytest.raises(ConfigError, match="--adapter-size 8"):
        finetune_peft(peft=PeftConfig("adapter", adapter_size=4), model_dir=hf,
                      out_dir=tmp_path / "c", steps=1, boards=False, **kw)


@pytest.mark.parametrize("argv, msg", [
    (["--peft", "adapter", "--adapter-size", "0"], "--adapter-size must be >= 1"),
    (["--adapter-size", "8"], "add --peft adapter"),
    (["--peft", "lora", "--adapter-size", "8"], "applies to --peft adapter only"),
    (["--peft", "adapter", "--far", "0.4"], "--far and --peft"),
])
def test_train_peft_flags_are_checked_before_any_work(argv, msg, capsys, tmp_path):
    from control.cli import main

    assert main(["train", "--out", str(tmp_path / "x"), *argv]) == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
