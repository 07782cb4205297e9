"""Benchmark: what losing a board, or one slowing down, costs an unattended run (issue 6).

    .venv/bin/python bench/bench_faults.py                    # both parts, ~6-8 min on 2 busy cores
    .venv/bin/python bench/bench_faults.py --parts throttle   # only the throttled-board part

Part "throttle" (bench/bench_throttle.py): one board at a quarter of the other's speed, the
re-planned split vs the even one (`throttled_speedup_vs_even`); results are merged into the same
file, keeping the other part's keys.

Part "kill":

A 2-board sync run of MiniLM-L6 (split 0:3,3:6, micro-batch 4 x 32 tokens, 2 micro-batches per
step, a checkpoint every 4 steps) loses board0 to SIGKILL 0.1 s into step 7; the run detects it,
re-plans onto board1 alone (0:6), compiles (libraries from the compile cache, warmed first, as a
run that has compiled its fallback split before would find them), LOADs the survivor in place,
loads checkpoint 4 and redoes the steps since. Measured: detection (kill -> the run's error
alert), recovery (probe + plan + compile-from-cache + deploy + checkpoint load), steps redone, and
the step time before and after, from the run's own events. Results: bench/results/faults.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_pipeline import machine_info  # noqa: E402

OUT = ROOT / "bench" / "results" / "faults.json"
KILL_AFTER_STEP = 6


def main() -> None:
    from control.job import compile_bundles, load_model
    from control.run import Run, RunConfig

    cfg = RunConfig(boards=2, split="0:3,3:6", steps=10, batch=4, seq=32, micro_batches=2,
                    lr=1e-4, checkpoint_every=4, eval_examples=8, timeout_s=60)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-faults-") as tmp:
        model = load_model(None, num_labels=2, head_seed=cfg.seed)
        t0 = time.perf_counter()
        for split in (cfg.split, "0:6"):     # warm the library cache for both splits
            compile_bundles(model, Path(tmp) / "warm" / split.replace(":", "-"), split=split,
                            batch=cfg.batch, seq=cfg.seq, progress=False)
        warm_s = time.perf_counter() - t0
        run = Run(cfg, Path(tmp) / "run")
        killed: dict[str, float] = {}

        def kill(pid: int) -> None:
            killed["t"] = time.time()
            os.kill(pid, signal.SIGKILL)

        def on_event(ev) -> None:
            if ev.kind == "step" and ev.data["step"] == KILL_AFTER_STEP and not killed:
                pid = run.cluster.boards[0].proc.pid
                threading.Timer(0.1, kill, (pid,)).start()

        run.events.subscribe(on_event)
        run.start()
        evs = run.events.events()
    (rec,) = run.recoveries
    t_alert = next(e.t for e in evs if e.kind == "alert" and e.data["level"] == "error")
    i_plan = next(i for i, e in enumerate(evs)
                  if e.kind == "plan" and e.data["reason"] == "board lost")
    before = [e.data["step_s"] for e in evs[:i_plan] if e.kind == "step" and e.data["step"] > 1]
    after = [e.data["step_s"] for e in evs[i_plan:] if e.kind == "step"]
    t_first_after = next(e.t for e in evs[i_plan:] if e.kind == "step")
    step2, step1 = statistics.median(before), statistics.median(after)
    res = {
        "what": "2-board sync run (MiniLM-L6, split 0:3,3:6, micro-batch 4x32, 2 micro-batches "
                f"per step, checkpoint every {cfg.checkpoint_every}); board0 killed (SIGKILL) "
                f"0.1 s into step {KILL_AFTER_STEP + 1}; recovery onto board1 alone (0:6)",
        "detect_seconds": t_alert - killed["t"],
        "recovery_seconds": rec["seconds"],
        "recovery_parts_seconds": {k: rec[k] for k in ("probe_plan_s", "verify_checkpoint_s",
                                                        "compile_s", "deploy_s",
                                                        "load_checkpoint_s")},
        "death_to_first_step_done_seconds": t_first_after - killed["t"],
        "steps_redone": rec["steps_redone"],
        "from_checkpoint": rec["from_checkpoint"],
        "step_seconds_2_boards_median": step2,
        "step_seconds_1_board_median": step1,
        "recovery_in_steps": rec["seconds"] / step2,
        "lost_work_seconds": rec["steps_redone"] * step2,
        "cache_warm_compile_seconds": warm_s,
        "final_state": run.state,
        "machine": machine_info(),
        "loadavg": {"before": load_before, "after": os.getloadavg(),
                    "note": "shared 2-core machine with other engineers' jobs running"},
    }
    merge(res)


def merge(res: dict) -> None:
    """Update bench/results/faults.json with `res`, keeping the other parts' keys."""
    old = json.loads(OUT.read_text()) if OUT.is_file() else {}
    old.update(res)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(old, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="kill,throttle",
                    help="kill: a board's death (recovery_seconds, steps_redone); throttle: a "
                         "quarter-speed board, re-planned vs even split "
                         "(throttled_speedup_vs_even)")
    parts = ap.parse_args().parts.split(",")
    if "kill" in parts:
        main()
    if "throttle" in parts:
        from bench.bench_throttle import throttled

        merge(throttled())
