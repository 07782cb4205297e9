"""Benchmark: peak RSS per board with even vs memory-first stage splits (control/partition.py).

    .venv/bin/python bench/bench_memory.py                  # K = 1..4, ~6 min on 2 cores
    .venv/bin/python bench/bench_memory.py --ks 2 --steps 2

MiniLM-L6, batch 8 x seq 64, M = 4 micro-batches per sync 1F1B step (bench_pipeline.py's (b)).
For every K the even split (`--stages K`) and the memory-first split (`plan(...,
objective="memory")`: least footprint of the largest stage) are compiled (1-thread target, default
schedules), deployed on K local boards (`edgert serve` processes, TVM 1 thread each), trained for
a warm-up step plus `--steps` steps, and each board's VmHWM is read from its STATS reply. The
baseline is K = 1 (one board training the whole model, same runtime-only process, B, T, M) in the
same run. RSS does not depend on timing, so the busy machine does not change these numbers; the
per-board compute seconds (from the STEP replies) show the compute balance the split costs.

Also measured once: what a deploy costs a board before LOAD (the upload of stage 0's files, see
edgert/protocol.py Reassembler), and per stage the planner's estimate against the measured
growth over the idle board.

Writes bench/results/memory.json (machine, load average, command, raw numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ["TVM_BIND_THREADS"] = "0"

from bench_pipeline import bundles_for, dataset, machine_info  # noqa: E402

OUT = ROOT / "bench" / "results" / "memory.json"
BUILD = ROOT / "build" / "bench_memory"
MIB = 1 << 20


def memory_first_split(k: int, batch: int, seq: int, micro: int) -> tuple[str, object]:
    from compiler.hf import default_model_dir
    from control.job import load_model
    from control.partition import BoardSpec, bert_costs, plan

    dims = load_model(default_model_dir(), num_labels=2, head_seed=0).dims
    p = plan(bert_costs(dims, batch, seq), [BoardSpec(f"board{i}") for i in range(k)], micro,
             objective="memory")
    return p.to_split(), p


def estimates(split: str, batch: int, seq: int, micro: int) -> list[dict]:
    from compiler.hf import default_model_dir
    from compiler.model_spec import parse_split
    from control.job import load_model
    from control.partition import BoardSpec, bert_costs, evaluate

    dims = load_model(default_model_dir(), num_labels=2, head_seed=0).dims
    ranges = parse_split(split, None, dims.layers)
    p = evaluate(bert_costs(dims, batch, seq), [BoardSpec(f"board{i}") for i in range(len(ranges))],
                 ranges, micro)
    return [{"layers": [s.first, s.last], "estimate_mib": s.memory / MIB,
             "params_mib": s.params / MIB, "saved_per_mb_mib": s.saved_per_mb / MIB,
             "in_flight": s.in_flight, "model_ms": s.ms} for s in p.stages]


def split_bundles(split: str, batch: int, seq: int) -> list[Path]:
    from control.job import compile_bundles, load_model
    from edgert.artifact import MANIFEST_FILE

    d = BUILD / f"b{batch}_t{seq}_th1" / split.replace(":", "-").replace(",", "_")
    n = len(split.split(","))
    paths = [d / f"stage{i}" for i in range(n)]
    if all((p / MANIFEST_FILE).is_file() for p in paths):
        return paths
    print(f"compiling split {split} ...", flush=True)
    model = load_model(None, num_labels=2, head_seed=0)
    return compile_bundles(model, d, split=split, batch=batch, seq=seq, threads=1, configs={},
                           progress=False)


def run_split(paths: list[Path], a: argparse.Namespace, train: list) -> dict:
    """Deploy, train warm-up + a.steps steps; per-board memory and compute numbers."""
    from control.cluster import LocalCluster
    from control.local import OptimConfig

    k = len(paths)
    opt = OptimConfig(lr=1e-5)
    with LocalCluster(k, threads=1, timeout=600) as c:
        idle = [c.stats(i)["rss"] for i in range(k)]
        c.deploy(paths, micro_batches=a.micro)
        loaded = [c.stats(i) for i in range(k)]
        comp, step_s = [], []
        for s in range(1 + a.steps):
            t = time.perf_counter()
            c.train_step([train[(s * a.micro + j) % len(train)] for j in range(a.micro)], opt)
            if s:                                    # the first step is the warm-up
                step_s.append(time.perf_counter() - t)
                comp.append([c.last_step_replies[key].header.body["compute_s"]
                             for key in sorted(c.last_step_replies)])
        st = [c.stats(i) for i in range(k)]
    med = [statistics.median(col) for col in zip(*comp, strict=True)]
    return {"idle_rss_mib": [x / MIB for x in idle],
            "after_load_rss_mib": [x["rss"] / MIB for x in loaded],
            "after_load_peak_rss_mib": [x["peak_rss"] / MIB for x in loaded],
            "peak_rss_mib": [x["peak_rss"] / MIB for x in st],
            "rss_mib": [x["rss"] / MIB for x in st],
            "board_compute_s_median": med, "compute_balance": statistics.mean(med) / max(med),
            "step_s_median": statistics.median(step_s)}


def upload_cost(path: Path) -> dict:
    """RSS of a board before and after receiving one bundle (no LOAD), vs the files' size."""
    from control.cluster import LocalCluster

    with LocalCluster(1, threads=1, timeout=600) as c:
        before = c.stats(0)
        c._upload(c.boards[0], path, "stage0")
        after = c.stats(0)
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return {"bundle": str(path.relative_to(ROOT)), "files_mib": size / MIB,
            "peak_rss_before_mib": before["peak_rss"] / MIB,
            "peak_rss_after_upload_mib": after["peak_rss"] / MIB,
            "growth_over_files": (after["peak_rss"] - before["peak_rss"]) / size}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ks", default="1,2,3,4")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()
    t0 = time.time()
    ks = sorted({1, *(int(x) for x in a.ks.split(","))})
    train, _ = dataset(a.batch, a.seq)
    load0 = os.getloadavg()
    res: dict = {"what": __doc__.split("\n")[0], "machine": machine_info(),
                 "command": " ".join(["python", *sys.argv]), "batch": a.batch, "seq": a.seq,
                 "micro_batches": a.micro, "timed_steps": a.steps, "by_k": {}}
    for k in ks:
        mem_split, _ = memory_first_split(k, a.batch, a.seq, a.micro)
        even_paths = bundles_for(k, a.batch, a.seq)
        even_split = ",".join(f"{x}:{y}" for x, y in _ranges(k))
        row = {}
        for name, split in (("even", even_split), ("memory_first", mem_split)):
            if k == 1 and name == "memory_first":
                row[name] = row["even"]          # one stage: the same bundle
                continue
            paths = even_paths if name == "even" else split_bundles(split, a.batch, a.seq)
            r = run_split(paths, a, train)
            est = estimates(split, a.batch, a.seq, a.micro)
            for i, e in enumerate(est):
                e["measured_peak_mib"] = r["peak_rss_mib"][i]
                e["measured_growth_mib"] = r["peak_rss_mib"][i] - r["idle_rss_mib"][i]
                e["measured_growth_over_estimate"] = e["measured_growth_mib"] / e["estimate_mib"]
            row[name] = {"split": split, **r, "stages": est}
            print(f"K={k} {name:12s} {split:18s} peak RSS MiB "
                  f"{[round(x) for x in r['peak_rss_mib']]}, compute balance "
                  f"{r['compute_balance']:.2f}, load {os.getloadavg()[0]:.2f}", flush=True)
        res["by_k"][k] = row
    single = max(res["by_k"][1]["even"]["peak_rss_mib"])
    res["single_board_peak_rss_mib"] = single
    res["peak_rss_ratio_vs_single"] = {
        name: {k: max(r[name]["peak_rss_mib"]) / single for k, r in res["by_k"].items() if k > 1}
        for name in ("even", "memory_first")}
    res["compute_balance"] = {
        name: {k: r[name]["compute_balance"] for k, r in res["by_k"].items() if k > 1}
        for name in ("even", "memory_first")}
    k2 = res["by_k"].get(2)
    if k2 is not None:
        res["deploy_upload"] = upload_cost(bundles_for(2, a.batch, a.seq)[0])
    res["loadavg"] = {"start": load0, "end": os.getloadavg()}
    res["seconds_this_run"] = time.time() - t0
    res["tradeoff"] = tradeoff(res)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(res, indent=1, default=float))
    print(json.dumps({k: res[k] for k in ("peak_rss_ratio_vs_single", "compute_balance")},
                     indent=1))
    print(res["tradeoff"])
    return 0


def _ranges(k: int, layers: int = 6) -> list[tuple[int, int]]:
    from compiler.model_spec import parse_split

    return parse_split(None, k, layers)


def tradeoff(res: dict) -> str:
    r, b = res["peak_rss_ratio_vs_single"], res["compute_balance"]
    parts = [f"K={k}: largest board {r['even'][k]:.2f} -> {r['memory_first'][k]:.2f} of the "
             f"single board, compute balance {b['even'][k]:.2f} -> {b['memory_first'][k]:.2f}"
             for k in r["even"]]
    return ("Memory-first splits give stage 0 (which holds the 30522 x 384 word embedding x4) a "
            "single layer, so the largest board shrinks, but the other stages get more layers "
            "and the pipeline's slowest stage sets the pace (balance = mean / max per-board "
            "compute): " + "; ".join(parts) + ".")


if __name__ == "__main__":
    sys.exit(main())
