"""GGUF block quantizers and the quantized-stage rules (compiler/quant.py): numpy only, no TVM.

* Q8_0 / Q4_1 quantizers equal the `gguf` package's implementation (which mirrors llama.cpp's
  reference C code) byte for byte, including round-half ties, 0.49999997, zero, constant and tiny
  blocks; and the real SmolLM2 file's own blocks are a fixed point: quantize(dequantize(blocks))
  == blocks, which llama.cpp's rounding rules must satisfy.
* Round trip with compiler/gguf.py's decoders; the relative error reported.
* Un-permuting Q/K rows on blocks is exact, through the real GGUF reader on a synthetic file.
* Which tensors a stage quantizes (frozen dense weights and embeddings only), the bundle's
  parameter arrays (blocks kept, float values quantized, errors reported), bad inputs.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from compiler import quant as Q
from compiler import quant_layout as QL
from compiler.adapters import is_adapter_trainable
from compiler.gguf import dequantize as gguf_dequantize
from compiler.gguf import unpermute_rope
from compiler.model_spec import ModelDims, StageSpec, stage_params
from edgert.errors import ConfigError, ModelError

gguf = pytest.importorskip("gguf")
GT = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_1": gguf.GGMLQuantizationType.Q4_1}
rng = np.random.default_rng(7)


def _hard_rows() -> np.ndarray:
    """Rows of 64 values that exercise the rounding rules."""
    rows = [rng.standard_normal(64) * s for s in (1e-7, 1e-5, 1e-3, 1.0, 1e3)]
    ties = np.arange(64, dtype=np.float32) / 4.0 - 8.0          # many exact .25/.5/.75 values
    rows += [ties, np.full(64, 0.5), np.zeros(64), np.full(64, -3.0)]
    r = rng.standard_normal(64)
    r[:32] = np.float32(0.49999997) * np.sign(rng.standard_normal(32))
    r[0] = 127.0
    rows.append(r)
    return np.asarray(rows, dtype=np.float32)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_1"])
def test_quantizers_equal_gguf_reference(fmt):
    for x in (_hard_rows(), rng.standard_normal((48, 384)).astype(np.float32)):
        ours = Q.quantize(x, fmt)
        theirs = gguf.quants.quantize(x, GT[fmt])
        assert ours.dtype == np.uint8 and ours.shape == Q.stored_shape(x.shape, fmt)
        np.testing.assert_array_equal(ours, theirs.reshape(ours.shape))


def test_smollm2_file_blocks_are_a_fixed_point():
    """Requantizing the dequantized weights of the real file gives its blocks back, byte for
    byte: the file was written by llama.cpp, so its rounding rules are ours."""
    from compiler.gguf import default_gguf_file

    r = gguf.GGUFReader(str(default_gguf_file()))
    seen = set()
    for t in r.tensors:
        fmt = t.tensor_type.name.lower()
        if fmt not in Q.BLOCK_BYTES or (fmt, t.name.split(".")[-2]) in seen:
            continue
        seen.add((fmt, t.name.split(".")[-2]))
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        raw = np.asarray(t.data, np.uint8).reshape(Q.stored_shape(shape, fmt))[:2048]
        again = Q.quantize(Q.dequantize(raw, fmt), fmt)     # (rows are independent)
        assert np.array_equal(again, raw), t.name
    assert {f for f, _ in seen} == {"q8_0", "q4_1"} and len(seen) >= 7


@pytest.mark.parametrize("fmt,lo,hi", [("q8_0", 2e-3, 8e-3), ("q4_1", 0.05, 0.12)])
def test_round_trip_and_reported_error(fmt, lo, hi):
    x = rng.standard_normal((64, 256)).astype(np.float32)
    qt = Q.QTensor.from_float(x, fmt)
    deq = gguf_dequantize(qt.blocks.reshape(-1), Q.GGUF_NAMES[fmt], x.shape)
    np.testing.assert_array_equal(qt.dequantize(), deq)
    err = Q.rel_error(x, qt.blocks, fmt)
    assert err == pytest.approx(np.linalg.norm(deq - x) / np.linalg.norm(x), rel=1e-6)
    assert lo < err < hi                        # ~N(0,1) weights: 8-bit / 4-bit + min
    assert Q.rel_error(deq, Q.quantize(deq, fmt), fmt) == 0.0   # blocks re-encode exactly
    assert qt.nbytes == x.size * Q.BLOCK_BYTES[fmt] // 32 and qt.size == x.size


def test_row_permutation_of_blocks_is_exact():
    for fmt in Q.BLOCK_BYTES:
        w = rng.standard_normal((9 * 64, 576)).astype(np.float32)
        b = Q.quantize(w, fmt)
        np.testing.assert_array_equal(Q.dequantize(unpermute_rope(b, 9), fmt),
                                      unpermute_rope(Q.dequantize(b, fmt), 9))


def test_cat_rows_keeps_blocks():
    a, b = (Q.QTensor.from_float(rng.standard_normal((n, 64)), "q4_1") for n in (3, 5))
    c = Q.cat_rows([a, b])
    assert isinstance(c, Q.QTensor) and c.shape == (8, 64)
    np.testing.assert_array_equal(c.dequantize(), np.concatenate([a.dequantize(),
                                                                  b.dequantize()]))
    mixed = Q.cat_rows([a, np.ones((2, 64), np.float32)])
    assert isinstance(mixed, np.ndarray) and mixed.shape == (5, 64)


def test_format_helpers_and_errors():
    assert Q.format_of_row(12 * 34, 384) == "q8_0" and Q.format_of_row(12 * 20, 384) == "q4_1"
    with pytest.raises(ModelError):
        Q.format_of_row(100, 384)
    with pytest.raises(ModelError, match="multiple of 32"):
        Q.quantize(np.zeros((2, 40), np.float32), "q8_0")
    with pytest.raises(ConfigError, match="base dtype"):
        StageSpec(0, 1, 0, 1, 2, 16, base_dtype="q5_0")
    with pytest.raises(ModelError, match="do not hold"):
        Q.QTensor("q8_0", (2, 64), np.zeros((2, 60), np.uint8))


# ---- which tensors a stage stores quantized -----------------------------------------------------
DIMS = ModelDims(vocab=100, hidden=64, layers=2, heads=2, ffn=128, max_pos=32, type_vocab=2,
                 eps=1e-12, hidden_dropout=0.1, attn_dropout=0.1, num_labels=2)


_TRAINS = {   # the trainable sets of compiler/peft.py's methods (TVM-free restatement)
    "lora": lambda n: ".lora_" in n or n.startswith("classifier."),
    "bitfit": lambda n: n.endswith(".bias") or n.startswith("classifier."),
    "adapter": is_adapter_trainable,
}


def _spec(method, base, dims=DIMS, **kw):
    spec = StageSpec(0, 1, 0, 2, 2, 16, base_dtype=base, **kw)
    return dataclasses.replace(spec, frozen=tuple(
        n for n, _ in stage_params(spec, dims) if not _TRAINS[method](n)))


def test_bert_stage_formats():
    assert QL.stage_formats(_spec("lora", "f32", lora_rank=2, lora_alpha=4.0), DIMS) == {}
    fm = QL.stage_formats(_spec("lora", "q4_1", lora_rank=2, lora_alpha=4.0), DIMS)
    dense = {f"encoder.layer.{i}.{n}" for i in range(2) for n in (
        "attention.self.qkv.weight", "attention.output.dense.weight",
        "intermediate.dense.weight", "output.dense.weight")}
    assert fm == {**{n: "q4_1" for n in dense}, "pooler.dense.weight": "q4_1",
                  "embeddings.word_embeddings.weight": "q8_0"}
    # full fine-tuning freezes nothing: nothing is quantized; BitFit/adapters keep their
    # trainable tensors (biases, LayerNorms, adapters, head) in float32
    assert QL.stage_formats(dataclasses.replace(StageSpec(0, 1, 0, 2, 2, 16), base_dtype="q8_0"),
                           DIMS) == {}
    for method, kw in (("bitfit", {}), ("adapter", {"adapter_size": 4})):
        fm = QL.stage_formats(_spec(method, "q8_0", **kw), DIMS)
        assert set(fm) == dense | {"pooler.dense.weight", "embeddings.word_embeddings.weight"}
    odd = dataclasses.replace(DIMS, hidden=48, heads=2)       # rows of 48: not whole blocks
    sp = _spec("lora", "q8_0", odd, lora_rank=2, lora_alpha=4.0)
    assert set(QL.stage_formats(sp, odd)) == {"encoder.layer.0.output.dense.weight",
                                             "encoder.layer.1.output.dense.weight"}


def test_decoder_stage_formats():
    from compiler.llama import DecoderSpec, LlamaConfig
    from compiler.llama import stage_params as dec_params

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1)
    last = DecoderSpec(1, 2, 2, 1, 8, index=1, num_stages=2, lora_rank=2)
    last = QL.with_base_dtype(dataclasses.replace(last, frozen=tuple(
        n for n, _ in dec_params(cfg, last) if ".lora_" not in n)), "q4_1")
    fm = QL.stage_formats(last, cfg)
    assert fm["lm_head.weight"] == "q8_0"         # the tied head's copy on the last stage
    assert {fm[f"model.layers.1.{n}"] for n in (
        "self_attn.qkv_proj.weight", "self_attn.o_proj.weight", "mlp.gate_up_proj.weight",
        "mlp.down_proj.weight")} == {"q4_1"}
    assert not any("norm" in n or "lora" in n for n in fm)
    metas = {n: (s, d) for n, s, d in QL.stored_params(last, cfg)}
    assert metas["model.layers.1.mlp.down_proj.weight"] == ((64, 96 // 32 * 20), "uint8")


def test_stage_param_bytes():
    sp = _spec("lora", "q4_1", lora_rank=2, lora_alpha=4.0)
    b = QL.stage_param_bytes(sp, DIMS)
    f = QL.stage_param_bytes(dataclasses.replace(sp, base_dtype="f32"), DIMS)
    assert b["float32"] == f["float32"] == f["stored"] == 4 * sum(
        int(np.prod(s)) for _, s in stage_params(sp, DIMS))
    q = QL.stage_formats(sp, DIMS)
    saved = sum(4 * int(np.prod(s)) - int(np.prod(Q.stored_shape(s, q[n])))
                for n, s in stage_params(sp, DIMS) if n in q)
    assert b["stored"] == f["float32"] - saved and b["trainable"] == f["trainable"] > 0


def test_bundle_params():
    spec = _spec("lora", "q8_0", lora_rank=2, lora_alpha=4.0)
    names = stage_params(spec, DIMS)
    w = {n: rng.standard_normal(s).astype(np.float32) for n, s in names}
    qkv = "encoder.layer.0.attention.self.qkv.weight"
    # float values are quantized (error reported), QTensors in the format kept as they are
    # (error 0), stored uint8 blocks passed through (error unknown), QTensors of another format
    # re-quantized, and float tensors stay float
    w[qkv] = Q.QTensor.from_float(w[qkv], "q8_0")
    ffn = "encoder.layer.1.intermediate.dense.weight"
    w[ffn] = Q.quantize(w[ffn], "q8_0")
    pool = "pooler.dense.weight"
    w4 = Q.QTensor.from_float(w[pool], "q4_1")
    w[pool] = w4
    arrays, metas, report = QL.bundle_params(spec, DIMS, names, w, "float32")
    assert np.array_equal(arrays[qkv], w[qkv].blocks) and report[qkv]["rel_error"] == 0.0
    assert np.array_equal(arrays[ffn], w[ffn]) and report[ffn]["rel_error"] is None
    assert report[pool]["format"] == "q8_0"
    assert report[pool]["rel_error"] == pytest.approx(
        Q.rel_error(w4.dequantize(), arrays[pool], "q8_0"))
    o = "encoder.layer.0.output.dense.weight"
    assert 1e-3 < report[o]["rel_error"] < 1e-2 and report[o]["shape"] == [64, 128]
    ln = "encoder.layer.0.output.LayerNorm.bias"
    assert arrays[ln].dtype == np.float32 and np.array_equal(arrays[ln], w[ln])
    meta = {n: (s, d) for n, s, d in metas}
    assert meta[o] == ((64, 4 * 34), "uint8") and meta[ln] == ((64,), "float32")
    with pytest.raises(ModelError, match="uint8 blocks of shape"):
        QL.bundle_params(spec, DIMS, names, {**w, o: np.zeros((64, 10), np.uint8)}, "float32")
    with pytest.raises(ModelError, match="expects"):
        QL.bundle_params(spec, DIMS, names, {**w, ln: np.zeros(3, np.float32)}, "float32")


# ---- a synthetic GGUF file with quantized tensors ---------------------------------------------
def test_gguf_blocks_reader_unpermutes_blocks(tmp_path, monkeypatch):
    from compiler import gguf as G
    from compiler.llama import LlamaConfig, param_shapes

    monkeypatch.setenv("EDGERT_CACHE", str(tmp_path / "cache"))
    cfg = LlamaConfig(vocab_size=12, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-5)
    from tests.unit.test_gguf import _gguf_name, _permute

    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "llama")
    for add, v in ((w.add_block_count, 1), (w.add_embedding_length, 64),
                   (w.add_feed_forward_length, 96), (w.add_head_count, 2),
                   (w.add_head_count_kv, 1), (w.add_layer_norm_rms_eps, 1e-5),
                   (w.add_context_length, 32), (w.add_vocab_size, 12)):
        add(v)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(["<|endoftext|>", "<|im_start|>"] + list("abcdefgh") + ["ab", "Ġ"])
    w.add_token_types([3, 3] + [1] * 10)
    w.add_token_merges(["a b"])
    for k, s in param_shapes(cfg).items():
        v = rng.standard_normal(s).astype(np.float32)
        if k.endswith("q_proj.weight"):
            v = _permute(v, 2)
        elif k.endswith("k_proj.weight"):
            v = _permute(v, 1)
        if len(s) == 2:
            qt = gguf.GGMLQuantizationType.Q4_1 if "layers" in k else gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(_gguf_name(k), gguf.quants.quantize(v, qt), raw_dtype=qt)
        else:
            w.add_tensor(_gguf_name(k), v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    floats = G.load_gguf(tmp_path / "q.gguf").params
    ck = G.load_gguf_blocks(tmp_path / "q.gguf")
    assert ck.params["model.embed_tokens.weight"].fmt == "q8_0"
    assert ck.params["model.layers.0.self_attn.q_proj.weight"].fmt == "q4_1"
    for k, v in ck.params.items():
        got = v.dequantize() if isinstance(v, Q.QTensor) else v
        np.testing.assert_array_equal(got, floats[k], err_msg=k)
