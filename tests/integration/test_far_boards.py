"""FAR on board processes (issue 9): the switch happens in place on `edgert serve` processes.

Real all-MiniLM-L6-v2 on real Rotten Tomatoes batches of 2 x 16 tokens, 2 micro-batches per step,
split 0:3,3:6 over 2 boards (the dense stages are the ones test_faults.py and test_replan_live.py
compile: one compile per CI session), 6 steps, FAR at retention 0.4 after 2 priming steps.

The reference is the uninterrupted in-process FAR run (`control.far.train_far` in this process).
1. `train_far` on 2 boards: same plan, same losses, same final weights and AdamW moments (FAR
   layout, no moments for frozen parts); the export is the original dense layout (every tensor
   name and shape of the source checkpoint) and computes the compiled model's logits in
   `transformers`.
2. An unattended run (`control.run.Run`, FAR in its config) switches after priming, is stopped
   after a FAR checkpoint, resumes from it (the checkpoint records the plan) and ends with the
   reference's weights and moments; its Hugging Face export has the dense names.

Tolerance: as tests/integration/test_cluster.py (boards vs one process): rtol 1e-5 per value,
atol 1e-7 (measured: bit-identical); a lost step, a wrong plan or dropped learner moments fail by
far more (lr 2e-4).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from compiler.far import restore
from control.far import FarConfig, export_far, train_far
from control.job import load_model, make_job, rotten_tomatoes_batches
from control.local import OptimConfig

pytestmark = pytest.mark.slow
B, T, M, STEPS, SPLIT = 2, 16, 2, 6, "0:3,3:6"
FAR = FarConfig(retention=0.4, priming_fraction=0.34)       # round(0.34 * 6) = 2 priming steps
OPT = OptimConfig(lr=2e-4, warmup_steps=1, total_steps=STEPS)    # RunConfig's for 6 steps
RTOL, ATOL = 1e-5, 1e-7
KW = {"split": SPLIT, "seq": T, "seed": 0}


@pytest.fixture(scope="module")
def data(minilm_dir):
    from control.data import iterate_batches

    enc, y, test = rotten_tomatoes_batches(minilm_dir / "tokenizer.json", T, B, 8, 0)
    it = iterate_batches(enc, y, B, 0, 0)             # a run's data order (control.job.Job)
    batches = [next(it)[1].as_dict() for _ in range(STEPS * M)]
    return (lambda s: batches[(s - 1) * M:s * M]), test


@pytest.fixture(scope="module")
def model(minilm_dir):
    return load_model(minilm_dir, num_labels=2, head_seed=0)


@pytest.fixture(scope="module")
def job(model, data):
    """The job train_far steps: the data order and optimizer written out above."""
    j = make_job(model, steps=STEPS, batch=B, micro_batches=M, seq=T, lr=OPT.lr, eval_examples=8,
                 seed=0)
    assert j.opt == OPT
    for s in range(1, STEPS + 1):
        for got, want in zip(j.micro(s), data[0](s), strict=True):
            assert all(np.array_equal(got[k], want[k]) for k in want)
    return j


@pytest.fixture(scope="module")
def ref(model, job, tmp_path_factory):
    return train_far(model, FAR, job, STEPS, tmp_path_factory.mktemp("far_ref"), boards=False,
                     **KW)


def _close(got: dict, want: dict, what: str) -> float:
    assert sorted(got) == sorted(want), f"{what}: names differ"
    worst = 0.0
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=RTOL, atol=ATOL, err_msg=f"{what} {k}")
        worst = max(worst, float(np.max(np.abs(got[k] - v))))
    return worst


def test_far_on_boards_matches_in_process_and_exports_dense(tmp_path, model, data, job, ref,
                                                            minilm_dir):
    got = train_far(model, FAR, job, STEPS, tmp_path / "boards", boards=True, **KW)

    assert got["plan"] == ref["plan"] and got["plan"].learners == 624
    assert len(got["step_seconds"]["priming"]) == 2 and len(got["step_seconds"]["far"]) == 4
    np.testing.assert_allclose(got["losses"], ref["losses"], rtol=RTOL)
    assert [b["stage"] for b in got["boards"]] == [0, 1]
    params, ref_params = got["pipe"].params(), ref["pipe"].params()
    assert "encoder.layer.1.intermediate.frozen.weight" in params
    dw = _close(params, ref_params, "weights")
    dm = _close(got["pipe"].optimizer_state(), ref["pipe"].optimizer_state(), "moments")
    assert not any(".frozen." in k for k in got["pipe"].optimizer_state())
    print(f"boards vs in-process: losses {got['losses']}; max |dw| {dw:.1e}, |dm| {dm:.1e}")

    # The export: the source checkpoint's layout exactly, the learner rows where the plan says.
    from safetensors.numpy import load_file

    hf = export_far(tmp_path / "hf", model, params, got["plan"])
    out = load_file(str(hf / "model.safetensors"))
    src = load_file(str(minilm_dir / "model.safetensors"))
    src_shapes = {k.removeprefix("bert."): v.shape for k, v in src.items()
                  if not k.startswith(("cls.", "bert.pooler", "pooler")) and "position_ids" not in k}
    out_shapes = {k.removeprefix("bert."): v.shape for k, v in out.items()}
    assert {k: s for k, s in out_shapes.items() if k in src_shapes} == src_shapes
    dense = restore(params, got["plan"])
    for li in range(6):
        pre = f"bert.encoder.layer.{li}."
        learners = list(got["plan"].learner_nodes(li))
        np.testing.assert_array_equal(out[pre + "intermediate.dense.weight"][learners],
                                      params[f"encoder.layer.{li}.intermediate.learner.weight"])
        np.testing.assert_array_equal(out[pre + "output.dense.weight"],
                                      dense[f"encoder.layer.{li}.output.dense.weight"])

    transformers = pytest.importorskip("transformers")
    import torch

    net = transformers.BertForSequenceClassification.from_pretrained(hf).eval()
    b = data[1][0]
    _, logits = got["pipe"].predict(b)
    with torch.no_grad():
        want = net(**{k: torch.tensor(b[k]) for k in ("input_ids", "attention_mask",
                                                      "token_type_ids")}).logits.numpy()
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)


def test_far_run_switches_checkpoints_and_resumes(tmp_path, ref, model):
    from control.run import Run, RunConfig

    cfg = RunConfig(boards=2, split=SPLIT, steps=STEPS, batch=B, seq=T, micro_batches=M,
                    checkpoint_every=2, eval_examples=8, threads=1, timeout_s=60,
                    export_hf=False, far_retention=0.4, far_priming=0.34)
    assert cfg.warmup_steps == OPT.warmup_steps and cfg.lr == OPT.lr
    run = Run(cfg, tmp_path / "run")
    run.events.subscribe(lambda ev: run.stop() if ev.kind == "step" and ev.data["step"] == 4
                         else None)
    run.start()
    assert run.state == "stopped" and run.step == 4
    c4 = run.latest_checkpoint()
    assert c4.step == 4 and c4.meta["far"]["learners"] == 624      # FAR checkpoint with the plan
    assert "encoder.layer.0.intermediate.dense.weight" in c4.load()[0]          # dense on load
    assert "encoder.layer.0.intermediate.learner.weight" in c4.load(dense=False)[0]

    run = Run.resume(tmp_path / "run")
    assert run.state == "finished" and run.step == STEPS
    evs = [json.loads(x) for x in (run.dir / "events.jsonl").read_text().splitlines()]
    assert [e["reason"] for e in evs if e["kind"] == "plan"] == ["start", "far", "resume"]
    assert [e["step"] for e in evs if e["kind"] == "step"] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([e["loss"] for e in evs if e["kind"] == "step"], ref["losses"],
                               rtol=RTOL)
    params, opt = run.latest_checkpoint().load()
    dw = _close(params, restore(ref["pipe"].params(), ref["plan"]), "weights")
    _close(opt, ref["pipe"].optimizer_state(), "moments")
    hf = run.export_hf(tmp_path / "hf")                                    # original layout
    from safetensors.numpy import load_file

    keys = set(load_file(str(hf / "model.safetensors")))
    assert "bert.encoder.layer.5.intermediate.dense.weight" in keys
    assert not any("learner" in k or "frozen" in k for k in keys)
    print(f"run with FAR, stopped at 4 and resumed: max |dw| vs in-process {dw:.1e}")

    # classify() runs the run's FAR stages on its dense checkpoint (was: a name mismatch)
    from control.api import RunHandle
    from control.data import Tokenizer

    texts = ["a gripping, beautifully acted film", "dull and far too long", "fine"]
    probs = RunHandle(run).classify(texts)
    tok = Tokenizer(model.path / "tokenizer.json")
    want = []
    for i in range(0, 4, B):                                           # the compiled batch is B
        chunk = (texts + texts[-1:])[i:i + B]
        z = ref["pipe"].predict({**tok.encode(chunk, T), "labels": np.zeros(B, np.int64)})[1]
        want.append(z)
    z = np.concatenate(want)[:3].astype(np.float64)
    want = np.exp(z - z.max(1, keepdims=True))
    np.testing.assert_allclose(probs, want / want.sum(1, keepdims=True), rtol=1e-4, atol=1e-6)
