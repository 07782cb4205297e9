"""Attention core kernels (compiler/kernels/attention.py) vs a float64 numpy reference.

* float32 host kernels, fwd + bwd, with / without dropout and padding: rel. error (Frobenius) < 1e-5
* float64 fwd + bwd vs central finite differences of the float64 forward kernel
* head-subset kernels (heads=(0,k), (k,H)) reassemble the full result exactly
* the unscheduled GPU variant computes the same thing (run on LLVM) and is scheduled by dlight for
  OpenCL (Mali); the float32 kernels build for arm64 (NEON)
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from compiler.arch import get_arch
from compiler.kernels.attention import (NEG, build_attention_bwd, build_attention_fwd,
                                        subset_columns)
from compiler.kernels.common import keep_mask_numpy

SEED, SALT = 1234, 7


# ------------------------------------------------------------------------------ float64 reference
def _keep(B, H, T, p, heads=None):
    if p == 0.0:
        return 1.0
    return keep_mask_numpy(B * H * T * T, SEED, SALT, p).reshape(B, H, T, T)


def ref_fwd(qkv, mask, B, T, H, d, p):
    q, k, v = qkv.reshape(B, T, 3, H, d).transpose(2, 0, 3, 1, 4)  # each [B, H, T, d]
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d) + ((1.0 - mask) * NEG)[:, None, None, :]
    e = np.exp(s - s.max(-1, keepdims=True))
    P = e / e.sum(-1, keepdims=True)
    ctx = (P * _keep(B, H, T, p)) @ v
    return ctx.transpose(0, 2, 1, 3).reshape(B * T, H * d), P


def ref_bwd(qkv, P, dctx, B, T, H, d, p):
    q, k, v = qkv.reshape(B, T, 3, H, d).transpose(2, 0, 3, 1, 4)
    keep = _keep(B, H, T, p)
    g = dctx.reshape(B, T, H, d).transpose(0, 2, 1, 3)
    dpd = g @ v.transpose(0, 1, 3, 2)
    dv = (P * keep).transpose(0, 1, 3, 2) @ g
    dp = dpd * keep
    ds = P * (dp - (dp * P).sum(-1, keepdims=True))
    dq = ds @ k / np.sqrt(d)
    dk = ds.transpose(0, 1, 3, 2) @ q / np.sqrt(d)
    return np.stack([dq, dk, dv]).transpose(1, 3, 0, 2, 4).reshape(B * T, 3 * H * d)


# ------------------------------------------------------------------------------------- helpers
class Kernels:
    """Compiled fwd/bwd pair with numpy-in / numpy-out call helpers."""

    def __init__(self, B, T, H, d, *, dtype, arch, p=0.0, heads=None, target=None):
        self.B, self.T, self.H, self.d, self.dtype = B, T, H, d, dtype
        self.hs = (heads[1] - heads[0]) if heads else H
        kw = dict(dtype=dtype, arch=arch, dropout=p, salt=SALT, heads=heads)
        target = target or arch.tvm_target()
        self.f = tvm.compile(build_attention_fwd(B, T, H, d, **kw), target=target)
        self.b = tvm.compile(build_attention_bwd(B, T, H, d, **kw), target=target)
        self.seed = tvm.runtime.tensor(np.array([SEED, 1], "int64"))

    def _t(self, x):
        return tvm.runtime.tensor(np.ascontiguousarray(x, dtype=self.dtype))

    def fwd(self, qkv, mask):
        B, T, hs, d = self.B, self.T, self.hs, self.d
        ctx, P = self._t(np.zeros((B * T, hs * d))), self._t(np.zeros((B, hs, T, T)))
        self.f(self._t(qkv), self._t(mask), self.seed, ctx, P)
        return ctx.numpy(), P.numpy()

    def bwd(self, qkv, P, dctx):
        g = self._t(np.zeros((self.B * self.T, 3 * self.hs * self.d)))
        self.b(self._t(qkv), self._t(P), self._t(dctx), self.seed, g)
        return g.numpy()


def _inputs(B, T, H, d, pad, rng):
    qkv = rng.standard_normal((B * T, 3 * H * d)) * 1.5
    mask = np.ones((B, T))
    if pad:
        mask[0, T - T // 4:] = 0.0
        mask[-1, T // 2:] = 0.0
    dctx = rng.standard_normal((B * T, H * d))
    return qkv, mask, dctx


def _rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def host():
    return get_arch("host")


# --------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("shape", [(2, 32, 3, 16), (2, 24, 2, 8)])
@pytest.mark.parametrize("p,pad", [(0.0, False), (0.0, True), (0.1, True), (0.25, False)])
def test_float32_vs_float64_reference(host, shape, p, pad):
    B, T, H, d = shape
    qkv, mask, dctx = _inputs(B, T, H, d, pad, np.random.default_rng(0))
    k = Kernels(B, T, H, d, dtype="float32", arch=host, p=p)
    ctx, P = k.fwd(qkv, mask)
    ctx_r, P_r = ref_fwd(qkv, mask, B, T, H, d, p)
    assert _rel(P, P_r) < 1e-5 and _rel(ctx, ctx_r) < 1e-5
    if pad:  # padded keys get exactly zero probability
        assert np.all(P[0, :, :, T - T // 4:] == 0.0)
    g = k.bwd(qkv, P_r, dctx)
    assert _rel(g, ref_bwd(qkv, P_r, dctx, B, T, H, d, p)) < 1e-5


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_float64_finite_differences(host, p):
    B, T, H, d = 2, 8, 2, 4
    rng = np.random.default_rng(1)
    qkv, mask, G = _inputs(B, T, H, d, True, rng)
    k = Kernels(B, T, H, d, dtype="float64", arch=host, p=p)
    ctx, P = k.fwd(qkv, mask)
    ctx_r, P_r = ref_fwd(qkv, mask, B, T, H, d, p)
    assert _rel(ctx, ctx_r) < 1e-12 and _rel(P, P_r) < 1e-12
    grad = k.bwd(qkv, P, G)  # d sum(ctx * G) / d qkv
    eps, fd = 1e-6, np.zeros_like(qkv)
    for idx in np.ndindex(*qkv.shape):
        xp, xm = qkv.copy(), qkv.copy()
        xp[idx] += eps
        xm[idx] -= eps
        fd[idx] = (np.sum(k.fwd(xp, mask)[0] * G) - np.sum(k.fwd(xm, mask)[0] * G)) / (2 * eps)
    assert _rel(grad, fd) < 1e-7, _rel(grad, fd)


def test_head_subset_split_reproduces_full(host):
    B, T, H, d, p, split = 2, 16, 4, 8, 0.1, 1
    qkv, mask, dctx = _inputs(B, T, H, d, True, np.random.default_rng(2))
    full = Kernels(B, T, H, d, dtype="float32", arch=host, p=p)
    ctx, P = full.fwd(qkv, mask)
    g = full.bwd(qkv, P, dctx)
    ctxs, Ps, g_split = [], [], np.zeros_like(g)
    for heads in [(0, split), (split, H)]:
        cols = subset_columns(H, d, heads)
        k = Kernels(B, T, H, d, dtype="float32", arch=host, p=p, heads=heads)
        c_k, P_k = k.fwd(qkv[:, cols], mask)
        ctxs.append(c_k)
        Ps.append(P_k)
        g_split[:, cols] = k.bwd(qkv[:, cols], P_k, dctx[:, heads[0] * d:heads[1] * d])
    np.testing.assert_array_equal(np.concatenate(ctxs, axis=1), ctx)
    np.testing.assert_array_equal(np.concatenate(Ps, axis=1), P)
    np.testing.assert_array_equal(g_split, g)


def test_gpu_variant_compute_and_opencl_build(host):
    """arch.kind == "gpu": unscheduled PrimFunc. Its math (run through LLVM) matches the reference,
    and dlight's default GPU rules schedule it for OpenCL (Mali)."""
    from tvm.s_tir import dlight as dl

    B, T, H, d, p = 2, 16, 2, 8, 0.1
    mali = get_arch("mali")
    qkv, mask, dctx = _inputs(B, T, H, d, True, np.random.default_rng(3))
    llvm = tvm.target.Target({"kind": "llvm"})
    k = Kernels(B, T, H, d, dtype="float32", arch=mali, p=p, target=llvm)
    ctx, P = k.fwd(qkv, mask)
    ctx_r, P_r = ref_fwd(qkv, mask, B, T, H, d, p)
    assert _rel(ctx, ctx_r) < 1e-5 and _rel(P, P_r) < 1e-5
    assert _rel(k.bwd(qkv, P_r, dctx), ref_bwd(qkv, P_r, dctx, B, T, H, d, p)) < 1e-5
    for build in (build_attention_fwd, build_attention_bwd):
        mod = tvm.IRModule({"main": build(8, 128, 12, 32, arch=mali, dropout=p, salt=SALT)})
        with mali.tvm_target():
            mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                          dl.gpu.GeneralReduction(), dl.gpu.Fallback())(mod)
        ex = tvm.tirx.build(mod, target=mali.tvm_target())
        ocl = [m for m in ex.imports if m.kind == "opencl"]
        assert ocl and "__kernel" in ocl[0].inspect_source()


