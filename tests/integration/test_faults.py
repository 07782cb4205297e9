"""Fault tolerance of unattended runs (issue 6) and the run-directory CLI (issue 7).

Every run here is 6 steps of real MiniLM training on Rotten Tomatoes (batch 2 x 16 tokens, 2
micro-batches per step, split 0:3,3:6 on 2 local boards, a checkpoint every 2 steps), and every
interrupted run must end in the state of one uninterrupted reference: the same 6 steps in one
process (LocalPipeline), with the data order written out here independently (step s takes the
2 batches at positions 2(s-1), 2(s-1)+1 of iterate_batches' epoch-0 order).

The learning rate warms up over all 6 steps (warmup = steps: lr 1/6, 2/6, .., 6/6 x 1e-4), so
every step moves the weights, and the comparison covers weights, AdamW moments and the step
counter (tests/run_util.py [Note: the last step must count]).

Tolerance: none. A recovered run that continues on one board runs stage kernels compiled for
another split, and the boards run 1 thread where the reference runs 2; neither changes a float32
operation or its order (measured: bit-identical), so the states must be equal. A wrong step, a
skipped or doubled batch, or lost AdamW moments fail it; `test_the_comparison_sees_the_last_step`
shows that even the state one step short of the end fails it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from control.run import Run, RunConfig
from tests.run_util import TrainState, assert_same_state, uninterrupted_state

pytestmark = pytest.mark.slow
CFG = RunConfig(boards=2, split="0:3,3:6", steps=6, batch=2, seq=16, micro_batches=2, lr=1e-4,
                warmup=6, checkpoint_every=2, eval_examples=8, timeout_s=60)


@pytest.fixture(scope="module")
def references(minilm_dir, build_root):
    """(final state, state one step before) of the uninterrupted run, in one process."""
    return uninterrupted_state(CFG, minilm_dir, build_root / "faults_k2")


@pytest.fixture(scope="module")
def reference(references):
    return references[0]


def test_the_comparison_sees_the_last_step(references):
    """The test of the tests below: a run one step short fails the comparison, in its weights
    alone too (with the default schedule, whose last lr is 0, the weights would be equal)."""
    final, before_last = references
    with pytest.raises(AssertionError, match="optimizer step 5, want 6"):
        assert_same_state(before_last, final)
    short = TrainState(before_last.params, final.opt, final.step)   # only the weights are short
    with pytest.raises(AssertionError, match="weight tensors differ"):
        assert_same_state(short, final)


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def test_kill_9_a_board_mid_run_recovers_by_itself(tmp_path, reference):
    run = Run(CFG, tmp_path / "run")
    killed: list[int] = []

    def killer(ev) -> None:        # a few tenths of a second into step 4 (after checkpoint 2)
        if ev.kind == "step" and ev.data["step"] == 3 and not killed:
            pid = run.cluster.boards[0].proc.pid
            killed.append(pid)
            threading.Timer(0.2, os.kill, (pid, signal.SIGKILL)).start()

    paused = threading.Event()

    def pauser(ev) -> None:        # pause / resume from another thread, as a dashboard would
        if ev.kind == "step" and ev.data["step"] == 1:
            run.pause()
        if ev.kind == "state" and ev.data["state"] == "paused":
            paused.set()

    run.events.subscribe(killer)
    run.events.subscribe(pauser)
    run.start_background()
    assert paused.wait(timeout=600), "the run did not pause"
    time.sleep(1.0)
    assert run.step == 1 and run.state == "paused"
    run.resume()
    assert run.wait(timeout=900), "the run did not finish"
    assert run.state == "finished" and run.step == CFG.steps and killed
    (rec,) = run.recoveries
    assert rec["lost"] == ["board0"] and rec["boards"] == ["board1"]
    assert rec["ranges"] == [[0, 6]] and rec["from_checkpoint"] == 2
    assert 0 <= rec["steps_redone"] <= CFG.checkpoint_every
    plans = [e for e in events(run.dir) if e["kind"] == "plan"]
    assert [p["reason"] for p in plans] == ["start", "board lost"]
    assert any(e["kind"] == "alert" and e["level"] == "error" for e in events(run.dir))
    assert any(e["kind"] == "board" and e["name"] == "board0" and e["alive"] is False
               for e in events(run.dir))
    print(f"recovery {rec['seconds']:.1f} s, {rec['steps_redone']} step(s) redone")
    assert_same_state(TrainState.of_checkpoint(run.latest_checkpoint()), reference)


def _cli(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "control", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def _running(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status                # a zombie has exited


def _wait_for(run_dir: Path, pred, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "events.jsonl").is_file() and any(pred(e) for e in events(run_dir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"edgert exited early ({proc.returncode}):\n{proc.stdout.read()}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("timed out waiting for the run")


def test_ctrl_c_then_kill_9_controller_then_resume(tmp_path, reference):
    """(c) Ctrl-C stops cleanly and the same command continues; (b) the controller is killed
    with SIGKILL after a checkpoint and `edgert resume` finishes; (d) on the way the newest
    checkpoint is truncated: resume warns and falls back to the previous one."""
    toml = tmp_path / "run.toml"
    toml.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in CFG.to_dict().items()) + "\n")
    out = tmp_path / "run"
    cmd = ["run", str(toml), "--out", str(out)]

    p = _cli(cmd)                                      # (c) Ctrl-C after step 1
    _wait_for(out, lambda e: e["kind"] == "step" and e["step"] >= 1, p)
    p.send_signal(signal.SIGINT)
    text, _ = p.communicate(timeout=300)
    assert p.returncode == 130, text
    assert f"edgert resume {out}" in text
    stopped = [e for e in events(out) if e["kind"] == "state" and e["state"] == "stopped"]
    assert stopped and (out / f"checkpoints/step-{stopped[-1]['step']}").is_dir()

    p = _cli(cmd)                                      # (b) the same command continues ...
    _wait_for(out, lambda e: e["kind"] == "checkpoint" and e["step"] == 4, p)
    p.kill()                                           # ... and the controller is killed -9
    p.communicate(timeout=60)
    pids = {e["pid"] for e in events(out) if e["kind"] == "board" and e.get("pid")}
    deadline = time.monotonic() + 20                   # its boards die with it (no orphans)
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pids and not any(_running(pid) for pid in pids)
    assert [e["reason"] for e in events(out) if e["kind"] == "plan"] == ["start", "resume"]

    f = out / "checkpoints/step-4/stage0.safetensors"  # (d) a torn newest checkpoint
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    p = _cli(["resume", str(out)])
    text, _ = p.communicate(timeout=600)
    assert p.returncode == 0, text
    evs = events(out)
    assert any(e["kind"] == "alert" and e["level"] == "warning" and "step-4" in e["text"]
               and "falling back" in e["text"] for e in evs), text
    resumed = [e for e in evs if e["kind"] == "alert" and "continuing from" in e["text"]]
    assert "step 2" in resumed[-1]["text"]
    assert evs[-1]["kind"] == "state" and evs[-1]["state"] == "finished"

    run = Run(CFG, out)            # same config: opens the directory, nothing runs
    assert_same_state(TrainState.of_checkpoint(run.latest_checkpoint()), reference)

    # the report: plots, and metrics equal to the events (the last value of a redone step)
    html = (out / "report.html").read_text()
    assert html.count("<svg") >= 4 and "training loss" in html and "board memory" in html
    metrics = json.loads((out / "metrics.json").read_text())
    last = {e["step"]: e["loss"] for e in evs if e["kind"] == "step"}
    assert [s["step"] for s in metrics["steps"]] == list(range(1, CFG.steps + 1))
    assert {s["step"]: s["loss"] for s in metrics["steps"]} == last
    evals = [e for e in evs if e["kind"] == "eval"]
    assert metrics["evals"][-1]["accuracy"] == evals[-1]["accuracy"]
    assert json.loads((out / "report.json").read_text())["state"] == "finished"
