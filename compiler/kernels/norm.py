"""LayerNorm forward/backward (with the fused residual add and dropout of BERT's SelfOutput/Output).

CPU schedule: one parallel loop over rows; each row's work (dropout+residual into a row-local
buffer, mean, variance, xhat, y) is computed at that loop so the row stays in L1; the reductions over
D use `lanes` vector accumulators (rfactor). The backward's column sums (dgamma, dbeta: one tuple reduction,
one pass over dy) are per-thread partial sums over row chunks plus a small final reduction.
"""

from __future__ import annotations

from tvm import te, tirx

from compiler.arch import Arch
from compiler.kernels.elementwise import (
    PAR_MIN_ELEMS,
    finish,
    keep_scale,
    resolve_arch,
    sched_colsum,
    sched_rowsum,
    schedule_of,
    vectorize_exact,
)


def build_layernorm_fwd(M: int, D: int, *, eps: float = 1e-12, dtype: str = "float32",
                        arch: Arch | None = None, residual: bool = True, dropout: float = 0.0,
                        salt: int = 0, config: dict | None = None,
                        seed_len: int = 2) -> tirx.PrimFunc:
    """Inputs x [M,D], (resid [M,D] if residual), gamma [D], beta [D], seed [seed_len] int64;
    outputs y [M,D], xhat [M,D], rstd [M].

    s = dropout(x) + resid (or s = x without residual; then dropout must be 0);
    mean/var over D (biased), rstd = 1/sqrt(var+eps), xhat = (s-mean)*rstd, y = xhat*gamma+beta.
    Dropout flat index = m*D + n. seed_len=2: seed[1] is the dropout on/off flag."""
    arch = resolve_arch(arch)
    if not residual and dropout > 0.0:
        raise ValueError("layernorm without residual does not take dropout (dropout must be 0)")
    x = te.placeholder((M, D), dtype, name="x")
    resid = te.placeholder((M, D), dtype, name="resid") if residual else None
    gamma = te.placeholder((D,), dtype, name="gamma")
    beta = te.placeholder((D,), dtype, name="beta")
    seed = te.placeholder((seed_len,), "int64", name="seed")
    inv_d = tirx.const(1.0 / D, dtype)

    def s_fn(i, j):
        v = x[i, j]
        if dropout > 0.0:
            v = v * keep_scale(i * D + j, seed[0], salt, dropout, dtype)
        if residual:
            v = v + resid[i, j]
        return v

    s = te.compute((M, D), s_fn, name="s")
    k1 = te.reduce_axis((0, D), name="k1")
    ssum = te.compute((M,), lambda i: te.sum(s[i, k1], axis=k1), name="ssum")
    k2 = te.reduce_axis((0, D), name="k2")
    vsum = te.compute(
        (M,),
        lambda i: te.sum((s[i, k2] - ssum[i] * inv_d) * (s[i, k2] - ssum[i] * inv_d), axis=k2),
        name="vsum",
    )
    rstd = te.compute(
        (M,),
        lambda i: tirx.const(1.0, dtype) / te.sqrt(vsum[i] * inv_d + tirx.const(eps, dtype)),
        name="rstd",
    )
    xhat = te.compute((M, D), lambda i, j: (s[i, j] - ssum[i] * inv_d) * rstd[i], name="xhat")
    y = te.compute((M, D), lambda i, j: xhat[i, j] * gamma[j] + beta[j], name="y")
    ins = [x] + ([resid] if residual else []) + [gamma, beta, seed]
    f = te.create_prim_func(ins + [y, xhat, rstd])
    if not arch.is_cpu:
        return f
    lanes = arch.lanes(dtype)
    sch = schedule_of(f)
    if dropout > 0.0:
        # materialise s (a row-local buffer after compaction): the hash is too costly to recompute
        sb = sch.get_sblock("s")
        m, n = sch.get_loops(sb)
        if M * D >= PAR_MIN_ELEMS:
            sch.parallel(m)
        vectorize_exact(sch, n, lanes)
        sched_rowsum(sch, sch.get_sblock("ssum"), m, lanes, reverse=True)
    else:
        # s = x + resid is recomputed by its three readers (from L1): no scratch buffer per row
        sch.compute_inline(sch.get_sblock("s"))
        m = sched_rowsum(sch, sch.get_sblock("ssum"), None, lanes,
                         anchor_parallel=M * D >= PAR_MIN_ELEMS)
    # every consumer of the row goes under the row loop (reverse_compute_at also works for outputs)
    sched_rowsum(sch, sch.get_sblock("vsum"), m, lanes, reverse=True)
    sch.reverse_compute_at(sch.get_sblock("rstd"), m)
    for name in ("xhat", "y"):
        b = sch.get_sblock(name)
        sch.reverse_compute_at(b, m)
        vectorize_exact(sch, sch.get_loops(b)[-1], lanes)
    return finish(sch)


