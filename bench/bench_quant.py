"""Benchmark the quantized-weight GEMMs (compiler/kernels/qgemm.py) against the float32 GEMM.

Usage: ``python bench/bench_quant.py [--rows 64,1024] [--reps 30] [--rounds 5] [--only NAME]
[--out bench/results/quant.json]``; ``--tiny`` is a smoke run (two shapes, few reps, writes to a
temporary file unless --out is given).

For every projection GEMM of a MiniLM and a SmolLM2-135M layer (forward ``X W^T`` and data
gradient ``dY W``, with their fused bias / epilogue) and the SmolLM2 LM head (Q8_0: the
4096-row vocabulary slice forward, the 49152-long frozen-head data gradient), at the edge
micro-batch (2 x 32 = 64 rows) and at 8 x 128 = 1024 rows, the float32 kernel and the Q8_0 and
Q4_1 kernels are timed interleaved in one process (rounds of ``reps`` calls, min kept: the machine
is shared). GB/s counts the bytes a call must move: the weight as stored (4 bytes per weight in
float32, 34/32 in Q8_0, 20/32 in Q4_1) plus the float32 activations read and written.
Writes the ``gemm`` section of ``bench/results/quant.json`` (other sections are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))  # before importing tvm

import numpy as np
import tvm

from compiler import quant as Q
from compiler.arch import get_arch
from compiler.kernels.gemm import build_gemm
from compiler.kernels.qgemm import build_qgemm

#  name                 N      K   trans_b  bias  epilogue   formats   (M = rows)
SHAPES = [
    ("minilm_fwd_qkv",   1152,   384, True,  True,  None,       Q.BLOCK_BYTES),
    ("minilm_fwd_attn_out", 384, 384, True,  True,  None,       Q.BLOCK_BYTES),
    ("minilm_fwd_ffn_in", 1536,  384, True,  True,  None,       Q.BLOCK_BYTES),
    ("minilm_fwd_ffn_out", 384, 1536, True,  True,  None,       Q.BLOCK_BYTES),
    ("minilm_dX_qkv",     384,  1152, False, False, None,       Q.BLOCK_BYTES),
    ("minilm_dX_attn_out", 384,  384, False, False, None,       Q.BLOCK_BYTES),
    ("minilm_dX_ffn_out", 1536,  384, False, False, "gelu_grad", Q.BLOCK_BYTES),
    ("minilm_dX_ffn_in",  384,  1536, False, False, "add",      Q.BLOCK_BYTES),
    ("smol_fwd_qkv",      960,   576, True,  False, None,       Q.BLOCK_BYTES),
    ("smol_fwd_o",        576,   576, True,  False, None,       Q.BLOCK_BYTES),
    ("smol_fwd_gate_up", 3072,   576, True,  False, None,       Q.BLOCK_BYTES),
    ("smol_fwd_down",     576,  1536, True,  False, "add",      Q.BLOCK_BYTES),
    ("smol_dX_qkv",       576,   960, False, False, None,       Q.BLOCK_BYTES),
    ("smol_dX_o",         576,   576, False, False, None,       Q.BLOCK_BYTES),
    ("smol_dX_gate_up",   576,  3072, False, False, None,       Q.BLOCK_BYTES),
    ("smol_dX_down",     1536,   576, False, False, None,       Q.BLOCK_BYTES),
    ("smol_head_fwd_slice", 4096, 576, True, False, None,       ("q8_0",)),
    ("smol_head_dX",      576, 49152, False, False, None,       ("q8_0",)),
]


def _min_time(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _callable(f, ins, out_shape, arch):
    fn = tvm.compile(f, target=arch.tvm_target())["main"]
    args = [tvm.runtime.tensor(x) for x in ins] + [tvm.runtime.tensor(np.zeros(out_shape,
                                                                               "float32"))]
    fn(*args)
    return lambda: fn(*args)


def _variants(M, N, K, tb, bias, epi, fmts, arch, rng):
    """{"f32" | fmt: (run, bytes moved)} for one shape."""
    a = rng.standard_normal((M, K)).astype("float32")
    w = rng.standard_normal((N, K) if tb else (K, N)).astype("float32")
    rest = ([rng.standard_normal(N).astype("float32")] if bias else []) + (
        [rng.standard_normal((M, N)).astype("float32")] if epi in ("add", "gelu_grad") else [])
    act = 4 * (a.size + M * N + sum(x.size for x in rest))
    out = {"f32": (_callable(build_gemm(M, N, K, trans_b=tb, arch=arch, bias=bias, epilogue=epi),
                             [a, w, *rest], (M, N), arch), act + 4 * w.size)}
    for fmt in fmts:
        blocks = Q.quantize(w, fmt)
        f = build_qgemm(M, N, K, fmt=fmt, trans_b=tb, arch=arch, bias=bias, epilogue=epi)
        out[fmt] = (_callable(f, [a, blocks, *rest], (M, N), arch), act + blocks.nbytes)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="64,1024", help="M values (2x32 and 8x128 tokens)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", default="", help="substring of the shape names to run")
    ap.add_argument("--tiny", action="store_true", help="smoke run: 2 shapes, 64 rows, 3 reps")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    arch = get_arch("host")
    rows = [int(r) for r in args.rows.split(",")]
    shapes = [s for s in SHAPES if args.only in s[0]]
    if args.tiny:
        rows, shapes, args.reps, args.rounds = [64], [SHAPES[1], SHAPES[5]], 3, 1
    out = Path(args.out or (Path(tempfile.mkdtemp()) / "quant.json" if args.tiny
                            else ROOT / "bench/results/quant.json"))
    rng = np.random.default_rng(0)
    table = []
    print(f"threads {os.environ['TVM_NUM_THREADS']}, cpu {arch.target.get('mcpu')}, "
          f"{arch.vector_bits}-bit vectors")
    for M in rows:
        for name, N, K, tb, bias, epi, fmts in shapes:
            runs = _variants(M, N, K, tb, bias, epi, tuple(fmts), arch, rng)
            best = {k: float("inf") for k in runs}
            for _ in range(args.rounds):          # interleaved rounds, min per variant
                for k, (run, _) in runs.items():
                    time.sleep(0.02)
                    best[k] = min(best[k], _min_time(run, args.reps))
            row = {"name": name, "M": M, "N": N, "K": K, "trans_b": tb, "bias": bias,
                   "epilogue": epi}
            for k, (_, nbytes) in runs.items():
                row[k] = {"ms": best[k] * 1e3, "bytes": nbytes, "gb_s": nbytes / best[k] / 1e9,
                          "gflops": 2.0 * M * N * K / best[k] / 1e9}
                if k != "f32":
                    row[k]["time_ratio_vs_f32"] = best[k] / best["f32"]
            table.append(row)
            print(f"{name:22s} {M:5d}x{N:5d}x{K:5d} " + " | ".join(
                f"{k} {row[k]['ms']:7.3f} ms {row[k]['gb_s']:6.1f} GB/s"
                + (f" ({row[k]['time_ratio_vs_f32']:.2f}x)" if k != "f32" else "")
                for k in runs), flush=True)
    doc = json.loads(out.read_text()) if out.is_file() else {}
    doc["gemm"] = {"machine": {"cpu": arch.target.get("mcpu"), "threads": arch.threads,
                               "vector_bits": arch.vector_bits, "load_avg": os.getloadavg()},
                   "reps": args.reps, "rounds": args.rounds, "shapes": table}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
