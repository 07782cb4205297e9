"""The main job end to end: a short fine-tune on real data lowers held-out loss, and the exported
Hugging Face checkpoint computes what the trained compiled stages compute.

The export check reads `hf_model/` with a reader that shares no code with edgert (transformers'
BertForSequenceClassification when installed, else the float64 reference tests/reference_bert.py
loading the folder's config.json and model.safetensors itself; the two readers are checked against
each other when both exist) and compares the held-out loss and accuracy it computes with
`rep.after`: the held-out metrics finetune measured with its compiled stages on the weights the
boards returned, in memory, before anything was exported. An export of the untrained weights, or of
weights under swapped names, fails it (`test_export_check_catches_*`).

Tolerance: the mean held-out cross-entropy within 5e-7 relative (observed: transformers float32
1.3e-8, float64 reference 8.8e-9; the untrained export is off by 1.5e-1, one layer's query and key
swapped by 1.7e-2), the accuracy equal (no held-out prediction is within float32 rounding of a
tie). The two readers' logits agree to 1e-6 (float32 against float64; observed 3.4e-8).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from control.job import finetune, rotten_tomatoes_batches
from tests import reference_bert as ref

pytestmark = pytest.mark.slow
SEQ, BATCH, EVAL = 32, 8, 128
LOSS_RTOL = 5e-7


@pytest.fixture(scope="module")
def run(tmp_path_factory, minilm_dir):
    out = tmp_path_factory.mktemp("run")
    rep = finetune(out_dir=out, stages=2, steps=30, batch=BATCH, micro_batches=2, seq=SEQ,
                   lr=2e-4, eval_examples=EVAL, seed=0)
    return out, rep


@pytest.fixture(scope="module")
def held_out(minilm_dir):
    """The held-out batches finetune evaluated (same tokenizer, shapes, count and seed)."""
    return rotten_tomatoes_batches(minilm_dir / "tokenizer.json", SEQ, BATCH, EVAL, 0)[2]


def test_short_finetune_lowers_heldout_loss(run):
    out, rep = run
    print(rep.summary())
    assert rep.after["loss"] < rep.before["loss"] - 0.02
    assert rep.after["accuracy"] > 0.6
    assert json.loads((out / "report.json").read_text())["steps"] == 30
    assert all(np.isfinite(rep.losses))


# ---- independent readers of an exported folder: batch -> float64 logits [B, 2] ---------------

def _transformers_reader(folder):
    transformers = pytest.importorskip("transformers")
    import torch

    hf = transformers.BertForSequenceClassification.from_pretrained(folder).eval()

    def logits(b):
        with torch.no_grad():
            return hf(input_ids=torch.tensor(b["input_ids"]),
                      attention_mask=torch.tensor(b["attention_mask"]),
                      token_type_ids=torch.tensor(b["token_type_ids"])).logits.double().numpy()
    return logits


def _float64_reader(folder):
    """tests/reference_bert.py on the folder's own files: HF key names minus the `bert.` prefix
    are the reference's canonical names."""
    import torch
    from safetensors.numpy import load_file

    config = json.loads((folder / "config.json").read_text())
    weights = {k.removeprefix("bert."): torch.tensor(v, dtype=torch.float64)
               for k, v in load_file(str(folder / "model.safetensors")).items()
               if k != "bert.embeddings.position_ids"}

    def logits(b):
        with torch.no_grad():
            return ref.logits_torch(weights, b, config=config).numpy()
    return logits


READERS = {"transformers": _transformers_reader, "float64 reference": _float64_reader}


def _one_reader() -> str:
    """transformers when installed (the faster), else the float64 reference."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return "float64 reference"
    return "transformers"


def _check_export(folder, reader: str, batches, after: dict) -> float:
    """The folder's held-out loss and accuracy, by `reader`, equal `after`; returns the loss's
    relative difference."""
    logits = READERS[reader](folder)
    losses, correct, n = [], 0, 0
    for b in batches:                # as LocalPipeline.evaluate: mean of the batch mean losses
        z = logits(b)
        top = z.max(1, keepdims=True)
        logp = z - top - np.log(np.exp(z - top).sum(1, keepdims=True))
        losses.append(-logp[np.arange(len(z)), b["labels"]].mean())
        correct += int((z.argmax(1) == b["labels"]).sum())
        n += len(z)
    loss, acc = float(np.mean(losses)), correct / n
    rel = abs(loss - after["loss"]) / after["loss"]
    print(f"{reader} on {folder.name}: held-out loss {loss:.7f} vs compiled {after['loss']:.7f} "
          f"(relative {rel:.1e}), accuracy {acc:.4f} vs {after['accuracy']:.4f}")
    assert rel <= LOSS_RTOL, f"held-out loss {loss} of the export, {after['loss']} compiled"
    assert acc == after["accuracy"]
    return rel


def test_exported_checkpoint_matches_compiled_model(run, held_out):
    out, rep = run
    assert sum(len(b["labels"]) for b in held_out) == rep.after["examples"] == EVAL
    _check_export(out / "hf_model", _one_reader(), held_out, rep.after)


def test_the_two_export_readers_agree(run, held_out):
    """The float64 reader (used where transformers is not installed) gives transformers' logits
    on the export, to float32 rounding (observed max |difference| 3.4e-8)."""
    pytest.importorskip("transformers")
    out, _ = run
    a, b = (READERS[r](out / "hf_model") for r in ("transformers", "float64 reference"))
    for batch in held_out[:2]:
        np.testing.assert_allclose(a(batch), b(batch), rtol=0, atol=1e-6)


def test_export_check_catches_untrained_weights(run, held_out, minilm_dir, tmp_path):
    """The test of the test: the same check on an export of the untrained model (the new head,
    the pretrained encoder) must fail."""
    from compiler.export import export_hf
    from compiler.model_spec import split_qkv
    from control.job import load_model

    _, rep = run
    model = load_model(minilm_dir, num_labels=2, head_seed=0)
    folder = export_hf(tmp_path / "untrained", model.config, split_qkv(model.weights), model.path,
                       2, id2label=["negative", "positive"])
    with pytest.raises(AssertionError, match="held-out loss"):
        _check_export(folder, _one_reader(), held_out, rep.after)


def test_export_check_catches_swapped_names(run, held_out, tmp_path):
    """The test of the test: the trained export with one layer's query and key weights swapped
    (a name-mapping bug) must fail."""
    from safetensors.numpy import load_file, save_file

    out, rep = run
    folder = tmp_path / "swapped"
    shutil.copytree(out / "hf_model", folder)
    w = load_file(str(folder / "model.safetensors"))
    q, k = (f"bert.encoder.layer.3.attention.self.{x}.weight" for x in ("query", "key"))
    w[q], w[k] = w[k], w[q]
    save_file(w, str(folder / "model.safetensors"))
    with pytest.raises(AssertionError, match="held-out loss"):
        _check_export(folder, _one_reader(), held_out, rep.after)
