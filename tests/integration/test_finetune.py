"""The main job end to end: a short fine-tune on real data lowers held-out loss, and the exported
Hugging Face checkpoint computes what the compiled stages compute."""

from __future__ import annotations

import json

import numpy as np
import pytest

from control.job import finetune, rotten_tomatoes_batches
from control.local import LocalPipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory, minilm_dir):
    out = tmp_path_factory.mktemp("run")
    rep = finetune(out_dir=out, stages=2, steps=30, batch=8, micro_batches=2, seq=32, lr=2e-4,
                   eval_examples=128, seed=0)
    return out, rep


def test_short_finetune_lowers_heldout_loss(run):
    out, rep = run
    print(rep.summary())
    assert rep.after["loss"] < rep.before["loss"] - 0.02
    assert rep.after["accuracy"] > 0.6
    assert json.loads((out / "report.json").read_text())["steps"] == 30
    assert all(np.isfinite(rep.losses))


def test_exported_checkpoint_matches_compiled_model(run, minilm_dir):
    transformers = pytest.importorskip("transformers")
    import torch

    out, _ = run
    hf = transformers.BertForSequenceClassification.from_pretrained(out / "hf_model").eval()
    pipe = LocalPipeline(sorted((out / "bundles").glob("stage*")))
    pipe.load_state(_trained_params(out, pipe), None, 0)
    _, _, test = rotten_tomatoes_batches(minilm_dir / "tokenizer.json", 32, 8, 16, 0)
    b = test[0]
    _, logits = pipe.predict(b)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(b["input_ids"]), attention_mask=torch.tensor(b["attention_mask"]),
                 token_type_ids=torch.tensor(b["token_type_ids"])).logits.numpy()
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4)


def _trained_params(out, pipe):
    """The exported weights, converted back to the stages' internal (fused-QKV) names."""
    from safetensors.numpy import load_file

    from compiler.model_spec import fuse_qkv

    w = {k.removeprefix("bert."): v for k, v in load_file(str(out / "hf_model" / "model.safetensors")).items()}
    return fuse_qkv(w, 6)
