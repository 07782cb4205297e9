"""Causal grouped-query attention (LLaMA): softmax(Q K^T / sqrt(d) + causal + pad mask) V, fwd/bwd.

Layouts (M = B*T tokens, C = (nh + 2*nkv) * d, G = nh / nkv query heads per key/value head):

* ``qkv`` [M, C]: q heads | k heads | v heads (the fused projection output, rotary already applied
  to q and k by compiler/kernels/rope.py). Query head h reads key/value head ``h // G`` (the
  grouping of Hugging Face's ``repeat_kv``).
* ``ctx``/``dctx`` [M, nh*d], ``probs`` [B, nh, T, T] (saved for the backward), ``dqkv`` [M, C].

Masking: key j is visible to query i iff ``j <= i`` and ``mask[b, j] == 1``; hidden keys get
``NEG`` added (exp underflows to exactly 0). With right padding every query row keeps key 0, so no
row is fully masked (a sequence must not be empty).

[Note: no indices under Select] TVM's simplifier rewrites each branch of ``Select(cond, a, b)``
assuming its condition holds (``min(max(h - nh, 0), nkv - 1)`` becomes ``h - nh`` in the branch
``h >= nh``), but the LLVM code evaluates both branches for every element: the clamps vanished and
the backward read up to 5120 vectors *before* its ``gh`` workspace. Harmless inside the heap,
a segfault when the workspace pool had handed out the start of a large mmap'd block (the "Known
crash" of docs/decoder.md: it needed a big earlier workspace, and disappeared with
``MALLOC_MMAP_MAX_=0``). The dK/dV/dQ write therefore weights clamped reads by 0/1 factors.

Backward: per query head as compiler/kernels/attention.py (dS = P * (dP - rowsum(dP * P)) / sqrt(d),
dQ = dS K, dK_h = dS^T Q, dV_h = P^T dctx); then dK and dV of a key/value head are the sums of
dK_h, dV_h over its G query heads (a second, row-parallel block writing dqkv).

CPU schedule: the one of compiler/kernels/attention.py (parallel over (b, h), per-head packs,
row blocks, register-tiled products); its helpers are reused.
"""

from __future__ import annotations

import math

import tvm
from tvm import s_tir, te, tirx

from compiler.arch import Arch
from compiler.kernels.attention import (
    NEG, _lanes, _row_reduce, _vec, default_config, schedule_bwd, schedule_fwd,
)
from compiler.kernels.common import const
from compiler.kernels.common import exp as common_exp
from compiler.kernels.elementwise import PAR_MIN_ELEMS


def _check(nh, nkv, d):
    if nh % nkv:
        raise ValueError(f"query heads {nh} must be a multiple of key/value heads {nkv}")
    return nh // nkv, nh * d, (nh + nkv) * d, (nh + 2 * nkv) * d