def test_arm64_neon_builds():
    arm = get_arch("arm64")
    for build in (build_attention_fwd, build_attention_bwd):
        ex = tvm.compile(build(8, 128, 12, 32, arch=arm, dropout=0.1, salt=SALT),
                         target=arm.tvm_target())
        assert ex is not None


@pytest.mark.parametrize("flag", [1, 0])
@pytest.mark.parametrize("p", [0.1, 0.25, 0.5, 0.75])
def test_keep_scale_matches_numpy_mask(host, p, flag):
    """The dropout factor used by the kernels is bit-identical to keep_mask_numpy (vectorised),
    and exactly 1 when the seed tensor's on/off flag is 0.
    (Guards the uint32-multiply/`nuw` miscompile of the first hash at p = 0.25 / 0.75.)"""
    from tvm import s_tir, te

    from compiler.kernels.common import keep_scale

    n = 4096
    seed = te.placeholder((2,), "int64", name="seed")
    out = te.compute((n,), lambda i: keep_scale(i, seed[0], SALT, p, "float32"), name="out")
    sch = s_tir.Schedule(te.create_prim_func([seed, out]))
    sch.vectorize(sch.split(sch.get_loops(sch.get_sblock("out"))[0], [None, 16])[1])
    o = tvm.runtime.tensor(np.zeros(n, "float32"))
    f = tvm.compile(sch.mod["main"], target=host.tvm_target())
    f(tvm.runtime.tensor(np.array([SEED, flag], "int64")), o)
    want = keep_mask_numpy(n, SEED, SALT, p) if flag else np.ones(n)
    np.testing.assert_allclose(o.numpy(), want, rtol=1e-7)
