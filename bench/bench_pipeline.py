"""Benchmark: the multi-board pipeline on this machine, one board = one OS process (LocalCluster).

    .venv/bin/python bench/bench_pipeline.py                     # all parts, ~10 min on 2 cores
    .venv/bin/python bench/bench_pipeline.py --parts c           # only the transport part
    .venv/bin/python bench/bench_pipeline.py --parts a,b --micro 8 --reps 3

Parts (results merged into bench/results/pipeline.json; a partial run keeps the other parts):
  a  throughput of K boards vs one board with the same CPU share per board: every board runs TVM
     with one thread (--threads 1 -> TVM_NUM_THREADS=1) and, while K <= cores, is pinned to its
     own core; K = 1 is one board on core 0. Efficiency (thr_K / thr_1) / K is compared with the
     ideal 1F1B efficiency M / (M + K - 1) (edgert.schedule.ideal_efficiency). K > cores can
     only share cores here: reported, flagged "shared_cores", not comparable with the ideal.
  b  peak RSS (VmHWM, from the boards' STATS replies) of every board with K = 2, 3, 4 stages vs
     single-device training (a 1-board cluster: same runtime-only process, same B, T, M).
  c  activation transfer: edgert protocol (encode -> ZeroMQ tcp loopback -> decode, zero-copy
     frames; with CURVE as deployed, and without) vs JSON lists over HTTP (stdlib http.server,
     json.dumps(arr.tolist()) -> json.loads -> numpy) as the Confidant prototype does it (bench/pipeline_transport.py).
  d  async PipeDream-2BW vs sync 1F1B convergence on Rotten Tomatoes on 2 boards: equal numbers of
     optimizer steps and identical data/dropout seeds; held-out accuracy of the final weights
     (evaluated with LocalPipeline after loading the cluster's params).

Pinning: LocalCluster has no affinity option; PinnedCluster below sets this (controller) thread's
affinity to the board's core around each Popen, so the board process and all its threads inherit
it. TVM_BIND_THREADS=0 stops TVM's thread pool from re-binding threads to other cores. Nothing in
control/ or edgert/ is changed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["TVM_BIND_THREADS"] = "0"          # inherited by the boards; see the docstring

import numpy as np  # noqa: E402

from bench.pipeline_transport import part_transport  # noqa: E402
from bench.pipeline_transport import stats as _stats  # noqa: E402

OUT = ROOT / "bench" / "results" / "pipeline.json"
BUILD = ROOT / "build" / "bench_pipeline"
MIB = 1 << 20


def machine_info() -> dict:
    import psutil

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo", encoding="utf-8")
                if ln.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)),
            "memory_gib": round(psutil.virtual_memory().total / 2 ** 30, 1),
            "os": platform.platform(), "python": platform.python_version()}


# ---- bundles and data ---------------------------------------------------------------------------

def bundles_for(k: int, batch: int, seq: int) -> list[Path]:
    """K stage bundles of MiniLM-L6 (default kernel schedules, 1-thread target), cached."""
    from edgert.artifact import MANIFEST_FILE

    d = BUILD / f"b{batch}_t{seq}_th1" / f"k{k}"
    paths = [d / f"stage{i}" for i in range(k)]
    if all((p / MANIFEST_FILE).is_file() for p in paths):
        return paths
    from control.job import compile_bundles, load_model

    print(f"compiling MiniLM into {k} stage(s), batch {batch} x seq {seq} ...", flush=True)
    model = load_model(None, num_labels=2, head_seed=0)
    return compile_bundles(model, d, stages=k, batch=batch, seq=seq, threads=1, configs={},
                           progress=False)


_DATA: dict = {}


def dataset(batch: int, seq: int, seed: int = 0):
    """(train micro-batch list in epoch order, held-out batches): the full Rotten Tomatoes split."""
    key = (batch, seq, seed)
    if key not in _DATA:
        from compiler.hf import default_model_dir
        from control.data import iterate_batches
        from control.job import rotten_tomatoes_batches

        tok = default_model_dir() / "tokenizer.json"
        enc, y, test = rotten_tomatoes_batches(tok, seq, batch, 10 ** 9, seed)
        train = [b.as_dict() for _, b in iterate_batches(enc, y, batch, seed, 0)]
        _DATA[key] = (train, test)
    return _DATA[key]


# ---- the cluster with per-board CPU pinning -----------------------------------------------------

def _cluster_cls():
    from control.cluster import LocalCluster

    class PinnedCluster(LocalCluster):
        """LocalCluster whose board i starts with CPU affinity cores[i] (None: unpinned)."""

        def __init__(self, n: int, cores: list[set[int] | None], **kw) -> None:
            self._cores = cores                  # read by _spawn, called from __init__
            super().__init__(n, **kw)

        def _spawn(self, name, *a):
            want = self._cores[int(name.removeprefix("board"))]
            if want is None:
                return super()._spawn(name, *a)
            old = os.sched_getaffinity(0)
            os.sched_setaffinity(0, want)        # this thread only; Popen's child inherits it
            try:
                return super()._spawn(name, *a)
            finally:
                os.sched_setaffinity(0, old)

    return PinnedCluster


def board_affinity(pid: int) -> list[str]:
    """Distinct Cpus_allowed_list over every thread of a process."""
    out = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for ln in (task / "status").read_text().splitlines():
                if ln.startswith("Cpus_allowed_list:"):
                    out.add(ln.split(":", 1)[1].strip())
        except OSError:
            pass
    return sorted(out)


def pinning(k: int, cores: int) -> list[set[int] | None]:
    return [{i} for i in range(k)] if k <= cores else [None] * k


# ---- a + b: throughput and memory ---------------------------------------------------------------

def part_throughput(a: argparse.Namespace) -> dict:
    """(a) and (b) for every M in --micro; the first M is the headline (and gives (b))."""
    out: dict = {"throughput_by_m": {}, "efficiency_vs_ideal_by_m": {}}
    for i, m in enumerate(a.micro):
        r = _throughput_one_m(a, m)
        out["throughput_by_m"][m] = r["throughput"]
        out["efficiency_vs_ideal_by_m"][m] = r["efficiency_vs_ideal"]
        if i == 0:
            out.update(r)
    return out


def _throughput_one_m(a: argparse.Namespace, m: int) -> dict:
    from control.local import OptimConfig
    from edgert.schedule import ideal_efficiency

    cores = len(os.sched_getaffinity(0))
    ks = sorted(set([1] + a.ks))
    train, _ = dataset(a.batch, a.seq)
    opt = OptimConfig(lr=1e-5)
    cls = _cluster_cls()
    res: dict = {"batch": a.batch, "seq": a.seq, "micro_batches": m, "threads_per_board": 1,
                 "timed_steps_per_round": a.steps, "rounds": a.reps, "by_k": {}}
    clusters = {}
    try:
        for k in ks:           # fresh board processes per M: VmHWM starts over
            paths = bundles_for(k, a.batch, a.seq)
            pin = pinning(k, cores)
            c = cls(k, pin, threads=1, timeout=600)
            clusters[k] = c
            idle = [c.profile(i) for i in range(k)]      # before LOAD: runtime not yet loaded
            c.deploy(paths, micro_batches=m)
            res["by_k"][k] = {"pinned_cores": [sorted(p) if p else None for p in pin],
                              "shared_cores": k > cores, "step_s": [],
                              "idle_rss_mib": [p["rss"] / MIB for p in idle],
                              "board_compute_s": [], "board_wait_s": []}
        twin = None
        if cores >= 2:     # a second 1-board cluster on core 1: two independent boards at once
            twin = cls(1, [{1}], threads=1, timeout=600)
            clusters["twin"] = twin
            twin.deploy(bundles_for(1, a.batch, a.seq), micro_batches=m)
            res["ceiling_two_independent_boards"] = {"step_s": [], "what": (
                "one K=1 board on core 0 and another on core 1 training at the same time (two "
                "controller threads); aggregate throughput / one board alone = the parallel "
                "headroom this machine gave 2 single-core boards during this run")}
        nxt = iter(range(10 ** 9))

        def micro():
            return [train[next(nxt) % len(train)] for _ in range(m)]

        for k, c in clusters.items():                    # warm-up (first-touch, page faults)
            c.train_step(micro(), opt)
            if k != "twin":
                res["by_k"][k]["affinity"] = [board_affinity(b.proc.pid) for b in c.stages]
        for r in range(a.reps):                          # interleave K so all see the same load
            if twin is not None:
                res["ceiling_two_independent_boards"]["step_s"].append(
                    _concurrent(clusters[1], twin, [micro() for _ in range(2 * a.steps)], opt))
            for k, c in clusters.items():
                if k == "twin":
                    continue
                rk = res["by_k"][k]
                for _ in range(a.steps):
                    t = time.perf_counter()
                    c.train_step(micro(), opt)
                    rk["step_s"].append(time.perf_counter() - t)
                    rep = [c.last_step_replies[key] for key in sorted(c.last_step_replies)]
                    rk["board_compute_s"].append([x.header.body["compute_s"] for x in rep])
                    rk["board_wait_s"].append([x.header.body["wait_s"] for x in rep])
            print(f"  M={m} round {r + 1}/{a.reps} done, load {os.getloadavg()[0]:.2f}",
                  flush=True)
        for k, c in clusters.items():
            if k == "twin":
                continue
            st = [c.stats(i) for i in range(k)]
            res["by_k"][k]["peak_rss_mib"] = [s["peak_rss"] / MIB for s in st]
            res["by_k"][k]["rss_mib"] = [s["rss"] / MIB for s in st]
    finally:
        for c in clusters.values():
            c.close()

    one = res["by_k"][1]
    t1 = _stats(one["step_s"])
    samples = m * a.batch
    eff, rss_ratio = {}, {}
    for k, rk in res["by_k"].items():
        s = _stats(rk["step_s"])
        rk["step_s_stats"] = s
        rk["throughput_seq_per_s"] = {"median": samples / s["median"], "best": samples / s["min"]}
        comp = np.array(rk["board_compute_s"])           # [steps, boards]
        rk["board_compute_s_median"] = np.median(comp, 0).tolist()
        rk["board_busy_fraction"] = float(np.median(comp.sum(1) / (k * np.array(rk["step_s"]))))
        rk["stage_balance"] = float(np.mean(np.median(comp, 0)) / np.max(np.median(comp, 0)))
        if k == 1:
            continue
        speed_med = t1["median"] / s["median"]
        speed_best = t1["min"] / s["min"]
        ideal = ideal_efficiency(k, m)
        eff[k] = {"efficiency": speed_med / k, "efficiency_best": speed_best / k,
                  "ideal": ideal, "ratio_to_ideal": speed_med / k / ideal,
                  "ratio_to_ideal_best": speed_best / k / ideal,
                  "speedup": speed_med, "speedup_best": speed_best,
                  "ideal_with_measured_stage_balance": ideal * rk["stage_balance"],
                  "shared_cores": rk["shared_cores"],
                  "note": (f"{k} boards share {cores} cores: efficiency per board is bounded by "
                           f"{cores}/{k}; not comparable with the ideal") if rk["shared_cores"]
                  else "each board pinned to its own core, TVM 1 thread"}
        rss_ratio[k] = max(rk["peak_rss_mib"]) / max(one["peak_rss_mib"])
    ceil = res.get("ceiling_two_independent_boards")
    if ceil and 2 in eff:
        cs = _stats(ceil["step_s"])        # wall per step of EACH of the 2 boards (both ran)
        ceil["step_s_stats"] = cs
        ceil["speedup"] = {"median": 2 * t1["median"] / cs["median"],
                           "best": 2 * t1["min"] / cs["min"]}
        e2 = eff[2]
        e2["machine_ceiling_speedup"] = ceil["speedup"]["median"]
        e2["efficiency_vs_machine_ceiling"] = e2["speedup"] / ceil["speedup"]["median"]
        e2["ratio_to_ideal_vs_machine_ceiling"] = e2["efficiency_vs_machine_ceiling"] / e2["ideal"]
    return {"throughput": res, "efficiency_vs_ideal": eff, "peak_rss_ratio_vs_single": rss_ratio,
            "peak_rss_mib": {k: {"boards": rk["peak_rss_mib"], "largest": max(rk["peak_rss_mib"]),
                                 "sum": sum(rk["peak_rss_mib"]),
                                 "idle_board_before_load": rk["idle_rss_mib"]}
                             for k, rk in res["by_k"].items()}}


def _concurrent(c0, c1, batches: list, opt) -> float:
    """Both 1-board clusters train len(batches)/2 steps at once; wall seconds per step."""
    import threading

    half = len(batches) // 2
    errs: list[BaseException] = []

    def run(c, bs):
        try:
            for b in bs:
                c.train_step(b, opt)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errs.append(e)

    th = [threading.Thread(target=run, args=(c, bs)) for c, bs in
          ((c0, batches[:half]), (c1, batches[half:]))]
    t0 = time.perf_counter()
    for t in th:
        t.start()
    for t in th:
        t.join()
    if errs:
        raise errs[0]
    return (time.perf_counter() - t0) / half


# ---- d: async vs sync convergence ---------------------------------------------------------------

def part_convergence(a: argparse.Namespace) -> dict:
    from control.local import LocalPipeline, OptimConfig

    k, m, steps = 2, a.conv_micro, a.conv_steps
    paths = bundles_for(k, a.batch, a.seq)
    train, test = dataset(a.batch, a.seq)
    need = steps * m
    data = [train[i % len(train)] for i in range(need)]
    opt = OptimConfig(lr=a.lr, warmup_steps=max(1, steps // 10), total_steps=steps)
    cls = _cluster_cls()
    cores = len(os.sched_getaffinity(0))
    evaluator = LocalPipeline(paths, threads=cores)
    before = evaluator.evaluate(test)
    res: dict = {"boards": k, "micro_batches_per_step": m, "optimizer_steps": steps,
                 "batch": a.batch, "seq": a.seq, "lr": a.lr, "warmup_steps": opt.warmup_steps,
                 "schedule": "linear warm-up then linear decay", "heldout_examples":
                 len(test) * a.batch, "before": {"loss": before[0], "accuracy": before[1]}}
    with cls(k, pinning(k, cores), threads=1, timeout=1800) as c:
        for mode in ("sync", "async", "sync_dropout_seed1")[:3 if a.conv_noise_ref else 2]:
            t0 = time.perf_counter()
            c.run_seed = 1 if mode == "sync_dropout_seed1" else 0
            if mode.startswith("sync"):
                c.deploy(paths, micro_batches=m)
                losses = [c.train_step(data[s * m:(s + 1) * m], opt) for s in range(steps)]
                versions = 1
            else:
                c.deploy(paths, micro_batches=need, mode="async", update_every=m)
                mb_losses = c.train_async(data, opt)
                losses = [float(np.mean(mb_losses[s * m:(s + 1) * m])) for s in range(steps)]
                versions = max(r.header.body["max_versions"] for r in c.last_step_replies.values())
            wall = time.perf_counter() - t0
            evaluator.load_state(c.params(), None, 0)
            loss, acc = evaluator.evaluate(test)
            res[mode] = {"heldout_loss": loss, "heldout_accuracy": acc, "train_wall_s": wall,
                         "train_loss_first5": float(np.mean(losses[:5])),
                         "train_loss_last5": float(np.mean(losses[-5:])),
                         "max_weight_versions": versions, "train_losses": losses}
            print(f"  {mode}: held-out accuracy {100 * acc:.2f}% loss {loss:.4f} "
                  f"({wall:.0f} s)", flush=True)
    gap = 100 * (res["async"]["heldout_accuracy"] - res["sync"]["heldout_accuracy"])
    if "sync_dropout_seed1" in res:     # how far two sync runs differing only in dropout land
        res["noise_ref_gap_points_sync_seed1_minus_sync"] = 100 * (
            res["sync_dropout_seed1"]["heldout_accuracy"] - res["sync"]["heldout_accuracy"])
    res["accuracy_gap_points_async_minus_sync"] = gap
    res["within_1_point"] = abs(gap) <= 1.0
    se = 100 * np.sqrt(0.25 / res["heldout_examples"])
    res["heldout_binomial_se_points"] = float(se)
    return {"convergence": res, "async_vs_sync_accuracy_gap_points": gap}


# ---- report -------------------------------------------------------------------------------------

def table(r: dict) -> str:
    out = []
    for mkey, tp in (r.get("throughput_by_m") or {}).items():
        effs = r["efficiency_vs_ideal_by_m"][mkey]
        out.append(f"(a) throughput, MiniLM-L6 B={tp['batch']} T={tp['seq']} M={tp['micro_batches']}"
                   f", 1 TVM thread per board, {tp['rounds']} rounds x {tp['timed_steps_per_round']}"
                   f" steps")
        out.append(f"  {'K':>2} {'step ms min/med':>16} {'seq/s med':>9} {'eff med':>7} "
                   f"{'eff best':>8} {'ideal':>6} {'busy':>5} {'balance':>7}  cores")
        for k, rk in tp["by_k"].items():
            e = effs.get(k) or effs.get(str(k)) or {}
            s = rk["step_s_stats"]
            out.append(f"  {k:>2} {1e3 * s['min']:>7.0f}/{1e3 * s['median']:<8.0f} "
                       f"{rk['throughput_seq_per_s']['median']:>9.2f} "
                       f"{e.get('efficiency', 1.0):>7.3f} {e.get('efficiency_best', 1.0):>8.3f} "
                       f"{e.get('ideal', 1.0):>6.3f} {rk['board_busy_fraction']:>5.2f} "
                       f"{rk['stage_balance']:>7.2f}  "
                       f"{'shared' if rk['shared_cores'] else rk['pinned_cores']}")
        ceil = tp.get("ceiling_two_independent_boards")
        e2 = effs.get(2) or effs.get("2")
        if ceil and e2:
            out.append(f"  machine ceiling: 2 independent boards (core 0 + core 1) gave "
                       f"{ceil['speedup']['median']:.2f}x one board; K=2 pipeline "
                       f"{e2['speedup']:.2f}x = {e2['efficiency_vs_machine_ceiling']:.3f} of "
                       f"that (ideal {e2['ideal']:.3f})")
    pr = r.get("peak_rss_mib")
    if pr:
        out.append("(b) peak RSS (VmHWM) per board, MiB")
        for k, v in pr.items():
            ratio = r["peak_rss_ratio_vs_single"].get(k) or r["peak_rss_ratio_vs_single"].get(
                str(k))
            out.append(f"  K={k}: boards {', '.join(f'{x:.0f}' for x in v['boards'])}; largest/"
                       f"single {ratio if ratio is not None else 1.0:.2f}; idle board before "
                       f"load {v['idle_board_before_load'][0]:.0f}")
    tr = r.get("transport")
    if tr:
        out.append("(c) activation transfer, MB/s (median; send -> decode -> ack)")
        for name, v in tr["by_tensor"].items():
            out.append(f"  {name}: edgert CURVE {v['edgert_zmq_curve']['MBps']['median']:.0f}, "
                       f"plain {v['edgert_zmq_plain']['MBps']['median']:.0f}, CURVE stream "
                       f"{v['edgert_zmq_curve_stream']['MBps']['median']:.0f}; HTTP+JSON "
                       f"{v['http_json']['MBps']['median']:.1f} -> speedup "
                       f"{v['speedup_curve_vs_http_json']:.0f}x (CURVE), "
                       f"{v['speedup_plain_vs_http_json']:.0f}x (plain)")
    cv = r.get("convergence")
    if cv:
        out.append(f"(d) convergence, {cv['optimizer_steps']} steps x M={cv['micro_batches_per_step']}"
                   f" x B={cv['batch']}, {cv['heldout_examples']} held-out sentences")
        out.append(f"  before {100 * cv['before']['accuracy']:.2f}%; sync "
                   f"{100 * cv['sync']['heldout_accuracy']:.2f}%; async 2BW "
                   f"{100 * cv['async']['heldout_accuracy']:.2f}%; gap "
                   f"{cv['accuracy_gap_points_async_minus_sync']:+.2f} points "
                   f"(held-out SE ~{cv['heldout_binomial_se_points']:.1f})")
        if "sync_dropout_seed1" in cv:
            out.append(f"  noise yardstick: sync with other dropout seeds "
                       f"{100 * cv['sync_dropout_seed1']['heldout_accuracy']:.2f}% "
                       f"({cv['noise_ref_gap_points_sync_seed1_minus_sync']:+.2f} points vs sync)")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="a,b,c,d", help="comma list of a,b,c,d (a and b run together)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--micro", default="4,8",
                   help="micro-batches per step in (a); the first M is the headline and (b)")
    p.add_argument("--ks", default="2,3,4", help="board counts for (a)/(b), besides K = 1")
    p.add_argument("--steps", type=int, default=3, help="timed steps per round per K")
    p.add_argument("--reps", type=int, default=3, help="rounds (a, c)")
    p.add_argument("--zmq-msgs", type=int, default=40)
    p.add_argument("--http-msgs", type=int, default=2)
    p.add_argument("--conv-steps", type=int, default=40)
    p.add_argument("--conv-micro", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--no-conv-noise-ref", dest="conv_noise_ref", action="store_false",
                   help="skip (d)'s third run: sync again with other dropout seeds (noise yardstick)")
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args()
    a.ks = [int(x) for x in a.ks.split(",") if x]
    a.micro = [int(x) for x in a.micro.split(",") if x]
    parts = set(a.parts.split(","))

    r = json.loads(a.out.read_text()) if a.out.is_file() else {}
    r["what"] = ("edgert multi-board pipeline on one machine: boards = OS processes over CURVE "
                 "ZeroMQ on 127.0.0.1 (control.cluster.LocalCluster), MiniLM-L6 fp32")
    r["machine"] = machine_info()
    r["command"] = "python bench/bench_pipeline.py " + " ".join(sys.argv[1:])
    r.setdefault("loadavg", {})
    t_all = time.perf_counter()
    runs = [("c", part_transport), ("ab", part_throughput), ("d", part_convergence)]
    for tag, fn in runs:
        if not parts & set(tag):
            continue
        print(f"part {tag} ...", flush=True)
        la0, t0 = os.getloadavg(), time.perf_counter()
        r.update(fn(a))
        r["loadavg"][tag] = {"before": la0, "after": os.getloadavg(),
                             "seconds": time.perf_counter() - t0}
    r["seconds_this_run"] = time.perf_counter() - t_all
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(r, indent=1, default=float))
    tmp.replace(a.out)
    print(table(json.loads(a.out.read_text())))
    print(f"wrote {a.out} in {r['seconds_this_run']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
