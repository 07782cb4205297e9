"""Validate the independent float64 reference (tests/reference_bert.py) against transformers.

Skipped when transformers is not installed (it is a test-only extra). Checks, on a real tokenized
Rotten Tomatoes batch (4 sentences, seq_len 32, with padding):

* loss and every gradient equal ``BertForSequenceClassification`` (float64, eval mode, eager
  attention) to 1e-10 relative (max-norm per tensor);
* an `export_hf` folder loads with ``from_pretrained`` and gives the reference's logits.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from compiler.export import export_hf  # noqa: E402
from compiler.hf import default_model_dir, init_head, load_bert  # noqa: E402
from control.data import Tokenizer, load_rotten_tomatoes  # noqa: E402
from tests import reference_bert as ref  # noqa: E402

REL = 1e-10


@pytest.fixture(scope="module")
def setup():
    d = default_model_dir()
    ck = load_bert(d)
    weights = {**ck.weights, **init_head(ck.config, 2, seed=0)}
    texts, labels = load_rotten_tomatoes()
    idx = [0, 5, 5000, 10_000]
    enc = Tokenizer(d).encode([texts[i] for i in idx], max_len=32)
    assert enc["attention_mask"].sum(1).min() < 32  # at least one padded row
    batch = {**enc, "labels": labels[idx]}
    return d, ck, weights, batch


def _hf_model(path, **kw):
    from transformers import BertForSequenceClassification

    model, info = BertForSequenceClassification.from_pretrained(
        str(path), dtype=torch.float64, attn_implementation="eager", output_loading_info=True, **kw
    )
    model.eval()
    return model, info


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def test_reference_matches_transformers(setup):
    d, ck, weights, batch = setup
    loss, grads = ref.loss_and_grads(weights, batch, config=ck.config)

    model, info = _hf_model(d, num_labels=2)
    assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias"}
    with torch.no_grad():
        model.classifier.weight.copy_(torch.from_numpy(weights["classifier.weight"]))
        model.classifier.bias.copy_(torch.from_numpy(weights["classifier.bias"]))
    out = model(
        **{
            k: torch.from_numpy(batch[k]) for k in ("input_ids", "attention_mask", "token_type_ids")
        },
        labels=torch.from_numpy(batch["labels"]),
    )
    out.loss.backward()

    assert abs(loss - out.loss.item()) <= REL * abs(out.loss.item())
    hf = {n.removeprefix("bert."): p.grad.numpy() for n, p in model.named_parameters()}
    assert hf.keys() == grads.keys()
    scale = max(np.abs(g).max() for g in hf.values())
    for name, g in grads.items():
        if name.endswith("attention.self.key.bias"):
            # softmax is shift-invariant along keys: this gradient is exactly 0 in exact arithmetic,
            # so both sides hold only rounding noise (~1e-20); compare against the global scale.
            assert np.abs(g).max() < 1e-14 * scale and np.abs(hf[name]).max() < 1e-14 * scale
            continue
        assert _rel(g, hf[name]) <= REL, (name, _rel(g, hf[name]))


def test_reference_dropout_masks_are_applied(setup):
    _, ck, weights, batch = setup
    base, _ = ref.loss_and_grads(weights, batch, config=ck.config)
    ones = {
        k: np.ones_like(v)
        for k, v in ref.make_dropout_masks(
            weights, 4, 32, 0.0, 0.0, seed=0, config=ck.config
        ).items()
    }
    same, _ = ref.loss_and_grads(weights, batch, dropout_masks=ones, config=ck.config)
    assert same == base
    masks = ref.make_dropout_masks(weights, 4, 32, 0.1, 0.1, seed=0, config=ck.config)
    assert set(masks) == set(ref.dropout_sites(6))
    dropped, _ = ref.loss_and_grads(weights, batch, dropout_masks=masks, config=ck.config)
    assert dropped != base


def test_export_loads_in_transformers(setup, tmp_path):
    d, ck, weights, batch = setup
    out = export_hf(
        tmp_path / "export", ck.config, weights, d, 2, id2label=["negative", "positive"]
    )
    model, info = _hf_model(out)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.id2label == {0: "negative", 1: "positive"}
    with torch.no_grad():
        logits = model(
            **{
                k: torch.from_numpy(batch[k])
                for k in ("input_ids", "attention_mask", "token_type_ids")
            }
        ).logits.numpy()
    expect = ref.logits(weights, batch, config=ck.config)
    assert _rel(logits, expect) <= REL
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok("hi")["input_ids"] == [101, 7632, 102]
