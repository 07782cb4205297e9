"""The elementwise part of LLaMA's SiLU-gated MLP: ``a = silu(g) * u`` and its gradient.

The gate and up projections are one GEMM with a fused [2I, H] weight (gate rows first), so the
kernels read ``gu`` [M, 2I] = (g | u) in place. silu(g) = g * sigmoid(g), with sigmoid built on
the vectorisable ``common.exp`` (float32) or the exact intrinsic (float64).

Backward (da -> dgu): ``dg = da * u * sig * (1 + g * (1 - sig))``, ``du = da * g * sig``.
"""

from __future__ import annotations

from tvm import te, tirx

from compiler.arch import Arch
from compiler.kernels.common import const
from compiler.kernels.common import exp as common_exp
from compiler.kernels.elementwise import (
    PAR_MIN_ELEMS, finish, resolve_arch, sched_flat, schedule_of, vectorize_loop,
)


def _sigmoid(x, dtype):
    return const(1.0, dtype) / (const(1.0, dtype) + common_exp(-x))


def build_swiglu_fwd(M: int, I: int, *, dtype: str = "float32", arch: Arch | None = None,
                     config: dict | None = None) -> tirx.PrimFunc:
    """gu [M, 2I] (gate | up) -> a [M, I] = silu(gate) * up."""
    arch = resolve_arch(arch)
    gu = te.placeholder((M, 2 * I), dtype, name="gu")
    a = te.compute((M, I), lambda i, j: gu[i, j] * _sigmoid(gu[i, j], dtype) * gu[i, I + j],
                   name="a")
    f = te.create_prim_func([gu, a])
    if not arch.is_cpu:
        return f
    sch = schedule_of(f)
    sched_flat(sch, sch.get_sblock("a"), arch, dtype)
    return finish(sch)


def build_swiglu_bwd(M: int, I: int, *, dtype: str = "float32", arch: Arch | None = None,
                     config: dict | None = None) -> tirx.PrimFunc:
    """da [M, I], gu [M, 2I] -> dgu [M, 2I] (d gate | d up)."""
    arch = resolve_arch(arch)
    da = te.placeholder((M, I), dtype, name="da")
    gu = te.placeholder((M, 2 * I), dtype, name="gu")
    one = const(1.0, dtype)

    def grad(i, c, up: bool):
        g, u = gu[i, c], gu[i, I + c]
        if up:
            return da[i, c] * g * _sigmoid(g, dtype)
        # sig is used twice: bind it once (an expression with common.exp's lets may not repeat)
        sig = tirx.Var("sig", dtype)
        return tirx.Let(sig, _sigmoid(g, dtype), da[i, c] * u * sig * (one + g * (one - sig)))

    # two blocks writing the halves of one buffer would need a Select per element; writing
    # (M, 2, I) and viewing it as (M, 2I) keeps both halves branch-free and vectorised.
    dgu = te.compute((M, 2, I), lambda i, p, c: tirx.Select(
        p == 0, grad(i, c, False), grad(i, c, True)), name="dgu")
    sch = schedule_of(te.create_prim_func([da, gu, dgu]))
    sch.transform_layout(sch.get_sblock("dgu"), ("write", 0), lambda i, p, c: (i, p * I + c))
    if arch.is_cpu:
        blk = sch.get_sblock("dgu")
        i, p, c = sch.get_loops(blk)
        sch.unroll(p)
        vectorize_loop(sch, c, arch.lanes(dtype))
        if M * I * 2 >= PAR_MIN_ELEMS:
            sch.parallel(i)
    return finish(sch)
