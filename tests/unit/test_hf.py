"""Tests of compiler/hf.py (checkpoint loading) and compiler/export.py (HF export), torch-free."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from compiler.export import MARKER, export_hf
from compiler.hf import (
    BertConfig,
    default_model_dir,
    expected_shapes,
    init_head,
    load_bert,
    pooler_shapes,
)
from edgert.errors import ConfigError, ModelError

MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

TINY = {
    "model_type": "bert",
    "vocab_size": 50,
    "hidden_size": 8,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 16,
    "max_position_embeddings": 16,
    "type_vocab_size": 2,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
}


def _tiny_checkpoint(
    folder: Path, prefix: str = "", pooler: bool = True, raw_config: dict | None = None, mutate=None
) -> Path:
    cfg = BertConfig.from_json(TINY)
    shapes = {**expected_shapes(cfg), **(pooler_shapes(cfg) if pooler else {})}
    rng = np.random.default_rng(0)
    tensors = {prefix + k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    tensors[prefix + "embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
    if mutate:
        mutate(tensors)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(raw_config or TINY))
    return folder


@pytest.fixture(scope="module")
def minilm():
    return load_bert(default_model_dir())


def test_load_minilm(minilm):
    c = minilm.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads) == (6, 384, 12)
    assert (c.intermediate_size, c.vocab_size) == (1536, 30522)
    assert minilm.num_params == 22_713_216  # 22.7M, position_ids buffer dropped
    assert "embeddings.position_ids" not in minilm.weights
    assert not any(k.startswith("bert.") for k in minilm.weights)
    assert minilm.weights["encoder.layer.0.attention.self.query.weight"].shape == (384, 384)
    assert minilm.weights["pooler.dense.weight"].shape == (384, 384)
    for w in minilm.weights.values():
        assert w.dtype == np.float32 and w.flags.c_contiguous
    assert minilm.sha256 == MINILM_SHA256
    assert minilm.tokenizer_file is not None and minilm.tokenizer_file.name == "tokenizer.json"


def test_prefixed_and_unprefixed_keys_agree(tmp_path):
    a = load_bert(_tiny_checkpoint(tmp_path / "a"))
    b = load_bert(_tiny_checkpoint(tmp_path / "b", prefix="bert."))
    assert a.weights.keys() == b.weights.keys()
    for k in a.weights:
        np.testing.assert_array_equal(a.weights[k], b.weights[k])


def test_corrupt_safetensors(tmp_path):
    src = default_model_dir()
    dst = tmp_path / "ck"
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    with open(src / "model.safetensors", "rb") as f:
        (dst / "model.safetensors").write_bytes(f.read(1_000_000))
    with pytest.raises(ModelError, match="corrupt or truncated.*reinstall"):
        load_bert(dst)


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(ModelError, match="does not exist.*scripts/setup.sh"):
        load_bert(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="missing config.json"):
        load_bert(tmp_path / "empty")
    ck = _tiny_checkpoint(tmp_path / "ck")
    (ck / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="missing model.safetensors.*scripts/setup.sh"):
        load_bert(ck)


def test_unsupported_architecture(tmp_path):
    ck = _tiny_checkpoint(tmp_path / "gpt", raw_config={**TINY, "model_type": "gpt2"})
    with pytest.raises(ModelError, match="model_type 'gpt2' is not supported.*bert"):
        load_bert(ck)
    ck = _tiny_checkpoint(tmp_path / "act", raw_config={**TINY, "hidden_act": "relu"})
    with pytest.raises(ModelError, match="hidden_act 'relu' is not supported.*gelu"):
        load_bert(ck)
    with pytest.raises(ModelError, match="position_embedding_type"):
        BertConfig.from_json({**TINY, "position_embedding_type": "relative_key"})
    with pytest.raises(ModelError, match="not divisible"):
        BertConfig.from_json({**TINY, "num_attention_heads": 3})


def test_wrong_shape(tmp_path):
    def bad(t):
        t["encoder.layer.1.intermediate.dense.weight"] = np.zeros((16, 9), np.float32)

    with pytest.raises(
        ModelError, match=r"encoder.layer.1.intermediate.dense.weight.*\(16, 9\).*\(16, 8\)"
    ):
        load_bert(_tiny_checkpoint(tmp_path / "ck", mutate=bad))


def test_missing_tensor(tmp_path):
    def drop(t):
        del t["encoder.layer.1.output.LayerNorm.bias"]

    with pytest.raises(ModelError, match="missing 1 tensor.*encoder.layer.1.output.LayerNorm.bias"):
        load_bert(_tiny_checkpoint(tmp_path / "ck", mutate=drop))


def test_init_head():
    cfg = BertConfig.from_json(TINY)
    h1, h2 = init_head(cfg, 3, seed=7), init_head(cfg, 3, seed=7)
    assert set(h1) == {"classifier.weight", "classifier.bias"}
    assert h1["classifier.weight"].shape == (3, 8) and h1["classifier.weight"].dtype == np.float32
    np.testing.assert_array_equal(h1["classifier.weight"], h2["classifier.weight"])
    assert not h1["classifier.bias"].any()
    big = init_head(BertConfig.from_json({**TINY, "hidden_size": 512}), 200, seed=0)
    assert abs(big["classifier.weight"].std() - 0.02) < 1e-3
    with pytest.raises(ConfigError):
        init_head(cfg, 0, seed=0)


def test_init_head_creates_missing_pooler(tmp_path):
    ck = load_bert(_tiny_checkpoint(tmp_path / "ck", pooler=False))
    assert "pooler.dense.weight" not in ck.weights
    head = init_head(ck.config, 2, seed=0, weights=ck.weights)
    assert head["pooler.dense.weight"].shape == (8, 8) and not head["pooler.dense.bias"].any()


def test_export_layout_and_overwrite_rules(tmp_path):
    src = _tiny_checkpoint(tmp_path / "src")
    (src / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    ck = load_bert(src)
    w = {**ck.weights, **init_head(ck.config, 2, seed=0)}
    out = export_hf(tmp_path / "out", ck.config, w, src, 2, id2label=["neg", "pos"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["BertForSequenceClassification"]
    assert cfg["id2label"] == {"0": "neg", "1": "pos"} and cfg["label2id"] == {"neg": 0, "pos": 1}
    assert cfg["problem_type"] == "single_label_classification" and cfg["hidden_size"] == 8
    st = load_file(str(out / "model.safetensors"))
    assert "bert.encoder.layer.0.attention.self.query.weight" in st
    assert "classifier.weight" in st and "bert.pooler.dense.weight" in st
    assert (out / "vocab.txt").is_file() and (out / MARKER).is_file()
    export_hf(out, ck.config, w, src, 2)  # a previous export may be overwritten
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a previous edgert export"):
        export_hf(other, ck.config, w, src, 2)
    with pytest.raises(ModelError, match="classifier.weight"):
        export_hf(tmp_path / "o2", ck.config, ck.weights, src, 2)
    with pytest.raises(ConfigError, match="id2label"):
        export_hf(tmp_path / "o3", ck.config, w, src, 2, id2label=["a"])
