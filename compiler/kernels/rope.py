"""Rotary position embedding on the fused QKV activation (Hugging Face's rotate-half layout).

``qkv`` [B*T, (nh + 2*nkv) * d] holds q heads | k heads | v heads (each head d columns). For the q
and k heads, halves ``a = x[:d/2]``, ``b = x[d/2:]`` of a head at position t become
``a cos - b sin`` and ``b cos + a sin`` with ``cos/sin [T, d/2]`` (angles t * theta^(-2j/d),
computed on the host in float64 and passed as inputs); v columns are copied unchanged.
Position t = row % T (sequences start at position 0; right padding).

The rotation is orthogonal, so the backward is the same kernel with ``inverse=True`` (rotation by
-angle) applied to the output gradient: ``dqkv = R^T dqkv_rot``.
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx

from compiler.arch import Arch
from compiler.kernels.elementwise import (
    PAR_MIN_ELEMS, finish, resolve_arch, schedule_of, vectorize_loop,
)


def rope_tables(T: int, d: int, theta: float, dtype: str = "float32") -> tuple[np.ndarray, ...]:
    """cos, sin [T, d/2] for positions 0..T-1 (float64 math, cast to `dtype`)."""
    j = np.arange(d // 2, dtype=np.float64)
    ang = np.arange(T, dtype=np.float64)[:, None] * theta ** (-2.0 * j / d)[None, :]
    return np.cos(ang).astype(dtype), np.sin(ang).astype(dtype)


def build_rope(B: int, T: int, nh: int, nkv: int, d: int, *, inverse: bool = False,
               dtype: str = "float32", arch: Arch | None = None,
               config: dict | None = None) -> tirx.PrimFunc:
    """qkv [B*T, (nh+2nkv)*d], cos [T, d/2], sin [T, d/2] -> out [B*T, (nh+2nkv)*d].

    Rotates the nh + nkv q/k heads by +angle (or -angle with ``inverse``), copies the v heads.
    """
    arch = resolve_arch(arch)
    if d % 2:
        raise ValueError(f"rotary needs an even head dim, got {d}")
    M, h2, nr = B * T, d // 2, nh + nkv
    C = (nh + 2 * nkv) * d
    x = te.placeholder((M, C), dtype, name="qkv")
    cos = te.placeholder((T, h2), dtype, name="cos")
    sin = te.placeholder((T, h2), dtype, name="sin")
    sgn = -1.0 if inverse else 1.0

    nall = nh + 2 * nkv

    # (M, head, half p, j): p=0 -> a cos - b sin, p=1 -> b cos + a sin; v heads (h >= nr) copied
    def fn(m, h, p, j):
        t = m % T
        a, b = x[m, h * d + j], x[m, h * d + h2 + j]
        c, s = cos[t, j], sin[t, j] * tirx.const(sgn, dtype)
        rot = tirx.Select(p == 0, a * c - b * s, b * c + a * s)
        return tirx.Select(h < nr, rot, x[m, h * d + p * h2 + j])

    out = te.compute((M, nall, 2, h2), fn, name="out")
    sch = schedule_of(te.create_prim_func([x, cos, sin, out]))
    sch.transform_layout(sch.get_sblock("out"), ("write", 0),
                         lambda m, h, p, j: (m, h * d + p * h2 + j))
    if not arch.is_cpu:
        return finish(sch)
    m, h, p, j = sch.get_loops(sch.get_sblock("out"))
    sch.unroll(p)
    vectorize_loop(sch, j, arch.lanes(dtype))
    if M * C >= PAR_MIN_ELEMS:
        sch.parallel(m)
    return finish(sch)
