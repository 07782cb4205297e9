"""Stage partitioning and the fused-QKV parameter mapping (pure, no TVM)."""

from __future__ import annotations

import numpy as np
import pytest

from compiler.model_spec import ModelDims, fuse_qkv, parse_split, split_qkv, stage_params, stage_specs
from edgert.errors import ConfigError

DIMS = ModelDims(vocab=100, hidden=8, layers=6, heads=2, ffn=16, max_pos=32, type_vocab=2,
                 eps=1e-12, hidden_dropout=0.1, attn_dropout=0.1, num_labels=2)


@pytest.mark.parametrize("k, want", [(1, [(0, 6)]), (2, [(0, 3), (3, 6)]), (3, [(0, 2), (2, 4), (4, 6)]),
                                     (4, [(0, 1), (1, 2), (2, 4), (4, 6)])])
def test_even_split(k, want):
    assert parse_split(None, k, 6) == want


def test_explicit_split():
    assert parse_split("0:1,1:6", None, 6) == [(0, 1), (1, 6)]


@pytest.mark.parametrize("text", ["0:2,3:6", "0:2,2:5", "1:6", "0:3,3:3,3:6", "a:b", "0-3"])
def test_bad_split_says_how(text):
    with pytest.raises(ConfigError, match="split"):
        parse_split(text, None, 6)


def test_bad_stage_count():
    with pytest.raises(ConfigError, match="between 1 and 6"):
        parse_split(None, 7, 6)


def test_stage_params_cover_model_exactly_once():
    specs = stage_specs(parse_split(None, 3, 6), batch=2, seq=4)
    names = [n for s in specs for n, _ in stage_params(s, DIMS)]
    assert len(names) == len(set(names))
    assert names[0] == "embeddings.word_embeddings.weight" and names[-1] == "classifier.bias"
    assert sum(n.endswith("qkv.weight") for n in names) == 6


def test_qkv_fuse_split_roundtrip():
    rng = np.random.default_rng(0)
    w = {}
    for li in range(2):
        for q in ("query", "key", "value"):
            w[f"encoder.layer.{li}.attention.self.{q}.weight"] = rng.standard_normal((8, 8))
            w[f"encoder.layer.{li}.attention.self.{q}.bias"] = rng.standard_normal(8)
    w["other"] = rng.standard_normal(3)
    f = fuse_qkv(w, 2)
    assert f["encoder.layer.1.attention.self.qkv.weight"].shape == (24, 8)
    np.testing.assert_array_equal(f["encoder.layer.1.attention.self.qkv.weight"][8:16],
                                  w["encoder.layer.1.attention.self.key.weight"])
    back = split_qkv(f)
    assert back.keys() == w.keys()
    for k in w:
        np.testing.assert_array_equal(back[k], w[k])


def test_stage_params_names_are_unique_with_lora_and_far():
    """Every parameter appears once (LoRA factors were once added once per layer tensor)."""
    from compiler.model_spec import LORA_PARAMS, StageSpec, stage_params

    spec = StageSpec(index=0, num_stages=1, first=0, last=2, batch=2, seq=8, lora_rank=4)
    names = [n for n, _ in stage_params(spec, DIMS)]
    assert len(names) == len(set(names))
    for li in range(2):
        for ln, _ in LORA_PARAMS:
            assert names.count(f"encoder.layer.{li}.{ln}") == 1
