"""GGUF loading (compiler/gguf.py) and LLaMA config/params (compiler/llama.py): no TVM, no torch.

* our numpy dequantisers equal gguf's own `quants.dequantize` bit for bit on the real SmolLM2 file
  (Q8_0, Q4_1, F32 tensors) and on synthetic F16/BF16 data;
* the Q/K un-permutation inverts llama.cpp's permutation (convert_hf_to_gguf.py's formula);
* small synthetic GGUF files written with gguf.GGUFWriter: a tiny LLaMA loads (config, names,
  shapes, tokenizer), and wrong architecture / quantisation / missing tensors / missing files
  raise ModelError with a fix;
* stage parameter fusion and gradient splitting round-trip.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from compiler import gguf as G  # noqa: E402
from compiler.llama import (  # noqa: E402
    DecoderSpec, LlamaConfig, load_llama, param_shapes, split_grads, stage_arrays, stage_params,
)
from edgert.errors import ModelError  # noqa: E402

rng = np.random.default_rng(3)


def _permute(w, n_head):
    """llama.cpp convert_hf_to_gguf.py: HF rotate-half rows -> interleaved rows (the forward)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def test_dequantize_matches_gguf_on_the_real_file():
    r = gguf.GGUFReader(str(G.default_gguf_file()))
    seen = set()
    for t in r.tensors:
        kind = t.tensor_type.name
        if kind in seen:
            continue
        seen.add(kind)
        shape = tuple(reversed(t.shape.tolist()))
        ours = G.dequantize(t.data, kind, shape, t.name)
        ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        assert ours.dtype == np.float32 and ours.shape == shape
        np.testing.assert_array_equal(ours, ref)
    assert seen == {"Q8_0", "Q4_1", "F32"}


@pytest.mark.parametrize("kind", ["F16", "BF16"])
def test_dequantize_half_types(kind):
    x = rng.standard_normal((4, 8)).astype(np.float32)
    q = gguf.quants.quantize(x, gguf.GGMLQuantizationType[kind])
    ref = gguf.quants.dequantize(q, gguf.GGMLQuantizationType[kind]).reshape(4, 8)
    np.testing.assert_array_equal(G.dequantize(q, kind, (4, 8)), ref)


def test_unsupported_quantisation_is_a_model_error():
    with pytest.raises(ModelError, match="Q5_K is not supported.*llama.cpp"):
        G.dequantize(np.zeros(10, np.uint8), "Q5_K", (1, 256), "blk.0.attn_q.weight")
    with pytest.raises(ModelError, match="corrupt or truncated"):
        G.dequantize(np.zeros(10, np.float32), "F32", (3, 4), "x")


@pytest.mark.parametrize("n_head,d", [(9, 64), (3, 64), (2, 4)])
def test_unpermute_inverts_llama_cpp_permutation(n_head, d):
    w = rng.standard_normal((n_head * d, 5))
    np.testing.assert_array_equal(G.unpermute_rope(_permute(w, n_head), n_head), w)


# ---- synthetic GGUF files ---------------------------------------------------------------------
TINY = LlamaConfig(vocab_size=12, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0,
                   rms_norm_eps=1e-5)
_GG = {"input_layernorm.weight": "attn_norm", "self_attn.q_proj.weight": "attn_q",
       "self_attn.k_proj.weight": "attn_k", "self_attn.v_proj.weight": "attn_v",
       "self_attn.o_proj.weight": "attn_output", "post_attention_layernorm.weight": "ffn_norm",
       "mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up",
       "mlp.down_proj.weight": "ffn_down"}


def _gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}.{_GG[rest]}.weight"


def _write(path, cfg=TINY, arch="llama", drop=None):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_context_length(64)
    w.add_vocab_size(cfg.vocab_size)
    toks = ["<|endoftext|>", "<|im_start|>"] + list("abcdefgh") + ["ab", "Ġ"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(toks)
    w.add_token_types([3, 3] + [1] * 10)
    w.add_token_merges(["a b"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(0)
    hf = {k: rng.standard_normal(s).astype(np.float32) for k, s in param_shapes(cfg).items()}
    for k, v in hf.items():
        if k == drop:
            continue
        if k.endswith("q_proj.weight"):
            v = _permute(v, cfg.num_attention_heads)
        elif k.endswith("k_proj.weight"):
            v = _permute(v, cfg.num_key_value_heads)
        w.add_tensor(_gguf_name(k), v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def test_tiny_gguf_loads_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGERT_CACHE", str(tmp_path / "cache"))
    hf = _write(tmp_path / "tiny.gguf")
    ck = G.load_gguf(tmp_path / "tiny.gguf")
    for f in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
              "rope_theta", "tie_word_embeddings"):
        assert getattr(ck.config, f) == getattr(TINY, f), f
    assert ck.config.bos_token_id == 1 and ck.config.eos_token_id == 0
    assert set(ck.params) == set(hf)
    for k in hf:
        np.testing.assert_array_equal(ck.params[k], hf[k])   # F32 exact, permutation undone
    assert ck.path.parent == tmp_path / "cache" / "llama"
    cfg_json = json.loads((ck.path / "config.json").read_text())
    assert cfg_json["model_type"] == "llama" and cfg_json["num_key_value_heads"] == 2
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ck.tokenizer_file))
    assert tok.encode("ab").ids == [10]
    assert tok.encode("<|im_start|>a").ids == [1, 2]
    # the cached folder is a plain HF folder; a second load reuses it
    again = G.load_gguf(tmp_path / "tiny.gguf")
    assert again.path == ck.path
    np.testing.assert_array_equal(load_llama(ck.path).params["model.norm.weight"],
                                  hf["model.norm.weight"])


def test_bad_gguf_files_raise_model_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGERT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelError, match="does not exist"):
        G.load_gguf(tmp_path / "missing.gguf")
    _write(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(ModelError, match="architecture 'gpt2' is not supported"):
        G.load_gguf(tmp_path / "gpt2.gguf")
    _write(tmp_path / "cut.gguf", drop="model.layers.1.mlp.up_proj.weight")
    with pytest.raises(ModelError, match="missing"):
        G.load_gguf(tmp_path / "cut.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 7)
    with pytest.raises(ModelError, match="not a readable GGUF"):
        G.load_gguf(tmp_path / "junk.gguf")


def test_llama_config_errors():
    with pytest.raises(ModelError, match="multiple of num_key_value_heads"):
        LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ModelError, match="not a LLaMA-style decoder"):
        LlamaConfig.from_json({"model_type": "bert"})
    with pytest.raises(ModelError, match="missing key"):
        LlamaConfig.from_json({"model_type": "llama", "hidden_size": 8})
    with pytest.raises(ModelError, match="missing"):
        load_llama("/nonexistent/folder")


def test_stage_fusion_round_trip():
    hf = {k: rng.standard_normal(s).astype(np.float32) for k, s in param_shapes(TINY).items()}
    spec = DecoderSpec(1, 2, 2, 1, 4)      # last layer + head, tied head held as a copy
    names = [n for n, _ in stage_params(TINY, spec)]
    assert "lm_head.weight" in names and "model.embed_tokens.weight" not in names
    arrays = stage_arrays(TINY, spec, hf)
    back = split_grads(TINY, spec, arrays)
    for k, v in back.items():
        ref = hf["model.embed_tokens.weight"] if k == "lm_head.weight" else hf[k]
        np.testing.assert_array_equal(v, ref)
    with pytest.raises(ModelError, match="not inside"):
        DecoderSpec(1, 3, 2, 1, 4)
