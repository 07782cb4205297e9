"""The user-facing commands: `edgert grads` (a user's own check of the compiled model) and errors."""

from __future__ import annotations

import numpy as np
import pytest

from control.cli import main
from control.data import save_batch

from tests import reference_bert as ref

pytestmark = pytest.mark.slow


def test_grads_command_matches_reference(tmp_path, real_batch, minilm_dir, capsys):
    b = real_batch(2, 16, offset=5)
    save_batch(tmp_path / "batch.npz", b)
    rc = main(["grads", "--stages", "2", "--batch", str(tmp_path / "batch.npz"),
               "--out", str(tmp_path / "out.npz"), "--work", str(tmp_path / "work")])
    assert rc == 0, capsys.readouterr().err
    out = dict(np.load(tmp_path / "out.npz"))
    # every trainable parameter by its Hugging Face name; the new head's weights as param/
    assert "grad/encoder.layer.0.attention.self.query.weight" in out
    assert "grad/classifier.weight" in out and "param/classifier.weight" in out
    assert "param/encoder.layer.0.attention.self.query.weight" not in out  # from the checkpoint
    from compiler.hf import load_bert

    ck = load_bert(minilm_dir)
    weights = {**ck.weights, "classifier.weight": out["param/classifier.weight"],
               "classifier.bias": out["param/classifier.bias"]}
    loss, grads = ref.loss_and_grads(weights, b, config=ck.config)
    assert abs(float(out["loss"]) - loss) <= 1e-5 * loss
    for name in ("encoder.layer.0.attention.self.query.weight", "embeddings.word_embeddings.weight",
                 "classifier.weight", "encoder.layer.5.output.dense.bias"):
        g = out[f"grad/{name}"]
        assert np.linalg.norm(g - grads[name]) <= 1e-4 * np.linalg.norm(grads[name]), name


def test_grads_command_rejects_bad_batch(tmp_path, real_batch, capsys):
    b = real_batch(2, 16)
    np.savez(tmp_path / "bad.npz", input_ids=b["input_ids"].astype(np.float32),
             attention_mask=b["attention_mask"], labels=b["labels"])
    rc = main(["grads", "--stages", "2", "--batch", str(tmp_path / "bad.npz"),
               "--out", str(tmp_path / "out.npz")])
    err = capsys.readouterr().err
    assert rc == 2 and "input_ids" in err and "int64" in err
    np.savez(tmp_path / "short.npz", input_ids=b["input_ids"], attention_mask=b["attention_mask"][:, :8],
             labels=b["labels"])
    rc = main(["grads", "--batch", str(tmp_path / "short.npz"), "--out", str(tmp_path / "o.npz")])
    err = capsys.readouterr().err
    assert rc == 2 and "attention_mask" in err
    rc = main(["grads", "--batch", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "o.npz")])
    assert rc == 2 and "missing.npz" in capsys.readouterr().err


def test_bad_model_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    rc = main(["compile", "--model", str(tmp_path), "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert rc == 2 and "gpt2" in err


def test_stage_refuses_wrong_batch_shape(tmp_path, real_batch, minilm_dir):
    from control.job import compile_bundles, load_model
    from control.local import LocalPipeline
    from edgert.errors import ArtifactError

    paths = compile_bundles(load_model(minilm_dir), tmp_path, stages=1, batch=2, seq=16, progress=False)
    pipe = LocalPipeline(paths)
    with pytest.raises(ArtifactError, match=r"input_ids has shape \(3, 16\).*compiled for \(2, 16\)"):
        pipe.grads(real_batch(3, 16))


def test_fwdgrad_command_runs_clients_on_boards(tmp_path, capsys):
    """`edgert fwdgrad` end to end on 2 board processes (the whole-model bundle of
    test_fwdgrad_boards.py's shape, so the session's compile cache has it): 2 rounds of k = 4
    perturbations each; the report logs each round, the boards' memory and a scalar uplink."""
    import json

    rc = main(["fwdgrad", "--clients", "2", "--rounds", "2", "--k", "4", "--batch", "2",
               "--seq", "16", "--eval-examples", "8", "--method", "head",
               "--out", str(tmp_path / "fg")])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "fg" / "report.json").read_text())
    assert [r["round"] for r in rep["log"]] == [0, 1] and all(r["k"] == 4 for r in rep["log"])
    assert all(np.isfinite(r["loss"]) for r in rep["log"])
    assert len(rep["peak_rss_mib"]) == 2 and all(m > 0 for m in rep["peak_rss_mib"])
    # uplink: k scalars per client and round, far below the 770 head values as float32 tensors
    assert all(r["bytes_up"] < 2 * 4 * rep["trainable"] for r in rep["log"])
    assert {"loss", "accuracy"} <= rep["after"].keys()