def build_causal_attention_fwd(B, T, nh, nkv, d, *, dtype="float32", arch: Arch,
                               config=None) -> tvm.tirx.PrimFunc:
    """Inputs: qkv [B*T, C], mask [B, T] (1 keep, 0 pad). Outputs: ctx [B*T, nh*d],
    probs [B, nh, T, T]."""
    G, KO, VO, C = _check(nh, nkv, d)
    D, ls = nh * d, _lanes(arch, dtype, T)
    c = lambda v: const(v, dtype)  # noqa: E731
    qkv = te.placeholder((B * T, C), dtype, name="qkv")
    mask = te.placeholder((B, T), dtype, name="mask")
    kt = te.compute((B, nh, d, T), lambda b, h, k, j: qkv[b * T + j, KO + (h // G) * d + k]
                    * c(1.0 / math.sqrt(d)), name="kt")
    k = te.reduce_axis((0, d), name="k")
    S = te.compute((B, nh, T, T), lambda b, h, i, j: te.sum(
        qkv[b * T + i, h * d + k] * kt[b, h, k, j], axis=k), name="S")

    def sb(b, h, i, j):
        hide = (c(1.0) - mask[b, j]) * c(NEG)
        return S[b, h, i, j] + hide + tirx.Select(j > i, c(NEG), c(0.0))

    mxp, mx = _row_reduce(sb, (B, nh, T), T, ls, "max", dtype, "mx")
    E = te.compute((B, nh, T, T), lambda b, h, i, j: common_exp(sb(b, h, i, j) - mx[b, h, i]),
                   name="E")
    smp, sm = _row_reduce(lambda b, h, i, j: E[b, h, i, j], (B, nh, T), T, ls, "sum", dtype, "sm")
    rinv = te.compute((B, nh, T), lambda b, h, i: c(1.0) / sm[b, h, i], name="rinv")
    probs = te.compute((B, nh, T, T), lambda b, h, i, j: E[b, h, i, j] * rinv[b, h, i],
                       name="probs")
    j = te.reduce_axis((0, T), name="jr")
    ctx = te.compute((B, T, nh, d), lambda b, i, h, e: te.sum(
        probs[b, h, i, j] * qkv[b * T + j, VO + (h // G) * d + e], axis=j), name="ctx")
    sch = s_tir.Schedule(te.create_prim_func([qkv, mask, ctx, probs]))
    sch.transform_layout(sch.get_sblock("ctx"), ("write", 0),
                         lambda b, i, h, e: (b * T + i, h * d + e))
    if not arch.is_cpu:
        return sch.mod["main"]
    cfg = {**default_config(B, T, nh, d, dtype=dtype, arch=arch), **(config or {})}
    schedule_fwd(sch, cfg, arch.lanes(dtype), T, ls, mxp, smp, dropout=False)
    return sch.mod["main"]


def build_causal_attention_bwd(B, T, nh, nkv, d, *, dtype="float32", arch: Arch,
                               config=None) -> tvm.tirx.PrimFunc:
    """Inputs: qkv [B*T, C], probs [B, nh, T, T], dctx [B*T, nh*d]. Output: dqkv [B*T, C]."""
    G, KO, VO, C = _check(nh, nkv, d)
    ls = _lanes(arch, dtype, T)
    c = lambda v: const(v, dtype)  # noqa: E731
    qkv = te.placeholder((B * T, C), dtype, name="qkv")
    P = te.placeholder((B, nh, T, T), dtype, name="probs")
    dctx = te.placeholder((B * T, nh * d), dtype, name="dctx")
    vt = te.compute((B, nh, d, T), lambda b, h, e, j: qkv[b * T + j, VO + (h // G) * d + e],
                    name="vt")
    qp = te.compute((B, nh, T, d), lambda b, h, t, e: qkv[b * T + t, h * d + e], name="qp")
    kp = te.compute((B, nh, T, d), lambda b, h, t, e: qkv[b * T + t, KO + (h // G) * d + e],
                    name="kp")
    dcp = te.compute((B, nh, T, d), lambda b, h, t, e: dctx[b * T + t, h * d + e], name="dcp")
    e = te.reduce_axis((0, d), name="e")
    dp = te.compute((B, nh, T, T), lambda b, h, i, j: te.sum(
        dcp[b, h, i, e] * vt[b, h, e, j], axis=e), name="dpd")
    rdp, rd = _row_reduce(lambda b, h, i, j: dp[b, h, i, j] * P[b, h, i, j], (B, nh, T), T, ls,
                          "sum", dtype, "rd")
    ds = te.compute((B, nh, T, T), lambda b, h, i, j: P[b, h, i, j] * c(1.0 / math.sqrt(d)) * (
        dp[b, h, i, j] - rd[b, h, i]), name="ds")
    jr = te.reduce_axis((0, T), name="jr")
    dq = te.compute((B, nh, T, d), lambda b, h, i, e: te.sum(
        ds[b, h, i, jr] * kp[b, h, jr, e], axis=jr), name="dq")
    ir = te.reduce_axis((0, T), name="ir")
    dk = te.compute((B, nh, T, d), lambda b, h, j, e: te.sum(
        ds[b, h, ir, j] * qp[b, h, ir, e], axis=ir), name="dk")
    ir2 = te.reduce_axis((0, T), name="ir2")
    dv = te.compute((B, nh, T, d), lambda b, h, j, e: te.sum(
        P[b, h, ir2, j] * dcp[b, h, ir2, e], axis=ir2), name="dv")
    gh = te.compute((B, nh, 3, T, d), lambda b, h, p, t, e: tirx.Select(
        p == 0, dq[b, h, t, e], tirx.Select(p == 1, dk[b, h, t, e], dv[b, h, t, e])), name="gh")
    nall = nh + 2 * nkv

    def out(m, h, e):
        b, t = m // T, m % T
        # See [Note: no indices under Select]: 0/1 weights, clamped indices, no condition.
        hq = te.min(h, nh - 1)
        hk = te.min(te.max(h - nh, 0), nkv - 1)
        hv = te.min(te.max(h - nh - nkv, 0), nkv - 1)
        sk = sum(gh[b, hk * G + g, 1, t, e] for g in range(G))
        sv = sum(gh[b, hv * G + g, 2, t, e] for g in range(G))
        is_q, is_v = tirx.Cast(dtype, h < nh), tirx.Cast(dtype, h >= nh + nkv)
        is_k = c(1.0) - is_q - is_v
        return is_q * gh[b, hq, 0, t, e] + is_k * sk + is_v * sv

    dqkv = te.compute((B * T, nall, d), out, name="dqkv")
    sch = s_tir.Schedule(te.create_prim_func([qkv, P, dctx, dqkv]))
    sch.transform_layout(sch.get_sblock("dqkv"), ("write", 0), lambda m, h, e: (m, h * d + e))
    if not arch.is_cpu:
        return sch.mod["main"]
    cfg = {**default_config(B, T, nh, d, dtype=dtype, arch=arch, direction="bwd"),
           **(config or {})}
    L = arch.lanes(dtype)
    schedule_bwd(sch, "gh", cfg, L, T, ls, rdp, dropout=False)
    blk = sch.get_sblock
    m, h, e_ = sch.get_loops(blk("dqkv"))
    if B * T * nall * d >= PAR_MIN_ELEMS:
        sch.parallel(m)
    _vec(sch, blk("dqkv"), L)
    return sch.mod["main"]
