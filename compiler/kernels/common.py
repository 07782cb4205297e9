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


def gelu_grad(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """d gelu(x) / dx = Phi(x) + x * phi(x)."""
    dt = dtype_of(x)
    cdf = const(0.5, dt) * (const(1.0, dt) + erf(x * const(1.0 / math.sqrt(2.0), dt)))
    pdf = te.exp(const(-0.5, dt) * x * x) * const(1.0 / math.sqrt(2.0 * math.pi), dt)
    return cdf + x * pdf


def _u32(v: int) -> tirx.PrimExpr:
    return tirx.const(v & 0xFFFFFFFF, "uint32")


def hash_u32(index: tirx.PrimExpr, seed: tirx.PrimExpr, salt: int) -> tirx.PrimExpr:
    """A murmur3-finaliser hash of (index, seed, salt) as uint32: a counter-based RNG.

    The same (seed, salt, index) gives the same bits in the forward and backward kernels, on every
    target, so dropout masks never need to be stored or sent between boards.
    """
    h = tirx.Cast("uint32", index) * _u32(0x9E3779B1)
    h = h ^ (tirx.Cast("uint32", seed) * _u32(0x85EBCA77))
    h = h ^ _u32(salt * 0xC2B2AE3D + 0x27D4EB2F)
    h = h ^ tirx.shift_right(h, _u32(16))
    h = h * _u32(0x85EBCA6B)
    h = h ^ tirx.shift_right(h, _u32(13))
    h = h * _u32(0xC2B2AE35)
    h = h ^ tirx.shift_right(h, _u32(16))
    return h


def _enable_flag(seed):
    """If `seed` reads element 0 of a seed tensor of shape (2,), the load of element 1 (the
    dropout on/off flag); else None. Lets one compiled stage train (flag 1) and evaluate (flag 0)."""
    if hasattr(seed, "tensor") and hasattr(seed, "indices"):       # te: seed_tensor[0]
        t = seed.tensor
        if len(t.shape) == 1 and int(t.shape[0]) >= 2:
            return t[1], seed.asobject()
        return None, seed.asobject()
    if isinstance(seed, tirx.BufferLoad):                            # TIR: seed_buffer[0]
        b = seed.buffer
        if len(b.shape) == 1 and int(b.shape[0]) >= 2:
            return tirx.BufferLoad(b, [tirx.const(1, "int32")]), seed
    return None, seed


def keep_scale(index: tirx.PrimExpr, seed, salt: int, p: float, dtype: str) -> tirx.PrimExpr:
    """Inverted-dropout factor for one element: 1/(1-p) if kept, else 0. Requires 0 < p < 1.

    Pass `seed` as `seed_tensor[0]` where seed_tensor is the stage's int64 (2,) seed input
    (seed, dropout on/off): with the flag 0 the factor is exactly 1 (evaluation, gradient checks).
    """
    flag, seed = _enable_flag(seed)
    threshold = _u32(min(int(p * 4294967296.0), 0xFFFFFFFF))
    kept = hash_u32(index, seed, salt) >= threshold
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
