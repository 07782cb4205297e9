"""Benchmark `compiler.kernels.gemm` on the MiniLM training shapes against torch.matmul.

Usage: ``python bench/bench_gemm.py [--reps 60] [--rounds 5] [--tune] [--only NAME]``

For each shape the TVM kernel and the torch op with the same operand layout are timed interleaved in
one process (rounds of ``reps`` calls each, short sleeps between so that neither thread pool is still
spinning), and the MIN time is kept: the machine is shared, so the minimum is the least noisy
estimate. "Peak" is measured, not assumed: the best large-square sgemm rate of torch (MKL/oneDNN) on
the same threads, next to the nominal 2 cores x 2 FMA x 16 lanes x 2 flop x 2.5 GHz.
Writes ``bench/results/gemm.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))  # before importing tvm

import numpy as np  # noqa: E402
import torch  # noqa: E402
import tvm  # noqa: E402

from compiler.arch import get_arch  # noqa: E402
from compiler.kernels.gemm import build_gemm, config_space, default_config  # noqa: E402

#            name            M     N     K  trans_a trans_b  bias  epilogue
SHAPES = [
    ("fwd_qkv",           1024, 1152,  384, False, True,  True,  None),
    ("fwd_attn_out",      1024,  384,  384, False, True,  True,  None),
    ("fwd_ffn_in_gelu",   1024, 1536,  384, False, True,  True,  "gelu"),
    ("fwd_ffn_out",       1024,  384, 1536, False, True,  True,  None),
    ("dX_qkv",            1024,  384, 1152, False, False, False, None),
    ("dX_attn_out_add",   1024,  384,  384, False, False, False, "add"),
    ("dX_ffn_out_gelugr", 1024, 1536,  384, False, False, False, "gelu_grad"),
    ("dX_ffn_in_add",     1024,  384, 1536, False, False, False, "add"),
    ("dW_qkv",            1152,  384, 1024, True,  False, False, None),
    ("dW_attn_out",        384,  384, 1024, True,  False, False, None),
    ("dW_ffn_out",        1536,  384, 1024, True,  False, False, None),
    ("dW_ffn_in",          384, 1536, 1024, True,  False, False, None),
    ("pooler",               8,  384,  384, False, True,  True,  None),
    ("classifier",           8,    2,  384, False, True,  True,  None),
]


def _min_time(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _operands(M, N, K, ta, tb, bias, epilogue, rng):
    a = rng.standard_normal((K, M) if ta else (M, K)).astype("float32")
    b = rng.standard_normal((N, K) if tb else (K, N)).astype("float32")
    ins = [a, b] + ([rng.standard_normal(N).astype("float32")] if bias else [])
    if epilogue in ("add", "gelu_grad"):
        ins.append(rng.standard_normal((M, N)).astype("float32"))
    return ins


def _torch_fns(ins, ta, tb, bias, epilogue):
    t = [torch.from_numpy(x) for x in ins]
    a = t[0].t() if ta else t[0]
    b = t[1].t() if tb else t[1]
    out = torch.empty(a.shape[0], b.shape[1])

    def mm():  # the GEMM alone (bias via addmm, as nn.Linear does)
        if bias:
            torch.addmm(t[2], a, b, out=out)
        else:
            torch.matmul(a, b, out=out)

    def fused():  # GEMM + the epilogue as torch runs it (separate ops)
        mm()
        if epilogue == "gelu":
            torch.nn.functional.gelu(out)
        elif epilogue == "add":
            out.add_(t[-1])
        elif epilogue == "gelu_grad":
            u = t[-1]
            cdf = 0.5 * (1.0 + torch.erf(u * 0.7071067811865476))
            out.mul_(cdf + u * torch.exp(-0.5 * u * u) * 0.3989422804014327)
    return mm, fused


def _tvm_fn(M, N, K, ta, tb, bias, epilogue, cfg, arch, ins):
    f = build_gemm(M, N, K, trans_a=ta, trans_b=tb, arch=arch, config=cfg, bias=bias, epilogue=epilogue)
    fn = tvm.compile(f, target=arch.tvm_target())["main"]
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(x, dev) for x in ins] + [tvm.runtime.tensor(np.zeros((M, N), "float32"), dev)]
    return (lambda: fn(*args)), args[-1]


def measure_peak(reps: int) -> dict:
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = min(_min_time(lambda: a @ b.t(), max(3, reps // 10)), _min_time(lambda: a @ b, max(3, reps // 10)))
    threads = torch.get_num_threads()
    return {"measured_gflops": 2 * n**3 / best / 1e9,
            "how": f"torch {n}x{n}x{n} sgemm (NN/NT best), {threads} threads, min time",
            "nominal_gflops": threads * 2 * 16 * 2 * 2.5,
            "nominal_how": f"{threads} cores x 2 FMA x 16 lanes x 2 flop x 2.5 GHz (AVX-512 clocks are lower)"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tune", action="store_true", help="time every config_space() candidate")
    ap.add_argument("--only", default="")
    ap.add_argument("--out", default=str(ROOT / "bench/results/gemm.json"))
    args = ap.parse_args()
    arch = get_arch("host")
    torch.set_num_threads(arch.threads)
    rng = np.random.default_rng(0)
    peak = measure_peak(args.reps)
    print(f"threads: tvm {os.environ['TVM_NUM_THREADS']} torch {torch.get_num_threads()}; "
          f"peak {peak['measured_gflops']:.1f} GF/s measured, {peak['nominal_gflops']:.0f} nominal")
    rows = []
    for name, M, N, K, ta, tb, bias, epi in SHAPES:
        if args.only and args.only not in name:
            continue
        ins = _operands(M, N, K, ta, tb, bias, epi, rng)
        mm, fused = _torch_fns(ins, ta, tb, bias, epi)
        cfgs = [default_config(M, N, K, trans_a=ta, trans_b=tb, arch=arch)]
        if args.tune:
            cfgs += [c for c in config_space(M, N, K, trans_a=ta, trans_b=tb, arch=arch) if c != cfgs[0]]
        best_cfg, t_tvm = None, float("inf")
        t_mm = t_fused = float("inf")
        for cfg in cfgs:
            run, _ = _tvm_fn(M, N, K, ta, tb, bias, epi, cfg, arch, ins)
            run()
            rounds = args.rounds if cfg is cfgs[0] or not args.tune else 2
            t = float("inf")
            for _ in range(rounds):
                time.sleep(0.05)
                t = min(t, _min_time(run, args.reps))
                time.sleep(0.05)
                t_mm = min(t_mm, _min_time(mm, args.reps))
                t_fused = min(t_fused, _min_time(fused, args.reps)) if epi else t_mm
            if t < t_tvm:
                best_cfg, t_tvm = cfg, t
        flops = 2.0 * M * N * K
        row = {"name": name, "M": M, "N": N, "K": K, "trans_a": ta, "trans_b": tb, "bias": bias,
               "epilogue": epi, "config": best_cfg, "tvm_ms": t_tvm * 1e3,
               "tvm_gflops": flops / t_tvm / 1e9, "torch_ms": t_mm * 1e3,
               "torch_gflops": flops / t_mm / 1e9, "torch_with_epilogue_ms": t_fused * 1e3,
               "ratio_tvm_over_torch": t_tvm / t_mm,
               "fraction_of_measured_peak": flops / t_tvm / 1e9 / peak["measured_gflops"]}
        rows.append(row)
        print(f"{name:18s} {M:5d}x{N:5d}x{K:5d} tvm {row['tvm_ms']:7.3f} ms {row['tvm_gflops']:6.1f} GF/s | "
              f"torch {row['torch_ms']:7.3f} ms (+epi {row['torch_with_epilogue_ms']:7.3f}) | "
              f"ratio {row['ratio_tvm_over_torch']:.2f} | {row['fraction_of_measured_peak']:.0%} peak | {best_cfg}",
              flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"peak": peak, "threads": arch.threads, "cpu": arch.target.get("mcpu"),
                                          "load_avg": os.getloadavg(), "shapes": rows}, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
