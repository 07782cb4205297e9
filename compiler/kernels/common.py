"""Expression helpers shared by the kernels: vectorisable erf/GELU and the counter-based dropout hash."""

from __future__ import annotations

import math

import tvm
from tvm import te, tirx

# Rational approximation of erf on [-4, 4] (the one TVM's topi.fast_erf and Eigen use);
# max abs error ~1e-7, i.e. float32 rounding. Vectorises (no libm call).
_ERF_ALPHA = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
              -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
              -1.60960333262415e-02)
_ERF_BETA = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
             -7.37332916720468e-03, -1.42647390514189e-02)


def const(v: float, dtype: str) -> tirx.PrimExpr:
    return tirx.const(v, dtype)


def dtype_of(x: tirx.PrimExpr) -> str:
    """The dtype string of a PrimExpr (TVM 0.27 moved `.dtype` to `.ty`)."""
    if hasattr(x, "asobject"):  # te.Tensor element access (TensorSlice)
        x = x.asobject()
    return str(x.ty)


def erf(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """erf(x): exact libm intrinsic for float64, a vectorisable approximation for float32."""
    dt = dtype_of(x)
    if dt == "float64":
        return te.erf(x)
    c = lambda v: const(v, dt)  # noqa: E731
    xc = tvm.te.max(tvm.te.min(x, c(4.0)), c(-4.0))
    x2 = xc * xc
    p = c(_ERF_ALPHA[0])
    for a in _ERF_ALPHA[1:]:
        p = p * x2 + c(a)
    p = p * xc
    q = c(_ERF_BETA[0])
    for b in _ERF_BETA[1:]:
        q = q * x2 + c(b)
    return p / q


def gelu(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """Exact (erf) GELU, as BERT's hidden_act="gelu"."""
    dt = dtype_of(x)
    return x * const(0.5, dt) * (const(1.0, dt) + erf(x * const(1.0 / math.sqrt(2.0), dt)))


def exp(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """exp(x): the exact intrinsic for float64; for float32 a vectorisable Cody-Waite range reduction
    + Cephes polynomial (rel. err ~2e-7). TVM 0.27 lowers float32 `te.exp` to one scalar `expf` call per
    lane (no vector math library), 10x slower than the memory traffic of the kernels that use it.
    Results below exp(-80) are flushed to exactly 0: denormals trigger x86 microcode assists (a masked
    attention row ran 10x slower)."""
    dt = dtype_of(x)
    if dt != "float32":
        return te.exp(x)
    c = lambda v: const(v, dt)  # noqa: E731
    xv, nv, rv = (tirx.Var(s, dt) for s in ("ex_x", "ex_n", "ex_r"))
    p = c(1.9875691500e-4)
    for a in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = p * rv + c(a)
    i32 = lambda v: tirx.const(v, "int32")  # noqa: E731
    bits = tirx.shift_left(tirx.Cast("int32", nv) + i32(127), i32(23))
    body = (p * rv * rv + rv + c(1.0)) * tirx.reinterpret("float32", bits)
    body = tirx.Let(rv, xv - nv * c(0.693359375) - nv * c(-2.12194440e-4), body)
    body = tirx.Let(nv, tirx.floor(xv * c(1.4426950408889634) + c(0.5)), body)
    body = tirx.Select(xv < c(-80.0), c(0.0), body)
    return tirx.Let(xv, te.max(te.min(x, c(88.0)), c(-87.0)), body)


def gelu_grad(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """d gelu(x) / dx = Phi(x) + x * phi(x)."""
    dt = dtype_of(x)
    cdf = const(0.5, dt) * (const(1.0, dt) + erf(x * const(1.0 / math.sqrt(2.0), dt)))
    pdf = exp(const(-0.5, dt) * x * x) * const(1.0 / math.sqrt(2.0 * math.pi), dt)
    return cdf + x * pdf


_M32 = 0xFFFFFFFF


def _u32(v: int) -> tirx.PrimExpr:
    return tirx.const(v & _M32, "uint32")


def _mulw(h: tirx.PrimExpr, c: int) -> tirx.PrimExpr:
    """h * c mod 2^32 without a wrapping uint32 multiply: widen to uint64 (cannot overflow there),
    truncate back (LLVM narrows trunc(mul(zext, zext)) to a plain 32-bit vector multiply)."""
    wide = tirx.Cast("uint64", h) * tirx.const(c & _M32, "uint64")
    return tirx.Cast("uint32", wide & tirx.const(_M32, "uint64"))


def hash_u32(index: tirx.PrimExpr, seed: tirx.PrimExpr, salt: int) -> tirx.PrimExpr:
    """A murmur3-finaliser hash of (index, seed, salt) as uint32: a counter-based RNG.

    The same (seed, salt, index) gives the same bits in the forward and backward kernels, on every
    target, so dropout masks never need to be stored or sent between boards.

    No multiply may wrap in uint32: TVM 0.27's LLVM codegen marks unsigned multiplies `nuw` (wrapping
    is poison) and LLVM then mis-folds the hash (seen: every element kept at p = 0.25; wrong masks on
    small unrolled rows). `_mulw` computes the same bits without wrapping.
    """
    h = _mulw(tirx.Cast("uint32", index), 0x9E3779B1)
    h = h ^ _mulw(tirx.Cast("uint32", seed), 0x85EBCA77)
    h = h ^ _u32(salt * 0xC2B2AE3D + 0x27D4EB2F)
    h = h ^ tirx.shift_right(h, _u32(16))
    h = _mulw(h, 0x85EBCA6B)
    h = h ^ tirx.shift_right(h, _u32(13))
    h = _mulw(h, 0xC2B2AE35)
    h = h ^ tirx.shift_right(h, _u32(16))
    return h


def _enable_flag(seed):
    """If `seed` is element 0 of a te seed tensor of shape (2,), return (flag, seed) where flag is
    element 1 (dropout on/off); else (None, seed). One compiled stage thereby trains (flag 1) and
    evaluates or checks gradients (flag 0) with the same kernels."""
    if hasattr(seed, "tensor") and hasattr(seed, "indices"):       # te: seed_tensor[0]
        t = seed.tensor
        if len(t.shape) == 1 and int(t.shape[0]) >= 2:
            return t[1], seed.asobject()
        return None, seed.asobject()
    return None, seed


def keep_scale(index: tirx.PrimExpr, seed, salt: int, p: float, dtype: str) -> tirx.PrimExpr:
    """Inverted-dropout factor for one element: 1/(1-p) if kept, else 0. Requires 0 < p < 1.

    Pass `seed` as `seed_tensor[0]` where seed_tensor is the stage's int64 (2,) seed input
    (seed, dropout on/off): with the flag 0 the factor is exactly 1 (evaluation, gradient checks).
    """
    flag, seed = _enable_flag(seed)
    kept = hash_u32(index, seed, salt) >= _u32(min(int(p * 4294967296.0), _M32))
    factor = tirx.Select(kept, const(1.0 / (1.0 - p), dtype), const(0.0, dtype))
    if flag is not None:
        factor = tirx.Select(flag != tirx.const(0, "int64"), factor, const(1.0, dtype))
    return factor


def keep_mask_numpy(n: int, seed: int, salt: int, p: float):
    """The same mask computed in numpy (for tests and the float64 reference)."""
    import numpy as np

    m = 0xFFFFFFFF
    i = np.arange(n, dtype=np.uint64) & m
    h = (i * 0x9E3779B1) & m
    h ^= (seed * 0x85EBCA77) & m
    h ^= (salt * 0xC2B2AE3D + 0x27D4EB2F) & m
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & m
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & m
    h ^= h >> 16
    thr = min(int(p * 4294967296.0), m)
    return np.where(h >= thr, 1.0 / (1.0 - p), 0.0)
