"""GEMM with fused epilogues: TE compute + a register-blocked s_tir schedule for CPUs.

``C[..., m, n] = epilogue(sum_k A'[..., m, k] * B'[..., k, n] (+ bias[n]))``

CPU schedule (``arch.kind == "cpu"``), BLIS-like but without a K split:

* B is repacked into panels ``Bp[..., N/NR, K, NR]`` (always when ``trans_b``, optional otherwise), so
  the micro-kernel streams one contiguous panel; A is read in place (``A[m, k]`` or ``A[k, m]``), one
  broadcast per row and k.
* micro-kernel: ``MR x NR`` accumulators (``NR = nr * lanes``) held in registers over the *whole* K
  loop (a ``local`` cache of the accumulator, unrolled over rows/vectors, vectorised over lanes), so
  the epilogue (bias, GELU, GELU-gradient, residual add) is applied straight from registers and C is
  written exactly once.
* cache blocking: ``nc`` panels of B (``nc * K * NR`` elements, sized for L2) are swept by every
  ``MR``-row strip of A (which stays in L1); the fused (batch, N-block, M-strip) loop is ``parallel``.
* shapes that are not multiples of the tile are padded: the accumulator covers ``ceil(M/MR)*MR x
  ceil(N/NR)*NR`` with clamped (in-bounds) operand reads, and the store to C is guarded.

On ``arch.kind == "gpu"`` the plain TE compute is returned unscheduled for dlight.
"""

from __future__ import annotations

import math
from typing import Any

import tvm
from tvm import s_tir, te, tirx

from compiler.kernels import common

EPILOGUES = (None, "gelu", "gelu_grad", "add")
_BYTES = {"float32": 4, "float64": 8, "float16": 2}
_L2_BUDGET = 512 * 1024  # bytes of packed B swept per M-strip (half of a 1 MiB L2)


