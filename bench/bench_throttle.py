"""Benchmark part: one board throttled to a quarter of the other's speed; re-planned vs even split.

    .venv/bin/python bench/bench_faults.py --parts throttle     # ~3-5 min on 2 busy cores

Two board processes (LocalCluster), each TVM with one thread and pinned to its own core; board1
is capped at 25% of its core with a cgroup v1 CFS quota (control.cgroup.CpuCap via
LocalCluster.throttle). MiniLM-L6, micro-batch 4 x 32 tokens, 2 micro-batches per step.

1. The even split 0:3,3:6 runs; the boards' measured compute times per step go through the same
   drift detector and decision as a run (control/replan.py): measured speeds -> re-planned split.
2. Interleaved rounds: deploy the even split, carry the weights and AdamW moments over, time a few
   steps; deploy the re-planned split, same; repeat. The ratio of median step times is the
   measured `throttled_speedup_vs_even`; the planner's predicted ratio (with the measured speeds,
   and with the nominal 1 : 0.25) is reported next to it.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

from bench.bench_pipeline import _cluster_cls, dataset, machine_info

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "bench_throttle"
FRACTION = 0.25


def _bundles(model, split: str, batch: int, seq: int) -> list[Path]:
    from control.job import compile_bundles

    d = BUILD / f"b{batch}_t{seq}" / split.replace(":", "-").replace(",", "_")
    return compile_bundles(model, d, split=split, batch=batch, seq=seq, threads=1,
                           progress=False)


def _split(ranges) -> str:
    return ",".join(f"{a}:{b}" for a, b in ranges)


def throttled(rounds: int = 4, steps: int = 4, batch: int = 4, seq: int = 32, m: int = 2) -> dict:
    from control.job import load_model
    from control.local import OptimConfig
    from control.partition import BoardSpec, bert_costs, evaluate
    from control.replan import Drift, Watch, decide, predicted_step_s, with_speed

    os.environ["TVM_BIND_THREADS"] = "0"
    load_before = os.getloadavg()
    cores = sorted(os.sched_getaffinity(0))
    pin = [{cores[0]}, {cores[-1]}]
    model = load_model(None, num_labels=2, head_seed=0)
    costs = bert_costs(model.dims, batch, seq)
    train, _ = dataset(batch, seq)
    opt = OptimConfig(lr=1e-5)
    nxt = iter(range(10 ** 9))

    def micro():
        return [train[next(nxt) % len(train)] for _ in range(m)]

    even = [(0, 3), (3, 6)]
    boards = [BoardSpec("board0"), BoardSpec("board1")]
    bundles = {_split(even): _bundles(model, _split(even), batch, seq)}
    c = _cluster_cls()(2, pin, threads=1, timeout=600)
    try:
        c.throttle("board1", FRACTION, core=cores[-1])
        c.deploy(bundles[_split(even)], micro_batches=m)
        cur = evaluate(costs, boards, even, m)
        watch, r, seen = Watch(Drift(1.5, patience=3, cooldown=0), skip=1), None, []
        while r is None and len(seen) < 12:
            c.train_step(micro(), opt)
            comp = {k[0]: v.header.body["compute_s"] for k, v in c.last_step_replies.items()}
            seen.append([comp["board0"], comp["board1"]])
            r = watch.observe(seen[-1], predicted_step_s(cur))
        if r is None:
            raise RuntimeError(f"no drift detected with board1 at {FRACTION:.0%} CPU: {seen}")
        d = decide(costs, boards, {}, even, r, m, margin=0.1)
        new = d.proposed.ranges
        bundles[_split(new)] = _bundles(model, _split(new), batch, seq)
        times: dict[str, list[float]] = {_split(even): [], _split(new): []}
        comp_by: dict[str, list[list[float]]] = {k: [] for k in times}
        switch: list[list[float]] = []      # s: gather state, deploy (LOAD), load state
        for i in range(rounds):
            for split in ([even, new] if i % 2 == 0 else [new, even]):
                key = _split(split)
                t0 = time.perf_counter()
                state = (c.params(), c.optimizer_state(), c.step)
                t1 = time.perf_counter()
                c.deploy(bundles[key], micro_batches=m)
                t2 = time.perf_counter()
                c.load_state(*state)
                switch.append([t1 - t0, t2 - t1, time.perf_counter() - t2])
                c.train_step(micro(), opt)                 # warm-up after LOAD
                for _ in range(steps):
                    t = time.perf_counter()
                    c.train_step(micro(), opt)
                    times[key].append(time.perf_counter() - t)
                    comp = {k[0]: v.header.body["compute_s"]
                            for k, v in c.last_step_replies.items()}
                    comp_by[key].append([comp["board0"], comp["board1"]])
            print(f"  throttle round {i + 1}/{rounds}, load {os.getloadavg()[0]:.2f}", flush=True)
        throttle_stat = c.cgroups["board1/cpu"].stat()    # type: ignore[attr-defined]
    finally:
        c.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    nominal = [with_speed(boards[0], 1.0), with_speed(boards[1], FRACTION)]
    pred_nominal = (evaluate(costs, nominal, even, m).step_ms
                    / evaluate(costs, nominal, new, m).step_ms)
    return {
        "throttled_speedup_vs_even": med[_split(even)] / med[_split(new)],
        "throttled": {
            "what": (f"2 boards, TVM 1 thread each, pinned to cores {cores[0]} and {cores[-1]}; "
                     f"board1 capped at {FRACTION:.0%} of its core (cgroup v1 CFS quota, "
                     f"control.cgroup.CpuCap); MiniLM-L6, micro-batch {batch}x{seq}, {m} "
                     f"micro-batches per step; {rounds} interleaved rounds x {steps} timed steps "
                     f"per split, weights and AdamW moments carried across every switch"),
            "even_split": _split(even), "replanned_split": _split(new),
            "measured_speeds": d.speeds, "decision": d.why,
            "drift_detection_compute_s": seen,
            "step_seconds_median": med, "step_seconds": times,
            "board_compute_s_median": {k: [statistics.median(x) for x in zip(*v, strict=True)]
                                       for k, v in comp_by.items()},
            "predicted_speedup_measured_speeds": d.current.step_ms / d.proposed.step_ms,
            "predicted_speedup_nominal_quarter": pred_nominal,
            "board1_cpu_stat": throttle_stat,
            "migration_seconds_median": {
                k: statistics.median(x[i] for x in switch[1:])     # the first is the first LOAD
                for i, k in enumerate(("gather_state", "deploy", "load_state"))},
        },
        "throttled_machine": machine_info(),
        "throttled_loadavg": {"before": load_before, "after": os.getloadavg(),
                              "note": "shared 2-core machine with other engineers' jobs running"},
    }