def build_layernorm_bwd(M: int, D: int, *, dtype: str = "float32", arch: Arch | None = None,
                        dropout: float = 0.0, salt: int = 0,
                        config: dict | None = None, seed_len: int = 2) -> tirx.PrimFunc:
    """Inputs dy [M,D], xhat [M,D], rstd [M], gamma [D], seed [seed_len] int64;
    outputs ds [M,D], dgamma [D], dbeta [D], and dx [M,D] = ds * keep only if dropout > 0.

    g = dy*gamma; ds = rstd * (g - mean_n(g) - xhat * mean_n(g*xhat)). ds is also the gradient
    flowing to the residual input. seed_len=2: seed[1] is the dropout on/off flag."""
    arch = resolve_arch(arch)
    dy = te.placeholder((M, D), dtype, name="dy")
    xhat = te.placeholder((M, D), dtype, name="xhat")
    rstd = te.placeholder((M,), dtype, name="rstd")
    gamma = te.placeholder((D,), dtype, name="gamma")
    seed = te.placeholder((seed_len,), "int64", name="seed")
    inv_d = tirx.const(1.0 / D, dtype)
    k1 = te.reduce_axis((0, D), name="k1")
    sg = te.compute((M,), lambda i: te.sum(dy[i, k1] * gamma[k1], axis=k1), name="sg")
    k2 = te.reduce_axis((0, D), name="k2")
    sgx = te.compute(
        (M,), lambda i: te.sum(dy[i, k2] * gamma[k2] * xhat[i, k2], axis=k2), name="sgx"
    )
    ds = te.compute(
        (M, D),
        lambda i, j: rstd[i]
        * (dy[i, j] * gamma[j] - sg[i] * inv_d - xhat[i, j] * (sgx[i] * inv_d)),
        name="ds",
    )
    if arch.is_cpu:
        # dgamma and dbeta in ONE pass over dy (a tuple reduction; rfactor handles both buffers)
        tsum = te.comm_reducer(lambda a, b: (a[0] + b[0], a[1] + b[1]),
                               lambda t0, t1: (tirx.const(0.0, t0), tirx.const(0.0, t1)),
                               name="tsum")
        r = te.reduce_axis((0, M), name="r")
        dgamma, dbeta = te.compute(
            (D,), lambda j: tsum((dy[r, j] * xhat[r, j], dy[r, j]), axis=r), name="dgb")
    else:  # plain te.sum reductions for dlight
        r1 = te.reduce_axis((0, M), name="r1")
        dgamma = te.compute((D,), lambda j: te.sum(dy[r1, j] * xhat[r1, j], axis=r1),
                            name="dgamma")
        r2 = te.reduce_axis((0, M), name="r2")
        dbeta = te.compute((D,), lambda j: te.sum(dy[r2, j], axis=r2), name="dbeta")
    outs = [ds, dgamma, dbeta]
    if dropout > 0.0:
        dx = te.compute(
            (M, D),
            lambda i, j: ds[i, j] * keep_scale(i * D + j, seed[0], salt, dropout, dtype),
            name="dx",
        )
        outs.append(dx)
    f = te.create_prim_func([dy, xhat, rstd, gamma, seed] + outs)
    if not arch.is_cpu:
        return f
    lanes = arch.lanes(dtype)
    chunks = (config or {}).get("chunks")
    sch = schedule_of(f)
    top = sch.get_sblock("ds")
    m, n = sch.get_loops(top)
    if M * D >= PAR_MIN_ELEMS:
        sch.parallel(m)
    vectorize_exact(sch, n, lanes)
    if dropout > 0.0:
        dxb = sch.get_sblock("dx")
        sch.reverse_compute_at(dxb, m)
        vectorize_exact(sch, sch.get_loops(dxb)[-1], lanes)
    sched_rowsum(sch, sch.get_sblock("sgx"), m, lanes)
    sched_rowsum(sch, sch.get_sblock("sg"), m, lanes)
    sched_colsum(sch, sch.get_sblock("dgb"), arch, dtype, chunks=chunks)
    return finish(sch)
