"""Attention core kernels (compiler/kernels/attention.py) vs torch on this host.

Writes bench/results/attention.json: min ms over many reps of the TVM fwd / bwd kernels and of the
equivalent torch float32 ops (q@k^T*scale + mask bias, softmax, @v; and autograd backward of that
w.r.t. q, k, v) at MiniLM-L6 attention shape B=8, T=128, H=12, d=32, both in this process with
torch.set_num_threads(arch.threads). Usage: python bench/bench_attention.py [--reps N] [--dropout P]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
# TVM's thread pool defaults to 1 worker on this 2-vCPU VM (it halves hardware_concurrency);
# runtime.config_threadpool does not raise it. Must be set before tvm is imported.
os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))

import torch  # noqa: E402
import tvm  # noqa: E402

from compiler.arch import get_arch  # noqa: E402
from compiler.kernels.attention import build_attention_bwd, build_attention_fwd  # noqa: E402


def _min_ms(fn, reps, rounds=5):
    time.sleep(0.3)  # let the other runtime's pool threads stop spinning (2 shared cores)
    fn()
    best = float("inf")
    for _ in range(rounds):
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "attention.json"))
    a = ap.parse_args(argv)
    B, T, H, d = 8, 128, 12, 32
    arch = get_arch("host")
    torch.set_num_threads(arch.threads)
    tvm_threads = tvm.get_global_func("runtime.NumThreads")()
    dev = tvm.cpu()
    t0 = time.time()
    fwd = tvm.compile(build_attention_fwd(B, T, H, d, arch=arch, dropout=a.dropout, salt=1),
                      target=arch.tvm_target())
    bwd = tvm.compile(build_attention_bwd(B, T, H, d, arch=arch, dropout=a.dropout, salt=1),
                      target=arch.tvm_target())
    compile_s = time.time() - t0
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((B * T, 3 * H * d)).astype("float32")
    mask = np.ones((B, T), "float32")
    mask[:, 100:] = 0.0
    dctx = rng.standard_normal((B * T, H * d)).astype("float32")
    tt = lambda x: tvm.runtime.tensor(x, dev)  # noqa: E731
    a_qkv, a_mask, a_seed, a_dctx = tt(qkv), tt(mask), tt(np.array([5], "int64")), tt(dctx)
    a_ctx, a_p = tt(np.zeros((B * T, H * d), "float32")), tt(np.zeros((B, H, T, T), "float32"))
    a_dqkv = tt(np.zeros((B * T, 3 * H * d), "float32"))
    f_tvm = lambda: fwd(a_qkv, a_mask, a_seed, a_ctx, a_p)  # noqa: E731
    b_tvm = lambda: bwd(a_qkv, a_p, a_dctx, a_seed, a_dqkv)  # noqa: E731

    x = torch.from_numpy(qkv).view(B, T, 3, H, d).permute(2, 0, 3, 1, 4).contiguous()
    q, k, v = (t.clone().requires_grad_(True) for t in x)
    bias = ((1.0 - torch.from_numpy(mask)) * -1e9)[:, None, None, :]
    g = torch.from_numpy(dctx).view(B, T, H, d).permute(0, 2, 1, 3).contiguous()
    scale = 1.0 / math.sqrt(d)

    def t_fwd():
        with torch.no_grad():
            p = torch.softmax(q @ k.transpose(-1, -2) * scale + bias, dim=-1)
            return p @ v

    p_ = torch.softmax(q @ k.transpose(-1, -2) * scale + bias, dim=-1)
    drop = torch.nn.functional.dropout(p_, a.dropout) if a.dropout > 0 else p_
    out = drop @ v
    t_bwd = lambda: torch.autograd.grad(out, (q, k, v), g, retain_graph=True)  # noqa: E731

    res = {"shape": dict(B=B, T=T, H=H, d=d), "dropout": a.dropout, "threads": arch.threads,
           "tvm_threads": tvm_threads, "target": arch.target, "compile_s": round(compile_s, 2),
           "reps": a.reps}
    # interleave to share the (noisy, shared) machine state fairly
    for name, fn in [("tvm_fwd_ms", f_tvm), ("torch_fwd_ms", t_fwd), ("tvm_bwd_ms", b_tvm),
                     ("torch_bwd_ms", t_bwd)] * 2:
        res[name] = round(min(res.get(name, float("inf")), _min_ms(fn, a.reps)), 4)
    res["fwd_ratio_tvm_over_torch"] = round(res["tvm_fwd_ms"] / res["torch_fwd_ms"], 3)
    res["bwd_ratio_tvm_over_torch"] = round(res["tvm_bwd_ms"] / res["torch_bwd_ms"], 3)
    res["loadavg"] = os.getloadavg()
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=2)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