def _registers(arch) -> int:
    """Vector registers of the target ISA (AVX-512 and NEON: 32, AVX2/SSE: 16)."""
    return 32 if arch.vector_bits >= 512 or arch.elf_machine == "aarch64" else 16


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _panels(N: int, K: int, nr: int, arch, dtype: str) -> int:
    """Number of B panels (``nr`` vectors wide) that fit the L2 budget, dividing the panel count."""
    NR = nr * arch.lanes(dtype)
    npan = -(-N // NR)
    per = K * NR * _BYTES[dtype]
    fit = [d for d in _divisors(npan) if d * per <= _L2_BUDGET]
    return max(fit) if fit else 1


def default_config(M: int, N: int, K: int, *, trans_a: bool = False, trans_b: bool = False, arch,
                   dtype: str = "float32") -> dict[str, Any]:
    """A good tile choice without tuning.

    ``mr`` rows x ``nr`` vectors of accumulators (``mr*nr + nr + 1`` registers), preferring a panel
    width that divides N and a row count that divides M; ``nc`` = B panels per L2 block; ``pack_b``
    repacks B into contiguous panels (required for ``trans_b``, faster for large M otherwise).
    """
    L = arch.lanes(dtype)
    regs = _registers(arch)
    nv = -(-N // L)  # vectors needed to cover N
    nr = next((c for c in (3, 2, 4, 1) if c <= nv and nv % c == 0 and c + 2 <= regs), min(nv, 3 if regs >= 32 else 2))
    cap = (regs - nr - 1) // nr  # max rows that fit in registers
    rows = [r for r in (8, 12, 14, 6, 10, 4) if r <= cap] or [max(1, cap)]
    mr = next((r for r in rows if M % r == 0), min(rows[0], M))  # else pad M up to a multiple
    return {"mr": mr, "nr": nr, "nc": _panels(N, K, nr, arch, dtype), "pack_b": bool(trans_b or M >= 64),
            "pack_a": bool(trans_a)}


def config_space(M: int, N: int, K: int, *, trans_a: bool = False, trans_b: bool = False, arch,
                 dtype: str = "float32") -> list[dict[str, Any]]:
    """A few dozen candidates for the on-board tuner (register tiles x L2 block x packing)."""
    L = arch.lanes(dtype)
    regs = _registers(arch)
    nv = -(-N // L)
    out, seen = [], set()
    base = default_config(M, N, K, trans_a=trans_a, trans_b=trans_b, arch=arch, dtype=dtype)
    cands = [base]
    for nr in (1, 2, 3, 4):
        if nr > nv:
            continue
        cap = (regs - nr - 1) // nr
        for mr in sorted({min(cap, r) for r in (4, 6, 8, 12, 14, 28)}):
            if mr > max(M, 1) * 2:
                continue
            full = _panels(N, K, nr, arch, dtype)
            for nc in sorted({full, max(1, full // 2), 1}):
                for pack in ((True,) if trans_b else (True, False)):
                    cands.append({"mr": mr, "nr": nr, "nc": nc, "pack_b": pack})
    for c in cands:
        key = tuple(sorted(c.items()))
        if key not in seen:
            seen.add(key)
            out.append(c)
    # keep it small: the default first, then the register-richest tiles
    out = out[:1] + sorted(out[1:], key=lambda c: (-(c["mr"] * c["nr"]), -c["nc"]))
    return out[:40]


def _epilogue(acc, m_n, *, dtype, bias_t, extra_t, epilogue, batch_idx):
    """The element-wise tail applied to one accumulator value."""
    m, n = m_n
    v = acc
    if bias_t is not None:
        v = v + bias_t[n]
    if epilogue == "gelu":
        return common.gelu(v)
    if epilogue == "gelu_grad":
        return v * common.gelu_grad(extra_t[(*batch_idx, m, n)])
    if epilogue == "add":
        return v + extra_t[(*batch_idx, m, n)]
    return v


def _schedule_pack(sch, name: str, nb: int, K: int, L: int, rows_contiguous: bool) -> None:
    """Schedule a panel pack ``P[..., i, k, r]`` so that both its reads and writes stay local.

    ``rows_contiguous``: the source is contiguous along r (``A[k, m]``, ``B[k, n]``): walk 16 k-rows
    at a time across all panels (a plain (i, k, r) walk crosses a page per k: 4x slower). Otherwise
    the source is contiguous along k (``B[n, k]``, ``A[m, k]``): read 16 k's of each row per step.
    """
    blk = sch.get_sblock(name)
    *bl, i, k, r = sch.get_loops(blk)
    kb = max(d for d in _divisors(K) if d <= 16)
    k0, k1 = sch.split(k, [None, kb])
    if rows_contiguous:
        sch.reorder(*bl, k0, i, k1, r)
        sch.parallel(sch.fuse(*bl, k0))
        sch.vectorize(r)
    else:
        sch.reorder(*bl, i, k0, r, k1)
        sch.parallel(sch.fuse(*bl, i))
        sch.vectorize(k1)


def build_gemm(M: int, N: int, K: int, *, trans_a: bool = False, trans_b: bool = False, batch=(),
               dtype: str = "float32", arch, config: dict | None = None, bias: bool = False,
               epilogue: str | None = None) -> tvm.tirx.PrimFunc:
    """Build a (batched) GEMM with an optional fused bias and element-wise epilogue.

    Parameters
    ----------
    M, N, K : int
        Output rows, output columns, reduction length.
    trans_a : bool
        A is stored ``[..., K, M]`` (else ``[..., M, K]``).
    trans_b : bool
        B is stored ``[..., N, K]`` (HF ``[out, in]`` weight; else ``[..., K, N]``).
    batch : tuple of int
        Leading batch dimensions shared by A, B, the extra input and C (no broadcasting).
    dtype : str
        "float32" or "float64".
    arch : Arch
        Compile target; GPU arches get the unscheduled compute (for dlight).
    config : dict, optional
        Tile knobs ``mr, nr, nc, pack_b`` (see `default_config`); missing keys take the defaults.
    bias : bool
        Add ``bias[n]`` (shape ``[N]``) to the accumulator.
    epilogue : {None, "gelu", "gelu_grad", "add"}
        None: ``C = acc (+bias)``; "gelu": ``C = gelu(acc + bias)``; "gelu_grad": extra input
        ``U [..., M, N]``, ``C = acc * gelu_grad(U)``; "add": extra input ``R [..., M, N]``,
        ``C = acc (+bias) + R``.

    Returns
    -------
    tvm.tirx.PrimFunc
        Buffers ``A, B, [bias], [U or R], C``.
    """
    if epilogue not in EPILOGUES:
        raise ValueError(f"unknown epilogue {epilogue!r}; choose one of {EPILOGUES}")
    batch = tuple(int(b) for b in batch)
    nb = len(batch)
    A = te.placeholder((*batch, K, M) if trans_a else (*batch, M, K), dtype, "A")
    B = te.placeholder((*batch, N, K) if trans_b else (*batch, K, N), dtype, "B")
    bias_t = te.placeholder((N,), dtype, "bias") if bias else None
    extra_t = None
    if epilogue in ("gelu_grad", "add"):
        extra_t = te.placeholder((*batch, M, N), dtype, "U" if epilogue == "gelu_grad" else "R")
    ins = [A, B] + ([bias_t] if bias else []) + ([extra_t] if extra_t is not None else [])
    fused = bias or epilogue is not None

    def a_at(bi, m, k):
        return A[(*bi, k, m)] if trans_a else A[(*bi, m, k)]

    def b_at(bi, k, n):
        return B[(*bi, n, k)] if trans_b else B[(*bi, k, n)]

    def epi(acc_t):
        return te.compute(
            (*batch, M, N),
            lambda *i: _epilogue(acc_t[i], i[nb:], dtype=dtype, bias_t=bias_t, extra_t=extra_t,
                                 epilogue=epilogue, batch_idx=i[:nb]),
            name="C")

    if not arch.is_cpu:  # dlight-schedulable plain compute
        k = te.reduce_axis((0, K), "k")
        acc = te.compute((*batch, M, N), lambda *i: te.sum(a_at(i[:nb], i[nb], k) * b_at(i[:nb], k, i[nb + 1]), axis=k),
                         name="C" if not fused else "acc")
        return te.create_prim_func([*ins, epi(acc) if fused else acc])

    cfg = default_config(M, N, K, trans_a=trans_a, trans_b=trans_b, arch=arch, dtype=dtype)
    cfg.update(config or {})
    L = arch.lanes(dtype)
    mr, nr = int(cfg["mr"]), int(cfg["nr"])
    pack_b = bool(cfg["pack_b"]) or trans_b
    pack_a = bool(cfg.get("pack_a", False))
    NR = nr * L
    Mp, Np = -(-M // mr) * mr, -(-N // NR) * NR
    npan = Np // NR
    nc = max(d for d in _divisors(npan) if d <= max(1, int(cfg["nc"])))

    # Padded rows/cols read clamped (in-bounds) operands; their results are never stored.
    cm = (lambda m: te.min(m, M - 1)) if Mp != M else (lambda m: m)
    cn = (lambda n: te.min(n, N - 1)) if Np != N else (lambda n: n)
    if pack_b:
        Bp = te.compute((*batch, npan, K, NR), lambda *i: b_at(i[:nb], i[nb + 1], cn(i[nb] * NR + i[nb + 2])),
                        name="Bp")
        b_op = lambda bi, k, n: Bp[(*bi, n // NR, k, n % NR)]  # noqa: E731
    else:
        b_op = lambda bi, k, n: b_at(bi, k, cn(n))  # noqa: E731
    if pack_a:
        Ap = te.compute((*batch, Mp // mr, K, mr), lambda *i: a_at(i[:nb], cm(i[nb] * mr + i[nb + 2]), i[nb + 1]),
                        name="Ap")
        a_op = lambda bi, m, k: Ap[(*bi, m // mr, k, m % mr)]  # noqa: E731
    else:
        a_op = lambda bi, m, k: a_at(bi, cm(m), k)  # noqa: E731
    k = te.reduce_axis((0, K), "k")
    acc = te.compute((*batch, Mp, Np),
                     lambda *i: te.sum(a_op(i[:nb], i[nb], k) * b_op(i[:nb], k, i[nb + 1]), axis=k),
                     name="acc")
    C = epi(acc)
    sch = s_tir.Schedule(te.create_prim_func([*ins, C]))

    # -- micro-kernel: (batch, N-block, M-strip) parallel | panel | k | mr rows | nr vectors | lanes
    blk = sch.get_sblock("acc")
    *bl, m, n, kk = sch.get_loops(blk)
    mo, mi = sch.split(m, [None, mr])
    noo, noi, nvo, nvi = sch.split(n, [None, nc, nr, L])
    sch.reorder(*bl, noo, mo, noi, kk, mi, nvo, nvi)
    sch.parallel(sch.fuse(*bl, noo, mo))
    sch.unroll(mi)
    sch.unroll(nvo)
    sch.vectorize(nvi)
    cblk = sch.get_sblock("C")
    sch.reverse_compute_at(cblk, noi)  # epilogue + store straight from the register tile
    sch.set_scope(blk, 0, "local")
    sch.decompose_reduction(blk, kk)  # init copies the unroll/vectorize annotations
    own = sch.get_loops(cblk)[2:]  # below (parallel, panel); unit loops are elided
    if len(own) == 2 and NR == int(sch.get(own[1]).extent):
        c0, c1 = sch.split(own[1], [None, L])
        sch.unroll(own[0])
        sch.unroll(c0)
        sch.vectorize(c1)

    if pack_b:
        _schedule_pack(sch, "Bp", nb, K, L, rows_contiguous=not trans_b)
    if pack_a:
        _schedule_pack(sch, "Ap", nb, K, L, rows_contiguous=trans_a)
    return sch.mod["main"].with_attr("global_symbol", "main")
