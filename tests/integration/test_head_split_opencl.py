"""Head-subset attention kernels generated for Mali / Adreno (OpenCL) run on PoCL and compose exactly.

The backend scheduler (docs/head_split.md) runs heads [0, k) on one backend and [k, H) on another.
For the GPU side, the compiler emits the same head-subset TE kernels, scheduled by dlight for the
OpenCL target. Here every generated kernel of the split at k runs on PoCL through pyopencl (TVM's
PyPI runtime has no OpenCL device API), and the two parts, put back together (ctx and probs
concatenated by head, dqkv scattered to its columns), must equal the full-head kernel compiled for
the host CPU: for k = 1, H/2 and H-1, forward and backward, dropout on.

Tolerance: float32 round-off of a different compiler and vector width (PoCL's LLVM vs TVM's), so
max|diff| <= 1e-5 x max(1, max|ref|); measured ~1e-7.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import tvm

from compiler import build_inspect as ci
from compiler.arch import get_arch
from compiler.kernels.attention import build_attention_bwd, build_attention_fwd, subset_columns
from edgert.contract import kernel_name
from tests.pocl_util import pocl_context, run_pocl

B, T, H, d, P_DROP, SALT = 2, 16, 12, 32, 0.1, 7
SPLITS = (1, H // 2, H - 1)
TOL = 1e-5


def _library(arch, heads_list):
    funcs = {}
    for heads in heads_list:
        for direction, build in (("fwd", build_attention_fwd), ("bwd", build_attention_bwd)):
            name = kernel_name(direction, *heads)
            f = build(B, T, H, d, dtype="float32", arch=arch, dropout=P_DROP, salt=SALT,
                      heads=heads)
            funcs[name] = f.with_attr("global_symbol", name)
    return tvm.IRModule(funcs)


@pytest.fixture(scope="module", params=["mali", "adreno"])
def gpu_parts(request):
    """(kernels by name, OpenCL sources) of every head subset of SPLITS, dlight-scheduled."""
    from tvm.s_tir import dlight as dl

    arch = get_arch(request.param)
    heads = sorted({h for k in SPLITS for h in ((0, k), (k, H))})
    with arch.tvm_target() as tgt:
        sched = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                        dl.gpu.GeneralReduction(), dl.gpu.Fallback())(
            _library(arch, heads))
        lib = tvm.tirx.build(sched, target=tgt)

    class _Ex:   # opencl_sources walks ex.mod's imports
        mod = lib

    sources = ci.opencl_sources(_Ex)
    assert sources, f"{request.param}: no OpenCL kernels generated"
    return request.param, ci.gpu_kernels(sched, sources), sources


@pytest.fixture(scope="module")
def pocl(tmp_path_factory):
    return pocl_context(tmp_path_factory.mktemp("pocl-cache"))


@pytest.fixture(scope="module")
def program(gpu_parts, pocl):
    cl, ctx, _ = pocl
    _, _, sources = gpu_parts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # pyopencl's CompilerWarning on a non-empty build log
        return cl.Program(ctx, ci.combined_program(sources)).build()


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    qkv = (rng.standard_normal((B * T, 3 * H * d)) * 1.5).astype("float32")
    mask = np.ones((B, T), "float32")
    mask[0, T - 4:] = 0.0
    dctx = rng.standard_normal((B * T, H * d)).astype("float32")
    return qkv, mask, np.array([20261122, 1], "int64"), dctx


@pytest.fixture(scope="module")
def reference(data):
    """The full-head forward and backward compiled for the host CPU (our scheduled kernels)."""
    arch = get_arch("host")
    ex = tvm.compile(_library(arch, [(0, H)]), target=arch.tvm_target())
    qkv, mask, seed, dctx = data
    t = lambda x: tvm.runtime.tensor(np.ascontiguousarray(x))  # noqa: E731
    ctx, P = t(np.zeros((B * T, H * d), "float32")), t(np.zeros((B, H, T, T), "float32"))
    g = t(np.zeros((B * T, 3 * H * d), "float32"))
    ex[kernel_name("fwd", 0, H)](t(qkv), t(mask), t(seed), ctx, P)
    ex[kernel_name("bwd", 0, H)](t(qkv), P, t(dctx), t(seed), g)
    ctx_off = t(np.zeros((B * T, H * d), "float32"))
    ex[kernel_name("fwd", 0, H)](t(qkv), t(mask), t(np.array([seed[0], 0], "int64")), ctx_off,
                                 t(np.zeros((B, H, T, T), "float32")))
    # dropout is really on in this comparison: switching it off changes ctx
    assert not np.allclose(ctx.numpy(), ctx_off.numpy())
    return ctx.numpy(), P.numpy(), g.numpy()


def _run_part(pocl, prog, kernels, heads, data):
    cl, ctx, queue = pocl
    qkv, mask, seed, dctx = data
    cols = subset_columns(H, d, heads)
    h0, h1 = heads
    q = np.ascontiguousarray(qkv[:, cols])
    dc = np.ascontiguousarray(dctx[:, h0 * d:h1 * d])
    fwd = run_pocl(cl, ctx, queue, prog, kernels[kernel_name("fwd", *heads)],
                   {"qkv": q, "mask": mask, "seed": seed})
    bwd = run_pocl(cl, ctx, queue, prog, kernels[kernel_name("bwd", *heads)],
                   {"qkv": q, "probs": fwd["probs"], "dctx": dc, "seed": seed})
    return fwd["ctx"], fwd["probs"], bwd["dqkv"], cols


@pytest.mark.parametrize("k", SPLITS)
def test_opencl_head_split_equals_full_cpu(gpu_parts, pocl, program, data, reference, k):
    name, kernels, _ = gpu_parts
    ctx_a, p_a, g_a, cols_a = _run_part(pocl, program, kernels, (0, k), data)
    ctx_b, p_b, g_b, cols_b = _run_part(pocl, program, kernels, (k, H), data)
    dqkv = np.zeros((B * T, 3 * H * d), "float32")
    dqkv[:, cols_a] = g_a
    dqkv[:, cols_b] = g_b
    got = (np.concatenate([ctx_a, ctx_b], 1), np.concatenate([p_a, p_b], 1), dqkv)
    for what, g_, w in zip(("ctx", "probs", "dqkv"), got, reference, strict=True):
        assert np.all(np.isfinite(g_)), f"{name} k={k}: non-finite {what}"
        err = float(np.max(np.abs(g_.astype(np.float64) - w)))
        bound = TOL * max(1.0, float(np.max(np.abs(w))))
        assert err <= bound, f"{name} k={k}: {what} max|split-full| {err:.2e} > {bound:.1e}"
