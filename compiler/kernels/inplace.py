"""In-place CPU kernels for the optimizer: AdamW and gradient accumulation update their first
arguments where they lie, so a board never holds two copies of a stage's weights or moments.

They are written directly as scheduled TIR (parallel chunks x vector lanes, plus a scalar tail), since
TE computes always allocate a fresh output buffer. Relax calls them with `call_tir_inplace`.
"""

from __future__ import annotations

from tvm.script import tirx as T

from compiler.arch import Arch
from edgert.contract import HYPER

_N_HYPER = len(HYPER)   # a plain int: TVMScript evaluates buffer shapes from closure values


def build_adamw_inplace(n: int, *, dtype: str = "float32", arch: Arch):
    """AdamW (torch.optim.AdamW semantics) on flat tensors, in place.

    Buffers: param [n], grad [n], m [n], v [n], hyper [8] -> param, m, v updated in place
    (`call_tir_inplace` indices 0, 2, 3). hyper: edgert.contract.HYPER; grad is multiplied by
    grad_scale first.
    """
    L = arch.lanes(dtype)
    nv = n // L
    tail = n - nv * L

    @T.prim_func(private=True)
    def adamw(p: T.Buffer((n,), dtype), g: T.Buffer((n,), dtype), m: T.Buffer((n,), dtype),
              v: T.Buffer((n,), dtype), h: T.Buffer((_N_HYPER,), dtype)):
        T.func_attr({"tirx.noalias": True})
        # No `let` inside the vectorised loop: TVM 0.27's vectoriser broadcasts lane 0 of a scalar let.
        for i0 in T.parallel(nv):
            for i1 in T.vectorized(L):
                m[i0 * L + i1] = h[1] * m[i0 * L + i1] + (T.Cast(dtype, 1.0) - h[1]) * (g[i0 * L + i1] * h[7])
                v[i0 * L + i1] = h[2] * v[i0 * L + i1] + (T.Cast(dtype, 1.0) - h[2]) * (g[i0 * L + i1] * h[7]) * (g[i0 * L + i1] * h[7])
                p[i0 * L + i1] = p[i0 * L + i1] * (T.Cast(dtype, 1.0) - h[0] * h[4]) - (
                    h[0] / h[5]) * m[i0 * L + i1] / (T.sqrt(v[i0 * L + i1]) / T.sqrt(h[6]) + h[3])
        for i in range(tail):
            m[nv * L + i] = h[1] * m[nv * L + i] + (T.Cast(dtype, 1.0) - h[1]) * (g[nv * L + i] * h[7])
            v[nv * L + i] = h[2] * v[nv * L + i] + (T.Cast(dtype, 1.0) - h[2]) * (g[nv * L + i] * h[7]) * (g[nv * L + i] * h[7])
            p[nv * L + i] = p[nv * L + i] * (T.Cast(dtype, 1.0) - h[0] * h[4]) - (
                h[0] / h[5]) * m[nv * L + i] / (T.sqrt(v[nv * L + i]) / T.sqrt(h[6]) + h[3])

    return adamw


def build_accumulate_inplace(n: int, *, dtype: str = "float32", arch: Arch):
    """acc += g, in place. Buffers: acc [n], g [n] (`call_tir_inplace` index 0)."""
    L = arch.lanes(dtype)
    nv = n // L
    tail = n - nv * L

    @T.prim_func(private=True)
    def accumulate(acc: T.Buffer((n,), dtype), g: T.Buffer((n,), dtype)):
        T.func_attr({"tirx.noalias": True})
        for i0 in T.parallel(nv):
            for i1 in T.vectorized(L):
                acc[i0 * L + i1] = acc[i0 * L + i1] + g[i0 * L + i1]
        for i in range(tail):
            acc[nv * L + i] = acc[nv * L + i] + g[nv * L + i]

    return accumulate
