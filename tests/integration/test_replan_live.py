"""Live re-partitioning (issue 6): a board throttled mid-run makes the run re-plan by itself.

A 2-board sync run of real MiniLM training (batch 2 x 16 tokens, 2 micro-batches per step, split
0:3,3:6, 8 steps, replan_drift 1.5, replan_patience 2). After step 1, board0 and board1 are pinned
to their own cores and board1 is capped at 25% of its core (cgroup v1 CFS quota). The run must
measure the drift, re-plan with the measured speeds (board1 gets fewer layers), migrate weights
and AdamW moments at a step boundary without redoing a step, and finish in the state (weights,
AdamW moments, step) of an uninterrupted run in one process (LocalPipeline on 0:3,3:6, data order
written out here). The learning rate warms up over all 8 steps, so every step moves the weights
(tests/run_util.py [Note: the last step must count]).

Tolerance (as tests/integration/test_faults.py): none; the stages after the move are compiled for
another split, which changes no float32 operation (measured: bit-identical). A lost or doubled
step or lost AdamW moments fail it, and so does the reference state one step short of the end.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from control.run import Run, RunConfig
from tests.run_util import TrainState, assert_same_state, uninterrupted_state

needs_cpu_cgroup = pytest.mark.skipif(
    not (Path("/sys/fs/cgroup/cpu") / "cpu.cfs_quota_us").exists(),
    reason="needs the cgroup v1 cpu controller (/sys/fs/cgroup/cpu/cpu.cfs_quota_us) to throttle "
           "a board")
CFG = RunConfig(boards=2, split="0:3,3:6", steps=8, batch=2, seq=16, micro_batches=2, lr=1e-4,
                warmup=8, checkpoint_every=8, eval_examples=8, timeout_s=60, threads=1,
                replan_drift=1.5, replan_patience=2, export_hf=False)


@needs_cpu_cgroup
@pytest.mark.slow
def test_throttled_board_gets_fewer_layers_live_and_weights_are_exact(tmp_path, minilm_dir,
                                                                      build_root):
    want, short = uninterrupted_state(CFG, minilm_dir, build_root / "replan_ref")
    run = Run(CFG, tmp_path / "run")
    cores = sorted(os.sched_getaffinity(0))
    throttled: list[int] = []

    def throttle(ev) -> None:
        if ev.kind == "step" and ev.data["step"] == 1 and not throttled:
            run.cluster.pin("board0", {cores[0]})
            run.cluster.throttle("board1", 0.25, core=cores[-1])
            throttled.append(ev.data["step"])

    run.events.subscribe(throttle)
    run.start()
    assert run.state == "finished" and run.step == CFG.steps and throttled
    evs = [json.loads(x) for x in (run.dir / "events.jsonl").read_text().splitlines()]
    plans = [e for e in evs if e["kind"] == "plan"]
    assert [p["reason"] for p in plans] == ["start", "re-plan"], plans
    (rec,) = run.replans
    assert rec["from"] == [[0, 3], [3, 6]]
    (a, b), (b2, c) = rec["to"]
    assert a == 0 and b == b2 and c == 6 and c - b < 3, f"board1 kept {c - b} layers: {rec}"
    assert rec["speeds"]["board1"] < rec["speeds"]["board0"] / 1.5, rec["speeds"]
    assert any(e["kind"] == "alert" and "re-planning live" in e["text"] for e in evs)
    steps = [e["step"] for e in evs if e["kind"] == "step"]
    assert steps == list(range(1, CFG.steps + 1)), f"steps redone or skipped: {steps}"
    assert 2 <= rec["step"] < CFG.steps
    assert not run.recoveries
    print(f"re-planned at step {rec['step']}: {rec['from']} -> {rec['to']} in "
          f"{rec['seconds']:.1f} s; speeds {rec['speeds']}")
    got = TrainState.of_checkpoint(run.latest_checkpoint())
    assert_same_state(got, want)
    with pytest.raises(AssertionError, match="weight tensors differ"):    # the last step counts
        assert_same_state(TrainState(short.params, got.opt, got.step), want)


@needs_cpu_cgroup
def test_cpu_cap_limits_a_busy_process_to_its_fraction():
    """A spinning child capped at 25% of a core gets ~0.25 s of CPU per wall second."""
    import subprocess
    import sys
    import time

    from control.cgroup import CpuCap

    core = sorted(os.sched_getaffinity(0))[-1]
    p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    cap = CpuCap.create("spinner", 0.25)
    try:
        os.sched_setaffinity(p.pid, {core})
        cap.add(p.pid)
        assert cap.pids() == [p.pid]
        t0, c0 = time.monotonic(), _cpu_s(p.pid)
        time.sleep(1.0)
        share = (_cpu_s(p.pid) - c0) / (time.monotonic() - t0)
        assert share <= 0.25 * 1.2, f"capped at 25% but used {share:.0%} of a core"
        assert cap.stat()["nr_throttled"] > 0
        cap.set(0.5)
        assert (cap.path / "cpu.cfs_quota_us").read_text().strip() == "5000"
    finally:
        p.kill()
        p.wait()
        cap.close()
    assert not cap.path.exists()


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")   # utime + stime
