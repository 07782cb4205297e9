"""BERT self-attention core softmax(Q K^T / sqrt(d) + mask) V: forward and backward, one kernel each.

Layouts (M = B*T tokens, D = H*d):

* ``qkv``  [M, 3*Hs*d]: the fused QKV projection output, column blocks q | k | v; head h of q is
  columns h*d .. h*d+d (k: Hs*d + h*d.., v: 2*Hs*d + h*d..). Read in place, no transposes.
* ``ctx``/``dctx`` [M, Hs*d] (head h at columns h*d..), ``probs`` [B, Hs, T, T],
  ``dqkv`` [M, 3*Hs*d] (same layout as qkv).

Head subsets (``heads=(h0, h1)``, Hs = h1 - h0; default all heads, Hs = H): a subset kernel is the
same kernel on the *gathered* columns of its heads: ``qkv[:, subset_columns(H, d, heads)]``
(what a head-split QKV projection produces directly). ctx/probs/dqkv hold only the subset; the full
result is ``ctx = concat(ctx_0, ctx_1, axis=1)``, ``probs = concat(.., axis=1)`` and
``dqkv[:, subset_columns(..)] = dqkv_k``. Only the dropout index uses the global head h0 + h, so
the subsets reproduce the full computation bit-exactly (tests/integration/test_kernels_attention).

Masking adds ``(1 - mask[b, j]) * NEG`` with ``NEG = -1e9`` (finite in float32/64; exp underflows to
exactly 0, same probabilities as HF's ``finfo.min``). Rows that are fully masked are not supported.

CPU schedule (one parallel loop over (b, h), everything for a head stays in L1/L2):
  fwd: pack K^T*scale (d x T) | per block of ``block`` query rows: S = Q K^T (register-tiled,
       vectorised along keys), two-stage vectorised row max / row sum, exp (vectorisable polynomial
       for float32), probs = E / sum, ctx = Pd V (register-tiled, vectorised along d).
  bwd: pack V^T | per row block: dPd = dctx V^T, dS = scale * P * (dP - rowsum(dP * P)) into a
       per-head T x T buffer | dQ = dS K, dK = dS^T Q, dV = Pd^T dctx (register-tiled) | write dqkv.
Dropout masks are regenerated from the common counter hash (flat index ((b*H + h)*T + i)*T + j),
via ``common.keep_scale`` (uint64 arithmetic; see ``common.hash_u32`` for the uint32 miscompile).
GPU (arch.kind == "gpu"): unscheduled, single-stage row reductions; dlight's Fallback rule schedules
it for OpenCL (one thread per output element, no Matmul rule applies to these multi-block funcs).
Timing note: TVM's CPU pool defaults to 1 worker on a 2-vCPU host; set TVM_NUM_THREADS.
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import s_tir, te, tirx

from compiler.arch import Arch
from compiler.kernels.common import const, dtype_of, keep_scale
from compiler.kernels.common import exp as common_exp

NEG = -1e9


# ----------------------------------------------------------------------------------------- config
def default_config(B, T, H, d, *, dtype="float32", arch: Arch, direction="fwd") -> dict:
    """Row block per (b, h) step, register tile rows, vectors per register tile row."""
    return {"block": 16 if direction == "fwd" else 8, "rt": 8, "nv": 2}


def config_space(B, T, H, d, *, dtype="float32", arch: Arch, direction="fwd") -> list[dict]:
    return [{"block": blk, "rt": rt, "nv": nv}
            for blk in (8, 16, 32) for rt in (4, 8) for nv in (1, 2) if blk % rt == 0]


def subset_columns(H: int, d: int, heads: tuple[int, int]) -> np.ndarray:
    """Column indices of the full [M, 3*H*d] qkv that a ``heads=(h0, h1)`` kernel takes (q|k|v)."""
    h0, h1 = heads
    return np.concatenate([np.arange(p * H * d + h0 * d, p * H * d + h1 * d) for p in range(3)])


def _heads(H, heads):
    h0, h1 = heads if heads is not None else (0, H)
    if not 0 <= h0 < h1 <= H:
        raise ValueError(f"bad head subset {heads} for H={H}")
    return h0, h1 - h0


# ------------------------------------------------------------------------------ expression helpers
_exp = common_exp


def _row_reduce(f, shape3, T, ls, kind, dtype, name):
    """r[b,h,i] = reduce_j f(b,h,i,j); two stages (ls partial lanes, vectorisable) when ls > 1."""
    op = te.max if kind == "max" else te.sum
    if ls <= 1:
        j = te.reduce_axis((0, T), name="j")
        return [], te.compute(shape3, lambda b, h, i: op(f(b, h, i, j), axis=j), name=name)
    r = te.reduce_axis((0, T // ls), name="r")
    part = te.compute((*shape3, ls), lambda b, h, i, l: op(f(b, h, i, r * ls + l), axis=r),
                      name=name + "_part")
    l2 = te.reduce_axis((0, ls), name="l")
    return [part], te.compute(shape3, lambda b, h, i: op(part[b, h, i, l2], axis=l2), name=name)


def _lanes(arch, dtype, n):
    return math.gcd(n, arch.lanes(dtype)) if arch.is_cpu else 1


# --------------------------------------------------------------------------------------- forward
def build_attention_fwd(B, T, H, d, *, dtype="float32", arch: Arch, dropout=0.0, salt=0,
                        heads=None, config=None) -> tvm.tirx.PrimFunc:
    """Inputs: qkv [B*T, 3*Hs*d], mask [B, T] (1 keep, 0 pad), seed [2] int64 (seed, dropout on/off).
    Outputs: ctx [B*T, Hs*d], probs [B, Hs, T, T] (softmax before dropout, saved for backward)."""
    h0, Hs = _heads(H, heads)
    D, ls = Hs * d, _lanes(arch, dtype, T)
    scale = 1.0 / math.sqrt(d)
    c = lambda v: const(v, dtype)  # noqa: E731
    qkv = te.placeholder((B * T, 3 * D), dtype, name="qkv")
    mask = te.placeholder((B, T), dtype, name="mask")
    seed = te.placeholder((2,), "int64", name="seed")
    kt = te.compute((B, Hs, d, T), lambda b, h, k, j: qkv[b * T + j, D + h * d + k] * c(scale),
                    name="kt")
    k = te.reduce_axis((0, d), name="k")
    S = te.compute((B, Hs, T, T), lambda b, h, i, j: te.sum(
        qkv[b * T + i, h * d + k] * kt[b, h, k, j], axis=k), name="S")
    sb = lambda b, h, i, j: S[b, h, i, j] + (c(1.0) - mask[b, j]) * c(NEG)  # noqa: E731
    mxp, mx = _row_reduce(sb, (B, Hs, T), T, ls, "max", dtype, "mx")
    E = te.compute((B, Hs, T, T), lambda b, h, i, j: _exp(sb(b, h, i, j) - mx[b, h, i]), name="E")
    smp, sm = _row_reduce(lambda b, h, i, j: E[b, h, i, j], (B, Hs, T), T, ls, "sum", dtype, "sm")
    rinv = te.compute((B, Hs, T), lambda b, h, i: c(1.0) / sm[b, h, i], name="rinv")
    probs = te.compute((B, Hs, T, T), lambda b, h, i, j: E[b, h, i, j] * rinv[b, h, i],
                       name="probs")
    pd = probs
    if dropout > 0.0:
        pd = te.compute((B, Hs, T, T), lambda b, h, i, j: probs[b, h, i, j] * keep_scale(
            ((b * H + h0 + h) * T + i) * T + j, seed[0], salt, dropout, dtype), name="pd")
    j = te.reduce_axis((0, T), name="jr")
    # ctx in [B, T, Hs, d] (= [M, Hs*d] row-major); transform_layout makes the buffer 2-D below.
    ctx = te.compute((B, T, Hs, d), lambda b, i, h, e: te.sum(
        pd[b, h, i, j] * qkv[b * T + j, 2 * D + h * d + e], axis=j), name="ctx")
    sch = s_tir.Schedule(te.create_prim_func([qkv, mask, seed, ctx, probs]))
    sch.transform_layout(sch.get_sblock("ctx"), ("write", 0),
                         lambda b, i, h, e: (b * T + i, h * d + e))
    if arch.is_cpu:
        cfg = {**default_config(B, T, H, d, dtype=dtype, arch=arch), **(config or {})}
        schedule_fwd(sch, cfg, arch.lanes(dtype), T, ls, mxp, smp, dropout=dropout > 0.0)
    return sch.mod["main"]


# -------------------------------------------------------------------------------------- backward
def build_attention_bwd(B, T, H, d, *, dtype="float32", arch: Arch, dropout=0.0, salt=0,
                        heads=None, config=None) -> tvm.tirx.PrimFunc:
    """Inputs: qkv [B*T, 3*Hs*d], probs [B, Hs, T, T], dctx [B*T, Hs*d], seed [2] int64 (seed, dropout on/off).
    Output: dqkv [B*T, 3*Hs*d] (dQ | dK | dV column blocks)."""
    h0, Hs = _heads(H, heads)
    D, ls = Hs * d, _lanes(arch, dtype, T)
    scale = 1.0 / math.sqrt(d)
    c = lambda v: const(v, dtype)  # noqa: E731
    qkv = te.placeholder((B * T, 3 * D), dtype, name="qkv")
    P = te.placeholder((B, Hs, T, T), dtype, name="probs")
    dctx = te.placeholder((B * T, D), dtype, name="dctx")
    seed = te.placeholder((2,), "int64", name="seed")
    keep = lambda b, h, i, j: keep_scale(  # noqa: E731
        ((b * H + h0 + h) * T + i) * T + j, seed[0], salt, dropout, dtype)
    # per-head packs (contiguous; the row strides of qkv / dctx alias in L1 at 4 KiB)
    vt = te.compute((B, Hs, d, T), lambda b, h, e, j: qkv[b * T + j, 2 * D + h * d + e], name="vt")
    qp = te.compute((B, Hs, T, d), lambda b, h, t, e: qkv[b * T + t, h * d + e], name="qp")
    kp = te.compute((B, Hs, T, d), lambda b, h, t, e: qkv[b * T + t, D + h * d + e], name="kp")
    dcp = te.compute((B, Hs, T, d), lambda b, h, t, e: dctx[b * T + t, h * d + e], name="dcp")
    e = te.reduce_axis((0, d), name="e")
    dpd = te.compute((B, Hs, T, T), lambda b, h, i, j: te.sum(
        dcp[b, h, i, e] * vt[b, h, e, j], axis=e), name="dpd")
    if dropout > 0.0:
        dp = lambda b, h, i, j: dpd[b, h, i, j] * keep(b, h, i, j)  # noqa: E731
    else:
        dp = lambda b, h, i, j: dpd[b, h, i, j]  # noqa: E731
    rdp, rd = _row_reduce(lambda b, h, i, j: dp(b, h, i, j) * P[b, h, i, j], (B, Hs, T), T, ls,
                          "sum", dtype, "rd")
    ds = te.compute((B, Hs, T, T), lambda b, h, i, j: P[b, h, i, j] * c(scale) * (
        dp(b, h, i, j) - rd[b, h, i]), name="ds")  # already scaled by 1/sqrt(d)
    pd = P
    if dropout > 0.0:
        pd = te.compute((B, Hs, T, T), lambda b, h, i, j: P[b, h, i, j] * keep(b, h, i, j),
                        name="pd")
    jr = te.reduce_axis((0, T), name="jr")
    dq = te.compute((B, Hs, T, d), lambda b, h, i, e: te.sum(
        ds[b, h, i, jr] * kp[b, h, jr, e], axis=jr), name="dq")
    ir = te.reduce_axis((0, T), name="ir")
    dk = te.compute((B, Hs, T, d), lambda b, h, j, e: te.sum(
        ds[b, h, ir, j] * qp[b, h, ir, e], axis=ir), name="dk")
    ir2 = te.reduce_axis((0, T), name="ir2")
    dv = te.compute((B, Hs, T, d), lambda b, h, j, e: te.sum(
        pd[b, h, ir2, j] * dcp[b, h, ir2, e], axis=ir2), name="dv")
    dqkv = te.compute((B, T, 3, Hs, d), lambda b, t, p, h, e: tirx.Select(
        p == 0, dq[b, h, t, e], tirx.Select(p == 1, dk[b, h, t, e], dv[b, h, t, e])), name="dqkv")
    sch = s_tir.Schedule(te.create_prim_func([qkv, P, dctx, seed, dqkv]))
    sch.transform_layout(sch.get_sblock("dqkv"), ("write", 0),
                         lambda b, t, p, h, e: (b * T + t, p * D + h * d + e))
    if arch.is_cpu:
        cfg = {**default_config(B, T, H, d, dtype=dtype, arch=arch, direction="bwd"),
               **(config or {})}
        L = arch.lanes(dtype)
        b, t, p, h, e_ = sch.get_loops(sch.get_sblock("dqkv"))
        sch.reorder(b, h, p, t, e_)
        schedule_bwd(sch, "dqkv", cfg, L, T, ls, rdp, dropout=dropout > 0.0)
    return sch.mod["main"]


# ------------------------------------------------------------------------------ schedule helpers
def schedule_fwd(sch, cfg, L, T, ls, mxp, smp, *, dropout: bool) -> None:
    """CPU schedule of a forward built like `build_attention_fwd` (blocks S, mx, E, sm, rinv,
    probs, [pd], ctx, kt): parallel over (b, h), row blocks of cfg["block"] queries, per-head
    packs of K^T and V, register-tiled S and ctx. Shared with compiler/kernels/causal_attention.py.
    """
    blk = sch.get_sblock
    b, h, i, _ = sch.get_loops(blk("probs"))
    bh = sch.fuse(b, h)
    sch.parallel(bh)
    io, _ = sch.split(i, [None, math.gcd(T, cfg["block"])])
    for name in ["rinv", "sm", *[t.op.name for t in smp], "E", "mx",
                 *[t.op.name for t in mxp], "S"]:
        sch.compute_at(blk(name), io)
    _vec(sch, blk("probs"), L)
    _vec(sch, blk("E"), L)
    if dropout:
        sch.reverse_compute_at(blk("pd"), io)
        _vec(sch, blk("pd"), L)
    sch.reverse_compute_at(blk("ctx"), io)
    # per-head packs of K^T and V: contiguous, no 4 KiB-aliasing rows (qkv row stride 3*D)
    vp = sch.cache_read(blk("ctx"), _read_index(sch, blk("ctx"), "qkv"), "global",
                        consumer_blocks=[blk("ctx")])
    for b_ in (blk("kt"), vp):
        sch.compute_at(b_, bh)
        _vec(sch, b_, L)
    for t in mxp + smp:
        _partial(sch, blk(t.op.name), T // ls)
    _tile_mm(sch, blk("S"), cfg, L)
    _tile_mm(sch, blk("ctx"), cfg, L)


def schedule_bwd(sch, out, cfg, L, T, ls, rdp, *, dropout: bool) -> None:
    """CPU schedule of a backward built like `build_attention_bwd` (packs vt, qp, kp, dcp; dpd,
    rd, ds, [pd], dq, dk, dv) whose per-head output block `out` has loops (b, h, p, t, e) in that
    order: parallel over (b, h), row blocks for ds, register-tiled products."""
    blk = sch.get_sblock
    b, h, p, _, _ = sch.get_loops(blk(out))
    bh = sch.fuse(b, h)
    sch.parallel(bh)
    sch.unroll(p)
    _vec(sch, blk(out), L)
    extra = ["pd"] if dropout else []
    for name in ["dv", "dk", "dq", "ds", *extra]:
        sch.compute_at(blk(name), bh)
    i = sch.get_loops(blk("ds"))[-2]
    io, _ = sch.split(i, [None, math.gcd(T, cfg["block"])])
    for name in ["rd", *[t.op.name for t in rdp], "dpd"]:
        sch.compute_at(blk(name), io)
    for name in ("vt", "qp", "kp", "dcp"):
        sch.compute_at(blk(name), bh)
    for name in ["vt", "qp", "kp", "dcp", "ds", *extra]:
        _vec(sch, blk(name), L)
    for t in rdp:
        _partial(sch, blk(t.op.name), T // ls)
    _tile_mm(sch, blk("dpd"), cfg, L)
    for name in ["dq", "dk", "dv"]:
        _tile_mm(sch, blk(name), cfg, L)


def _read_index(sch, block, name):
    return [r.source.name for r in sch.get(block).reads].index(name)


def _vec(sch, block, L):
    """Vectorise the innermost loop of an elementwise block by L lanes (split when longer)."""
    loop = sch.get_loops(block)[-1]
    n = int(sch.get(loop).extent)
    lanes = math.gcd(n, L)
    if lanes < n:
        loop = sch.split(loop, [None, lanes])[-1]
    sch.vectorize(loop)


def _partial(sch, block, nred):
    """Partial row reduction (i, l, r): reduce r outside, vectorise the lane axis l."""
    if nred == 1:  # the r loop was dropped (unit extent)
        sch.vectorize(sch.get_loops(block)[-1])
        return
    i, l_, r = sch.get_loops(block)[-3:]
    sch.reorder(i, r, l_)
    sch.vectorize(l_)
    _vec_init(sch, sch.decompose_reduction(block, r))


def _tile_mm(sch, block, cfg, L, row_col=(-3, -2)):
    """Register-tile a reduction block whose loops end in (row.., col, red): an rt x (nv*L)
    accumulator tile in a local buffer, reduction loop outside the unrolled/vectorised tile."""
    acc = sch.cache_write(block, 0, "local")
    loops = sch.get_loops(block)
    r, c, k = loops[row_col[0]], loops[row_col[1]], loops[-1]
    nr, nc = int(sch.get(r).extent), int(sch.get(c).extent)
    rt = math.gcd(nr, cfg["rt"])
    lanes = math.gcd(nc, L)
    nv = math.gcd(nc // lanes, cfg["nv"])
    ro, ri = sch.split(r, [None, rt])
    co, cv, ci = sch.split(c, [None, nv, lanes])
    between = loops[row_col[0] + 1:row_col[1]] if row_col[1] - row_col[0] > 1 else []
    sch.reorder(ro, *between, co, k, ri, cv, ci)
    sch.reverse_compute_at(acc, co)
    sch.unroll(ri)
    sch.unroll(cv)
    sch.vectorize(ci)
    _vec_init(sch, sch.decompose_reduction(block, k))
    _vec(sch, acc, lanes)


def _vec_init(sch, init):
    """Vectorise the innermost loop of a decomposed reduction init block (if not already)."""
    loop = sch.get_loops(init)[-1]
    if sch.get(loop).kind != tirx.ForKind.VECTORIZED:
        sch.vectorize(loop)
