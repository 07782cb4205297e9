"""Benchmark the non-matmul kernels at MiniLM-L6 training shapes vs the torch equivalents.

    .venv/bin/python bench/bench_misc.py [--quick]

Prints ms (min / median over repeats; torch and TVM phases alternate) and effective GB/s (minimum bytes a kernel must move: every
input read once, every output written once, computed from the min time) for each TVM kernel and the
torch op doing the same work, measured interleaved in this process with torch.set_num_threads equal
to the TVM thread count. Writes bench/results/misc_kernels.json.
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Both runtimes' worker threads spin-wait for a while after a parallel region; interleaved in one
# process the spinning pool of one steals the cores from the other, so measurements of the two are
# separated by a short sleep (longer than either spin phase).

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import tvm  # noqa: E402

from compiler.arch import get_arch  # noqa: E402
from compiler.kernels import elementwise as E  # noqa: E402
from compiler.kernels import embed as EM  # noqa: E402
from compiler.kernels import norm as N  # noqa: E402
from compiler.kernels import optim as O  # noqa: E402

B, T, D, FF, V, P, NT = 8, 128, 384, 1536, 30522, 512, 2
M = B * T
NPARAM = 22_713_216  # ~MiniLM-L6 (+classifier) parameter count, as one flat buffer


def tvm_timer(f, args, arch):
    mod = tvm.compile(f, target=arch.tvm_target())
    targs = [tvm.runtime.tensor(a) for a in args]
    fn = mod["main"]

    def run(number):
        fn(*targs)  # warm-up
        t0 = time.perf_counter()
        for _ in range(number):
            fn(*targs)
        return (time.perf_counter() - t0) / number * 1e3

    return run


def torch_timer(fn):
    def run(number):
        with torch.no_grad():
            fn()  # warm-up
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            return (time.perf_counter() - t0) / number * 1e3

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repeats, small AdamW buffer")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "misc_kernels.json"))
    a = ap.parse_args()
    arch = get_arch("host")
    torch.set_num_threads(arch.threads)
    rep = 2 if a.quick else 3
    nparam = 1 << 20 if a.quick else NPARAM
    rng = np.random.default_rng(0)
    f32 = lambda *s: rng.standard_normal(s).astype("float32")  # noqa: E731
    z32 = lambda *s: np.zeros(s, "float32")  # noqa: E731
    seed = np.array([42], "int64")
    ids = rng.integers(0, V, (B, T)).astype("int64")
    tt = rng.integers(0, NT, (B, T)).astype("int64")
    word, pos, typ = f32(V, D), f32(P, D), f32(NT, D)
    x, r, g, b = f32(M, D), f32(M, D), f32(D), f32(D)
    u = f32(M, FF)
    tx, tr, tg, tb, tu = (torch.from_numpy(v) for v in (x, r, g, b, u))
    tids, ttt = torch.from_numpy(ids), torch.from_numpy(tt)
    tword, tpos, ttyp = (torch.from_numpy(v) for v in (word, pos, typ))
    pbuf, gbuf = f32(nparam), f32(nparam)
    hyper = np.array(O.adamw_hyper(1e-4, 0.9, 0.999, 1e-8, 0.01, 3), "float32")
    tparam = torch.nn.Parameter(torch.from_numpy(pbuf.copy()))
    tparam.grad = torch.from_numpy(gbuf)
    topt = torch.optim.AdamW([tparam], lr=1e-4, weight_decay=0.01, foreach=False, fused=False)
    topt.step()
    tacc = torch.from_numpy(pbuf.copy())
    tgb = torch.from_numpy(gbuf)
    tdy = torch.from_numpy(f32(M, D))
    tdyf = torch.from_numpy(f32(M, FF))
    tflat = torch.from_numpy(ids.reshape(-1))
    bytes4 = lambda *n: 4 * sum(int(np.prod(s)) for s in n)  # noqa: E731

    cases = [
        # name, tvm builder, tvm args, bytes moved, torch name, torch fn
        ("layernorm_fwd (resid, p=0.1)",
         N.build_layernorm_fwd(M, D, eps=1e-12, arch=arch, dropout=0.1, salt=1),
         [x, r, g, b, seed, z32(M, D), z32(M, D), z32(M)], bytes4((M, D), (M, D), (M, D), (M, D)),
         "F.layer_norm(F.dropout(x)+r)",
         lambda: F.layer_norm(F.dropout(tx, 0.1, True) + tr, (D,), tg, tb, 1e-12)),
        ("layernorm_fwd (resid, p=0)",
         N.build_layernorm_fwd(M, D, eps=1e-12, arch=arch),
         [x, r, g, b, seed, z32(M, D), z32(M, D), z32(M)], bytes4((M, D), (M, D), (M, D), (M, D)),
         "F.layer_norm(x+r)", lambda: F.layer_norm(tx + tr, (D,), tg, tb, 1e-12)),
        ("layernorm_fwd (no resid)",
         N.build_layernorm_fwd(M, D, eps=1e-12, arch=arch, residual=False),
         [x, g, b, seed, z32(M, D), z32(M, D), z32(M)], bytes4((M, D), (M, D), (M, D)),
         "F.layer_norm(x)", lambda: F.layer_norm(tx, (D,), tg, tb, 1e-12)),
        ("layernorm_bwd (p=0.1)",
         N.build_layernorm_bwd(M, D, arch=arch, dropout=0.1, salt=1),
         [f32(M, D), x, np.abs(f32(M)) + 1, g, seed, z32(M, D), z32(D), z32(D), z32(M, D)],
         bytes4((M, D), (M, D), (M, D), (M, D)),
         "aten.native_layer_norm_backward",
         (lambda mean=torch.zeros(M, 1), rs=torch.ones(M, 1): torch.ops.aten.native_layer_norm_backward(
             tdy, tx, [D], mean, rs, tg, tb, [True, True, True]))),
        ("gelu 1024x1536", E.build_gelu(M, FF, arch=arch), [u, z32(M, FF)], bytes4((M, FF), (M, FF)),
         "F.gelu", lambda: F.gelu(tu)),
        ("gelu_bwd 1024x1536", E.build_gelu_bwd(M, FF, arch=arch), [f32(M, FF), u, z32(M, FF)],
         bytes4((M, FF), (M, FF), (M, FF)), "aten.gelu_backward",
         lambda: torch.ops.aten.gelu_backward(tdyf, tu)),
        ("dropout 1024x384 p=0.1", E.build_dropout(M, D, p=0.1, salt=2, arch=arch),
         [x, seed, z32(M, D)], bytes4((M, D), (M, D)), "F.dropout",
         lambda: F.dropout(tx, 0.1, True)),
        ("bias_grad 1024x384", E.build_bias_grad(M, D, arch=arch), [x, z32(D)], bytes4((M, D)),
         "dy.sum(0)", lambda: tx.sum(0)),
        ("bias_grad 1024x1536", E.build_bias_grad(M, FF, arch=arch), [u, z32(FF)], bytes4((M, FF)),
         "dy.sum(0)", lambda: tu.sum(0)),
        ("embed_fwd", EM.build_embed_fwd(B, T, V, D, P, NT, arch=arch),
         [ids, tt, word, pos, typ, z32(M, D)], bytes4((M, D), (M, D), (M, D), (M, D)),
         "3x F.embedding + add",
         lambda: (F.embedding(tids, tword) + tpos[:T] + F.embedding(ttt, ttyp)).reshape(M, D)),
        ("embed_bwd (dword 30522x384)", EM.build_embed_bwd(B, T, V, D, P, NT, arch=arch),
         [ids, tt, x, z32(V, D), z32(P, D), z32(NT, D)], bytes4((M, D), (V, D), (P, D), (NT, D)),
         "aten.embedding_dense_backward (word+type) + sum",
         lambda: (torch.ops.aten.embedding_dense_backward(tdy, tflat, V, -1, False),
                  tdy.reshape(B, T, D).sum(0),
                  torch.ops.aten.embedding_dense_backward(tdy, ttt.reshape(-1), NT, -1, False))),
        (f"adamw n={nparam}", O.build_adamw(nparam, arch=arch),
         [pbuf, gbuf, z32(nparam), np.abs(f32(nparam)), hyper, z32(nparam), z32(nparam), z32(nparam)],
         bytes4(*[(nparam,)] * 7), "torch.optim.AdamW.step (single tensor)", topt.step),
        (f"accumulate n={nparam}", E.build_accumulate(nparam, arch=arch),
         [pbuf, gbuf, z32(nparam)], bytes4(*[(nparam,)] * 3), "acc.add_(g)",
         lambda: tacc.add_(tgb)),
        (f"sumsq n={nparam}", E.build_sumsq(nparam, arch=arch), [pbuf, z32(1)], bytes4((nparam,)),
         "torch.dot(x,x)", lambda: torch.dot(tacc, tacc)),
    ]
    # All kernels are compiled first. Then phases alternate: every torch op, every TVM kernel, ...
    # (`rounds` times). Running the two runtimes in separate phases keeps one's spinning worker
    # threads from stealing the 2 cores from the other; alternating phases exposes both to the
    # same load changes of the shared machine. Reported: min and median over all repeats.
    timers = [(tvm_timer(f, args, arch), torch_timer(tfn)) for _, f, args, _, _, tfn in cases]
    tv_res = [[] for _ in cases]
    th_res = [[] for _ in cases]
    rounds = 2 if a.quick else 3
    for _ in range(rounds):
        for k, (_, _, _, nbytes, _, _) in enumerate(cases):
            number = 3 if nbytes > 64 << 20 else 20
            th_res[k] += [timers[k][1](number) for _ in range(rep)]
        time.sleep(0.5)
        for k, (_, _, _, nbytes, _, _) in enumerate(cases):
            number = 3 if nbytes > 64 << 20 else 20
            tv_res[k] += [timers[k][0](number) for _ in range(rep)]
        time.sleep(0.5)
    rows = []
    print(f"threads={arch.threads} target={arch.target} load={os.getloadavg()}")
    print(f"{'kernel':34s} {'tvm ms min/med':>16s} {'GB/s':>6s} | {'torch ms min/med':>16s} {'GB/s':>6s}  torch op")
    for k, (name, f, args, nbytes, tname, tfn) in enumerate(cases):
        tv, th = tv_res[k], th_res[k]
        row = dict(kernel=name, bytes=nbytes, tvm_ms_min=min(tv), tvm_ms_median=statistics.median(tv),
                   tvm_gbps=nbytes / min(tv) / 1e6, torch_op=tname, torch_ms_min=min(th),
                   torch_ms_median=statistics.median(th), torch_gbps=nbytes / min(th) / 1e6)
        rows.append(row)
        print(f"{name:34s} {row['tvm_ms_min']:7.3f}/{row['tvm_ms_median']:7.3f} {row['tvm_gbps']:6.1f} | "
              f"{row['torch_ms_min']:7.3f}/{row['torch_ms_median']:7.3f} {row['torch_gbps']:6.1f}  {tname}",
              flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(
        machine=platform.processor() or platform.machine(), threads=arch.threads,
        target=arch.target, torch=torch.__version__, tvm=tvm.__version__,
        loadavg_end=os.getloadavg(), note="GB/s = minimal bytes / min time; machine is shared",
        results=rows), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
