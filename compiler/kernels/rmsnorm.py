"""RMSNorm forward/backward with the fused residual add of a pre-norm decoder block (LLaMA).

A pre-norm block keeps a residual stream ``s``: ``s1 = s0 + attn(norm1(s0))``,
``s2 = s1 + mlp(norm2(s1))``. The forward kernel fuses the add that produces the stream with the
norm that reads it: ``s = x + resid; y = s * rstd * w`` with ``rstd = 1/sqrt(mean(s^2) + eps)``,
and returns ``s`` (the new stream, also saved for the backward) and ``rstd``.
The backward takes ``dy`` (into the norm output) and ``dres`` (the stream's gradient from later
uses) and returns ``ds = rstd * (g - xhat * mean(g * xhat)) + dres`` with ``g = dy * w`` and
``xhat = s * rstd`` (``ds`` flows to both x and resid), and ``dw = sum_rows(dy * xhat)``.

CPU schedule as compiler/kernels/norm.py: rows in parallel, per-row reductions vectorised with
partial accumulators, column sums of dw as per-thread partial sums (rfactor).
"""

from __future__ import annotations

from tvm import te, tirx

from compiler.arch import Arch
from compiler.kernels.elementwise import (
    PAR_MIN_ELEMS, finish, resolve_arch, sched_colsum, sched_rowsum, schedule_of, vectorize_exact,
)


def build_rmsnorm_fwd(M: int, D: int, *, eps: float = 1e-6, dtype: str = "float32",
                      arch: Arch | None = None, residual: bool = True,
                      config: dict | None = None) -> tirx.PrimFunc:
    """Inputs x [M,D], (resid [M,D] if residual), w [D]; outputs y [M,D], s [M,D], rstd [M].

    s = x + resid (or x), rstd = 1/sqrt(mean(s^2) + eps), y = s * rstd * w.
    (Without residual ``s`` is a copy of x, kept so both variants save the same tensors.)
    """
    arch = resolve_arch(arch)
    x = te.placeholder((M, D), dtype, name="x")
    resid = te.placeholder((M, D), dtype, name="resid") if residual else None
    w = te.placeholder((D,), dtype, name="w")
    inv_d = tirx.const(1.0 / D, dtype)
    s = te.compute((M, D), (lambda i, j: x[i, j] + resid[i, j]) if residual
                   else (lambda i, j: x[i, j]), name="s")
    k = te.reduce_axis((0, D), name="k")
    ssq = te.compute((M,), lambda i: te.sum(s[i, k] * s[i, k], axis=k), name="ssq")
    rstd = te.compute((M,), lambda i: tirx.const(1.0, dtype) / te.sqrt(
        ssq[i] * inv_d + tirx.const(eps, dtype)), name="rstd")
    y = te.compute((M, D), lambda i, j: s[i, j] * rstd[i] * w[j], name="y")
    ins = [x] + ([resid] if residual else []) + [w]
    f = te.create_prim_func(ins + [y, s, rstd])
    if not arch.is_cpu:
        return f
    lanes = arch.lanes(dtype)
    sch = schedule_of(f)
    sb = sch.get_sblock("s")
    m, n = sch.get_loops(sb)
    if M * D >= PAR_MIN_ELEMS:
        sch.parallel(m)
    vectorize_exact(sch, n, lanes)
    sched_rowsum(sch, sch.get_sblock("ssq"), m, lanes, reverse=True)
    sch.reverse_compute_at(sch.get_sblock("rstd"), m)
    yb = sch.get_sblock("y")
    sch.reverse_compute_at(yb, m)
    vectorize_exact(sch, sch.get_loops(yb)[-1], lanes)
    return finish(sch)


def build_rmsnorm_bwd(M: int, D: int, *, dtype: str = "float32", arch: Arch | None = None,
                      residual_grad: bool = True, config: dict | None = None) -> tirx.PrimFunc:
    """Inputs dy [M,D], s [M,D], rstd [M], w [D], (dres [M,D] if residual_grad);
    outputs ds [M,D], dw [D].

    ds = rstd * (dy*w - xhat * mean_n(dy*w*xhat)) (+ dres), xhat = s*rstd; dw = sum_m dy*xhat.
    """
    arch = resolve_arch(arch)
    dy = te.placeholder((M, D), dtype, name="dy")
    s = te.placeholder((M, D), dtype, name="s")
    rstd = te.placeholder((M,), dtype, name="rstd")
    w = te.placeholder((D,), dtype, name="w")
    dres = te.placeholder((M, D), dtype, name="dres") if residual_grad else None
    inv_d = tirx.const(1.0 / D, dtype)
    k = te.reduce_axis((0, D), name="k")
    sgx = te.compute((M,), lambda i: te.sum(dy[i, k] * w[k] * s[i, k], axis=k), name="sgx")

    def ds_fn(i, j):
        # xhat * mean(g*xhat) = s*rstd * rstd*mean(g*s)
        v = rstd[i] * (dy[i, j] * w[j] - s[i, j] * (rstd[i] * rstd[i] * sgx[i] * inv_d))
        return v + dres[i, j] if residual_grad else v

    ds = te.compute((M, D), ds_fn, name="ds")
    r = te.reduce_axis((0, M), name="r")
    dw = te.compute((D,), lambda j: te.sum(dy[r, j] * s[r, j] * rstd[r], axis=r), name="dw")
    ins = [dy, s, rstd, w] + ([dres] if residual_grad else [])
    f = te.create_prim_func(ins + [ds, dw])
    if not arch.is_cpu:
        return f
    lanes = arch.lanes(dtype)
    sch = schedule_of(f)
    m, n = sch.get_loops(sch.get_sblock("ds"))
    if M * D >= PAR_MIN_ELEMS:
        sch.parallel(m)
    vectorize_exact(sch, n, lanes)
    sched_rowsum(sch, sch.get_sblock("sgx"), m, lanes)
    sched_colsum(sch, sch.get_sblock("dw"), arch, dtype, chunks=(config or {}).get("chunks"))
    return finish(sch)
