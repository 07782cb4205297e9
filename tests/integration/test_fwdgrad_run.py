"""Forward-gradient runs: events.jsonl, checkpoints and resume (control/fwdgrad_run.py).

Real MiniLM whole-model bundle (batch 2 x 16: the shape test_fwdgrad_boards.py and
test_cluster.py compile, so the session cache has it), real Rotten Tomatoes shards, two clients in
this process, the head as the trainable set, momentum and the cosine sampler on (so the momentum
buffer and the previous estimate must both survive a resume).
"""

from __future__ import annotations

import numpy as np
import pytest

from control import checkpoint
from control.dashboard_state import DashState, reduce
from control.events import EventLog
from control.federated import fwdgrad_finetune
from control.fwdgrad import FwdGradConfig
from edgert.errors import ConfigError

pytestmark = pytest.mark.slow
B, T = 2, 16


@pytest.fixture(scope="module")
def run(minilm_dir, whole_model_bundle):
    bundle = whole_model_bundle     # batch B x T (tests/conftest.py)

    def go(out, rounds, lr=0.05, **kw):
        cfg = FwdGradConfig(lr=lr, momentum=0.9, k_init=4, k_max=4, pool_factor=2, eps=1e-3,
                            seed=0)
        return fwdgrad_finetune(model_dir=minilm_dir, out_dir=out, clients=2, rounds=rounds,
                                method="head", batch=B, seq=T, rows_per_round=B, eval_examples=4,
                                cfg=cfg, boards=False, bundle=bundle, progress=False, **kw)
    go.bundle = bundle
    return go


def _state(out):
    ck = checkpoint.latest(out / "checkpoints")
    params, opt = ck.load(dense=False)
    return ck, params["theta"], opt["m/theta"], opt["v/theta"]


def test_resume_equals_uninterrupted_run(run, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    rep_full = run(full, 4, checkpoint_every=1, eval_every=2)
    run(part, 2, checkpoint_every=1, eval_every=2)              # "interrupted" after round 2
    assert _state(part)[0].step == 2
    rep = run(part, 4, checkpoint_every=1, eval_every=2)        # resumes: rounds 3 and 4 only
    ck_f, *want = _state(full)
    ck_p, *got = _state(part)
    assert ck_f.step == ck_p.step == 4
    for w, g in zip(want, got, strict=True):                    # theta, momentum, previous estimate
        assert w.dtype == np.float64 and np.all(np.isfinite(w))
        np.testing.assert_array_equal(g, w)
    theta0 = _theta0(run.bundle)
    assert want[0].shape == theta0.shape and not np.allclose(want[0], theta0)   # it trained
    assert [x["loss"] for x in rep["log"]] == [x["loss"] for x in rep_full["log"]]
    assert rep["after"] == rep_full["after"] and rep["before"] == rep_full["before"]
    assert [c["round"] for c in rep["curve"]] == [0, 2, 4]

    for out in (full, part):
        ev = EventLog.read(out / "events.jsonl")
        steps = [e.data["step"] for e in ev if e.kind == "step"]
        assert steps == [1, 2, 3, 4], steps                      # one step event per round
        assert all(e.data["k"] == 4 and e.data["loss"] > 0 for e in ev if e.kind == "step")
        assert [e.data["step"] for e in ev if e.kind == "eval"] == [0, 2, 4]
        assert [e.data["step"] for e in ev if e.kind == "checkpoint"] == [1, 2, 3, 4]
        assert ev[-1].kind == "state" and ev[-1].data["state"] == "finished"
        s = DashState()
        for e in ev:
            s = reduce(s, e)
        assert s.steps == [1, 2, 3, 4] and s.total_steps == 4 and len(s.evals) == 3
    plans = [e.data["reason"] for e in EventLog.read(part / "events.jsonl") if e.kind == "plan"]
    assert plans == ["start", "resume"]

    # A corrupt newest checkpoint: `latest` falls back to the previous one with a warning, and the
    # run resumes from there (round 3) to the same values.
    f = part / "checkpoints" / "step-4" / "stage0.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    assert checkpoint.latest(part / "checkpoints").step == 3
    run(part, 4, checkpoint_every=1, eval_every=2)
    ev = EventLog.read(part / "events.jsonl")
    assert any(e.kind == "alert" and "sha256" in e.data["text"] for e in ev)
    assert [e.data["step"] for e in ev if e.kind == "step"][-1:] == [4]
    for w, g in zip(want, _state(part)[1:], strict=True):
        np.testing.assert_array_equal(g, w)

    with pytest.raises(ConfigError, match="other settings.*cfg"):   # same out, other lr
        run(part, 6, lr=0.01, checkpoint_every=1)
    assert (part / "report.html").is_file() and (part / "metrics.json").is_file()

    run(part, 1, checkpoint_every=1, resume=False)      # afresh: old checkpoints/events are gone
    assert checkpoint.list_steps(part / "checkpoints") == [1]
    assert [e.data["step"] for e in EventLog.read(part / "events.jsonl") if e.kind == "step"] == [1]



def _theta0(bundle):
    """The trainable (head) values as deployed, flat float64 in the run's order."""
    from control.fwdgrad import flatten, trainable_names
    from edgert.runtime import TvmStage

    base = TvmStage.load(bundle).params_numpy()
    return flatten(base, trainable_names(list(base), "head"))
