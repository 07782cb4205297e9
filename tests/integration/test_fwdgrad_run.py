"""Forward-gradient runs: events.jsonl, checkpoints and resume (control/fwdgrad_run.py).

Real MiniLM whole-model bundle (batch 2 x 16: the shape test_fwdgrad_boards.py and
test_cluster.py compile, so the session cache has it), real Rotten Tomatoes shards, two clients in
this process, the head as the trainable set, momentum and the cosine sampler on (so the momentum
buffer and the previous estimate must both survive a resume). The interrupted run is the command
line's, stopped with Ctrl-C (SIGINT) in the middle of its rounds, as a user would.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

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


ROUNDS = 6
# `edgert fwdgrad` with the settings of `run` above (the run's checkpoint records them all; the test
# checks that they are equal, so both runs are the same job).
CLI = ["fwdgrad", "--in-process", "--clients", "2", "--method", "head", "--batch", str(B),
       "--seq", str(T), "--rows", str(B), "--eval-examples", "4", "--k", "4", "--k-max", "4",
       "--pool", "2", "--eps", "1e-3", "--lr", "0.05", "--momentum", "0.9", "--seed", "0",
       "--checkpoint-every", "1", "--eval-every", "2", "--rounds", str(ROUNDS)]


def _cli(out) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "control", *CLI, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _interrupt_after_checkpoint(proc: subprocess.Popen, out, step: int, timeout: float = 600):
    """SIGINT (Ctrl-C) as soon as the run has written checkpoint `step`, i.e. mid-run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        log = out / "events.jsonl"
        if log.is_file() and any(e.kind == "checkpoint" and e.data["step"] >= step
                                 for e in EventLog.read(log)):
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.05)
    text, _ = proc.communicate(timeout=120)
    return proc.returncode, text


def test_ctrl_c_mid_run_then_the_same_command_resumes_bit_for_bit(run, tmp_path):
    """Ctrl-C interrupts `edgert fwdgrad` in the middle of its rounds (exit 130); the same command
    continues from the newest checkpoint and ends in the state of the uninterrupted run: theta,
    the momentum buffer, the previous estimate (the sampler's reference), round count, per-round
    losses and held-out metrics, bit for bit."""
    full, part = tmp_path / "full", tmp_path / "part"
    rep_full = run(full, ROUNDS, checkpoint_every=1, eval_every=2)

    rc, text = _interrupt_after_checkpoint(_cli(part), part, 2)
    assert rc == 130 and "interrupted" in text, text
    stopped_at = _state(part)[0].step
    assert 2 <= stopped_at < ROUNDS, f"the run was not interrupted mid-way ({stopped_at})"
    p = _cli(part)                                              # the same command again
    text, _ = p.communicate(timeout=600)
    assert p.returncode == 0, text
    ck_f, *want = _state(full)
    ck_p, *got = _state(part)
    assert ck_p.meta["settings"] == ck_f.meta["settings"]       # the same job as `run`
    assert ck_f.step == ck_p.step == ROUNDS
    for w, g in zip(want, got, strict=True):                    # theta, momentum, previous estimate
        assert w.dtype == np.float64 and np.all(np.isfinite(w))
        np.testing.assert_array_equal(g, w)
    theta0 = _theta0(run.bundle)
    assert want[0].shape == theta0.shape and not np.allclose(want[0], theta0)   # it trained
    rep = json.loads((part / "report.json").read_text())
    assert [x["loss"] for x in rep["log"]] == [x["loss"] for x in rep_full["log"]]
    assert rep["after"] == rep_full["after"] and rep["before"] == rep_full["before"]
    assert [c["round"] for c in rep["curve"]] == [0, 2, 4, 6]

    ev = EventLog.read(part / "events.jsonl")
    assert [e.data["reason"] for e in ev if e.kind == "plan"] == ["start", "resume"]
    steps = [e.data["step"] for e in ev if e.kind == "step"]
    resumed = steps.index(1, 1) if steps.count(1) > 1 else None
    assert resumed is None, f"the resume started over: {steps}"
    assert sorted(set(steps)) == list(range(1, ROUNDS + 1)) and steps[-1] == ROUNDS, steps
    for out in (full, part):
        ev = EventLog.read(out / "events.jsonl")
        assert all(e.data["k"] == 4 and e.data["loss"] > 0 for e in ev if e.kind == "step")
        assert ev[-1].kind == "state" and ev[-1].data["state"] == "finished"
        s = DashState()
        for e in ev:
            s = reduce(s, e)
        assert s.steps[-1] == ROUNDS and s.total_steps == ROUNDS and s.evals
    ev = EventLog.read(full / "events.jsonl")
    assert [e.data["step"] for e in ev if e.kind == "step"] == list(range(1, ROUNDS + 1))
    assert [e.data["step"] for e in ev if e.kind == "eval"] == [0, 2, 4, 6]
    assert [e.data["step"] for e in ev if e.kind == "checkpoint"] == list(range(1, ROUNDS + 1))

    # A corrupt newest checkpoint: `latest` falls back to the previous one with a warning, and the
    # run resumes from there (the last round) to the same values.
    f = part / "checkpoints" / f"step-{ROUNDS}" / "stage0.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    assert checkpoint.latest(part / "checkpoints").step == ROUNDS - 1
    run(part, ROUNDS, checkpoint_every=1, eval_every=2)
    ev = EventLog.read(part / "events.jsonl")
    assert any(e.kind == "alert" and "sha256" in e.data["text"] for e in ev)
    assert [e.data["step"] for e in ev if e.kind == "step"][-1:] == [ROUNDS]
    for w, g in zip(want, _state(part)[1:], strict=True):
        np.testing.assert_array_equal(g, w)

    with pytest.raises(ConfigError, match="other settings.*cfg"):   # same out, other lr
        run(part, ROUNDS + 2, lr=0.01, checkpoint_every=1)
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
