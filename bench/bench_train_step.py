"""Benchmark: the compiled MiniLM-L6 train step vs PyTorch on the same shapes, in one run.

    .venv/bin/python bench/bench_train_step.py                # batch 8 x 128 tokens, all cores
    .venv/bin/python bench/bench_train_step.py --rounds 5 --steps 10

Measures, interleaving edgert and PyTorch rounds so that both see the same machine load:
  * the full train step (embeddings + 6 layers + head, forward + backward + AdamW; dropout on),
  * one stage of a 3-stage split (2 layers) forward + backward, and one layer forward / backward,
  * achieved GFLOP/s (matmul FLOPs: forward x 3 for a train step) against this machine's peak,
    measured in the same run as the best of PyTorch's 2048^3 sgemm (the "practical peak"),
  * where the time goes, per kernel (TVM VM instrumentation),
and writes bench/results/train_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))

import numpy as np  # noqa: E402

from bench.torch_baseline import _time, count_flops, torch_train_step_time  # noqa: E402
from compiler.arch import get_arch  # noqa: E402
from compiler.build import build_bundle, compile_stage  # noqa: E402
from compiler.model_spec import StageSpec  # noqa: E402
from control.job import load_model  # noqa: E402
from control.local import LocalPipeline, OptimConfig, seed_vec  # noqa: E402
from edgert.runtime import TvmStage  # noqa: E402


def _batch(B: int, T: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(1000, vocab, (B, T)).astype(np.int64),
            "token_type_ids": np.zeros((B, T), np.int64), "attention_mask": np.ones((B, T), np.int64),
            "labels": rng.integers(0, 2, B).astype(np.int64)}


def machine_info(threads: int, arch) -> dict:
    """What the numbers were measured on."""
    import psutil

    model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo", encoding="utf-8")
                  if ln.startswith("model name")), platform.processor())
    flags = next((ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo", encoding="utf-8")
                  if ln.startswith("flags")), [])
    return {"cpu": model, "llvm_cpu": arch.target.get("mcpu"), "isa": platform.machine(),
            "simd": sorted(f for f in flags if f.startswith(("avx512f", "avx2", "fma"))),
            "cores": os.cpu_count(), "threads_used": threads,
            "memory_gib": round(psutil.virtual_memory().total / 2 ** 30, 1), "os": platform.platform()}


def nominal_peak(threads: int, arch) -> float | None:
    """Paper peak from the CPU's nominal clock (AVX-512 clocks are usually lower in practice)."""
    import re

    model = machine_info(threads, arch)["cpu"]
    m = re.search(r"@\s*([0-9.]+)\s*GHz", model)
    if not m:
        return None
    return threads * 2 * (arch.vector_bits // 32) * 2 * float(m.group(1))


def measure_peak(threads: int) -> float:
    """Practical fp32 peak: the best GFLOP/s of PyTorch's 2048^3 sgemm (MKL/oneDNN) here, now."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = min(_time(lambda: a @ b, 10, 0))
    return 2 * 2048 ** 3 / (best / 1e3) / 1e9


def kernel_profile(bundle: Path, build_info: Path, data: list, seed, reps: int = 3) -> list[tuple[str, float, int]]:
    """(kernel, ms per call summed over one forward+backward, calls) from VM instrumentation."""
    import tvm
    from tvm import relax

    st = TvmStage.load(bundle)
    ex = tvm.runtime.load_module(str(bundle / "stage.so"))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    acc: dict[str, list[float]] = {}
    t0: dict[str, float] = {}

    def instrument(func, name, before_run, ret_val, *args):
        if before_run:
            t0[name] = time.perf_counter()
        else:
            acc.setdefault(name, []).append((time.perf_counter() - t0[name]) * 1e3)
        return 0

    vm.set_instrument(instrument)
    params = [tvm.runtime.tensor(p) for p in st.params_numpy().values()]
    args = [tvm.runtime.tensor(a) for a in data]
    sd = tvm.runtime.tensor(seed)
    for _ in range(reps):
        out = vm["stage_forward"](*args, sd, *params)
        n_out = len(st.manifest.outputs)
        saved = list(out)[n_out:]
        dout = tvm.runtime.tensor(np.ones(st.manifest.outputs[0].shape, np.float32)) \
            if not st.manifest.is_last else tvm.runtime.tensor(np.ones(1, np.float32))
        vm["stage_backward"](*saved, dout, sd, *params)
    keys = json.loads(build_info.read_text())["kernel_keys"]
    rows = []
    for k, v in acc.items():
        if not k.startswith("k") or "_" not in k:
            continue
        i = int(k[1:].split("_", 1)[0])
        desc = keys[i] if keys and i < len(keys) else k
        rows.append((desc, sum(v) / reps, len(v) // reps))
    merged: dict[str, list] = {}
    for desc, ms, n in rows:   # kernels differing only in their dropout salt are one workload
        key = desc.split(", ('salt'")[0] if "salt" in desc else desc
        m = merged.setdefault(key, [key, 0.0, 0])
        m[1] += ms
        m[2] += n
    return sorted((tuple(m) for m in merged.values()), key=lambda r: -r[1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/train_step.json")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgert-bench"))
    ap.add_argument("--tuning-db", type=Path, default=ROOT / "bench/results/tuning_db_host.json",
                    help="also measure a build with this board's tuned kernel configs (edgert tune)")
    a = ap.parse_args(argv)
    B, T = a.batch, a.seq
    model = load_model()
    d = model.dims
    arch = get_arch("host", a.threads)

    t = time.perf_counter()
    full = build_bundle(a.work / "full" / "stage0", d, StageSpec(0, 1, 0, d.layers, B, T), arch,
                        model.weights, model.model_id, model.sha256)
    compile_full = full.compile_seconds
    build_bundle(a.work / "mid" / "stage0", d, StageSpec(1, 3, 2, 4, B, T), arch, model.weights,
                 model.model_id, model.sha256)
    build_bundle(a.work / "layer" / "stage0", d, StageSpec(1, 3, 2, 3, B, T), arch, model.weights,
                 model.model_id, model.sha256)
    print(f"compiled in {time.perf_counter() - t:.1f}s (full model: {compile_full:.1f}s)", file=sys.stderr)
    tuned_pipe, tuned_info = None, {"db": None}
    if a.tuning_db and a.tuning_db.is_file():
        from compiler.kernel_tuning import board_configs

        cfgs = board_configs(arch, a.tuning_db)
        if cfgs:
            tm = build_bundle(a.work / "tuned" / "stage0", d, StageSpec(0, 1, 0, d.layers, B, T), arch,
                              model.weights, model.model_id, model.sha256, configs=cfgs)
            tuned_pipe = LocalPipeline([a.work / "tuned" / "stage0"], threads=a.threads)
            db = json.loads(a.tuning_db.read_text())
            tuned_info = {"db": str(a.tuning_db.relative_to(ROOT)) if a.tuning_db.is_relative_to(ROOT)
                          else str(a.tuning_db), "configs_used": len(cfgs),
                          "compile_seconds": tm.compile_seconds,
                          "candidates_timed": sum(len(r.get("candidates", [])) for r in db["records"]),
                          "note": "tuning time is printed by `edgert tune` (bench/results/tuning.txt)"}

    pipe = LocalPipeline([a.work / "full" / "stage0"], threads=a.threads)
    batch = _batch(B, T, d.vocab)
    opt = OptimConfig(lr=1e-5)
    mid = TvmStage.load(a.work / "mid" / "stage0")
    lay = TvmStage.load(a.work / "layer" / "stage0")
    rng = np.random.default_rng(1)
    h = rng.standard_normal((B * T, d.hidden)).astype(np.float32)
    dh = rng.standard_normal((B * T, d.hidden)).astype(np.float32)
    mask = np.ones((B, T), np.int64)
    sd = seed_vec(7, True)

    def stage_fb(st):
        outs, saved = st.forward([h, mask], sd)
        st.backward(saved, dh, sd)

    res = {"ours_step": [], "torch_step": [], "ours_stage": [], "ours_layer_fwd": [], "ours_layer_bwd": [],
           "torch_layer_fwd": [], "torch_layer_fwdbwd": [], "peak": [], "torch_step_nodrop": [],
           "ours_step_tuned": []}
    pipe.train_step([batch], opt)  # warm-up
    for r in range(a.rounds):
        res["peak"].append(measure_peak(a.threads))
        res["ours_step"] += _time(lambda: pipe.train_step([batch], opt), a.steps, 0)
        if tuned_pipe is not None:
            res["ours_step_tuned"] += _time(lambda: tuned_pipe.train_step([batch], opt), a.steps, 0)
        res["ours_stage"] += _time(lambda: stage_fb(mid), a.steps, 0)
        outs, saved = lay.forward([h, mask], sd)
        res["ours_layer_fwd"] += _time(lambda: lay.forward([h, mask], sd), a.steps, 0)
        res["ours_layer_bwd"] += _time(lambda: lay.backward(saved, dh, sd), a.steps, 0)
        tt = torch_train_step_time(B, T, threads=a.threads, steps=a.steps, dropout=True, warmup=1,
                                   layer_steps=a.steps)
        res["torch_step"].append(tt.min_ms)
        res["torch_layer_fwd"].append(tt.layer_fwd_min_ms)
        res["torch_layer_fwdbwd"].append(tt.layer_fwdbwd_min_ms)
        res["torch_step_nodrop"].append(torch_train_step_time(B, T, threads=a.threads, steps=a.steps,
                                                              dropout=False, warmup=1, layer_steps=1).min_ms)
        print(f"round {r + 1}: ours {min(res['ours_step']):.0f} ms, torch {tt.min_ms:.0f} ms",
              file=sys.stderr)

    fl = count_flops(model.config, B, T)
    peak = max(res["peak"])
    ours, torch_ms = min(res["ours_step"]), min(res["torch_step"])
    lib, _ = compile_stage(d, StageSpec(0, 1, 0, d.layers, B, T), arch)   # cached: its build.json
    prof = kernel_profile(a.work / "full" / "stage0", lib.parent / "build.json", [batch["input_ids"], batch["token_type_ids"],
                                                      batch["attention_mask"], batch["labels"]], sd)
    total_prof = sum(r[1] for r in prof)
    out = {
        "what": "MiniLM-L6 train step (fwd + bwd + AdamW, dropout on), batch %d x seq %d, fp32" % (B, T),
        "machine": machine_info(a.threads, arch),
        "command": "python bench/bench_train_step.py " + " ".join(argv or sys.argv[1:]),
        "train_step_ms": {"edgert_min": ours, "edgert_median": statistics.median(res["ours_step"]),
                          "torch_min": torch_ms, "torch_median": statistics.median(res["torch_step"])},
        "train_step_ratio_vs_torch": ours / torch_ms,
        "torch_without_dropout_ms": min(res["torch_step_nodrop"]),
        "train_step_ratio_vs_torch_without_dropout": ours / min(res["torch_step_nodrop"]),
        "train_step_gflop": 3 * fl.model / 1e9,
        "achieved_gflops": 3 * fl.model / (ours / 1e3) / 1e9,
        "torch_achieved_gflops": 3 * fl.model / (torch_ms / 1e3) / 1e9,
        "peak_gflops_measured": peak,
        "peak_how": "best of torch 2048^3 sgemm in this run (practical peak)",
        "peak_fraction": 3 * fl.model / (ours / 1e3) / 1e9 / peak,
        "peak_gflops_nominal": nominal_peak(a.threads, arch),
        "peak_nominal_how": "threads x 2 FMA units x (SIMD bits / 32) lanes x 2 FLOP x nominal GHz",
        "torch_peak_fraction": 3 * fl.model / (torch_ms / 1e3) / 1e9 / peak,
        "stage_2_layers_fwd_bwd_ms": min(res["ours_stage"]),
        "layer_ms": {"edgert_fwd": min(res["ours_layer_fwd"]), "edgert_bwd": min(res["ours_layer_bwd"]),
                     "edgert_fwd_bwd": min(res["ours_layer_fwd"]) + min(res["ours_layer_bwd"]),
                     "torch_fwd": min(res["torch_layer_fwd"]), "torch_fwd_bwd": min(res["torch_layer_fwdbwd"])},
        "compile_seconds_full_model": compile_full,
        "tuning": "headline numbers use the default schedules (no tuning database)",
        "tuned": {**tuned_info,
                  **({"train_step_ms_min": min(res["ours_step_tuned"]),
                      "train_step_ratio_vs_torch": min(res["ours_step_tuned"]) / torch_ms,
                      "vs_untuned": min(res["ours_step_tuned"]) / ours}
                     if res["ours_step_tuned"] else {})},
        "kernel_profile_ms": [{"kernel": k, "ms": round(ms, 3), "calls": n,
                               "share": round(ms / total_prof, 4)} for k, ms, n in prof[:15]],
        "kernel_profile_total_fwd_bwd_ms": total_prof,
        "load_average": os.getloadavg(),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("train_step_ms", "train_step_ratio_vs_torch",
                                          "train_step_ratio_vs_torch_without_dropout", "achieved_gflops",
                                          "peak_gflops_measured", "peak_fraction", "layer_ms")}, indent=1))
    for row in out["kernel_profile_ms"]:
        print(f"  {row['kernel'][:90]:90s} {row['ms']:8.2f} ms  x{row['calls']:<3d} {100 * row['share']:5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
