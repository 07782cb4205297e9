"""GEMMs with a block-quantized (GGUF Q8_0 / Q4_1) weight, dequantized inside the kernel.

``C[..., m, n] = epilogue(sum_k A[..., m, k] * B[..., k, n] (+ bias[n]))`` where B comes from a
weight W stored as its raw GGUF blocks (compiler/quant.py), 32 weights of a row per block:

* ``trans_b=True`` (forward, ``Y = X W^T``): W [N, K] stored uint8 [N, K/32 * bytes],
  B[k, n] = W[n, k]
* ``trans_b=False`` (data gradient, ``dX = dY W``): W [K, N] stored uint8 [K, N/32 * bytes]

[Note: dequantize in the tile] On CPUs the schedule is compiler/kernels/gemm.py's (register tile of
``mr x nr`` vectors held over the whole reduction, epilogue from registers), except that B's packed
panels are not a float32 copy of the whole weight: each parallel task dequantizes only its own
block of ``nc`` panels (``nc * K * NR`` floats, sized for L2, ~100-600 KB) straight from the blocks
into a thread-local buffer, then sweeps every M-strip over it. So each weight is dequantized once
per call and read from memory once, as 1.06 (Q8_0) or 0.625 (Q4_1) bytes instead of 4. A very long
reduction (the vocabulary of a frozen LM head's data gradient, 49152) is split into ``ks`` chunks:
each task dequantizes one chunk of its panels, the chunk partial sums go to a small workspace
[ks, M, N] and a second loop adds them (and applies the epilogue).

Dequantization is exact and the same arithmetic as compiler/gguf.py's numpy decoders: the fp16
scale/min are decoded with integer operations (`f16_to_f32`: normal, subnormal and zero; no fp16
hardware or OpenCL extension needed), and ``q * d (+ m)`` is one float32 rounding (q * d is
exact), so the kernel computes with exactly the weights ``gguf.dequantize`` returns.

On GPU arches the plain TE compute (dequantization inline in the reduction, no intermediate
tensor) is returned unscheduled for dlight.

[Note: byte aliases] dlight's analyses (GEMV, Reduction) assert that every buffer a block reads is
read at a single element, but dequantizing reads several bytes of one block (quants, scale bytes,
min bytes). So the GPU PrimFunc takes W once per byte role, ``W, Wd0, Wd1[, Wm0, Wm1]``, and the
stage passes the same tensor for each (`gpu_aliases`): every read is then one element of its own
buffer, the function schedules with TVM's stock dlight rules, and no decoded copy exists. dlight
then picks its fallback schedule (one output per thread); a GPU-tuned schedule is future work.
"""

from __future__ import annotations

from typing import Any

import tvm
from tvm import s_tir, te, tirx

from compiler.kernels import gemm
from compiler.quant import BLOCK_BYTES, QK

_BUDGET = gemm._L2_BUDGET      # bytes of dequantized panels per task
_KS_MAX = 4096                  # longest reduction handled without a split


def _u32(v: int) -> tirx.PrimExpr:
    return tirx.const(v, "uint32")


def f16_to_f32(lo: tirx.PrimExpr, hi: tirx.PrimExpr) -> tirx.PrimExpr:
    """The float32 value of the fp16 with bytes (lo, hi), by integer operations, branch-free.

    Exact for every finite fp16 (normal: rebias the exponent by 112 = 127 - 15; subnormal and
    zero: mantissa * 2^-24), so no fp16 hardware, OpenCL extension or denormal support is
    needed. Inf/NaN (which a quantizer never writes for finite weights) are not decoded."""
    h = tirx.Cast("uint32", lo) | tirx.shift_left(tirx.Cast("uint32", hi), _u32(8))
    em = h & _u32(0x7FFF)
    normal = tirx.reinterpret("float32", tirx.shift_left(em, _u32(13)) + _u32(112 << 23))
    sub = tirx.Cast("float32", tirx.Cast("int32", em)) * tirx.const(2.0 ** -24, "float32")
    mag = tirx.Select(em < _u32(0x400), sub, normal)
    sign = tirx.shift_left(h & _u32(0x8000), _u32(16))
    return tirx.reinterpret("float32", tirx.reinterpret("uint32", mag) | sign)


def gpu_aliases(fmt: str) -> int:
    """How many times a GPU kernel takes W (see [Note: byte aliases])."""
    return 3 if fmt == "q8_0" else 5


def _loader(Ws: list, bi: tuple):
    """load(part, row, byte) of W; part 0 quants, 1/2 scale lo/hi, 3/4 min lo/hi bytes."""
    return lambda part, row, off: Ws[part if len(Ws) > 1 else 0][(*bi, row, off)]


def scale_at(load, row, block, which: int, fmt: str) -> tirx.PrimExpr:
    """Decoded fp16 field `which` (0: scale d, 1: Q4_1's min m) of block `block` of a row."""
    off = block * BLOCK_BYTES[fmt] + 2 * which
    return f16_to_f32(load(1 + 2 * which, row, off), load(2 + 2 * which, row, off + 1))


def dequant(load, row, col, fmt: str, dtype: str = "float32", scales=None) -> tirx.PrimExpr:
    """Weight (row, col) of a blocked W (blocks of 32 along col), as `dtype`. `scales`: optional
    functions (d(row, block), m(row, block)) returning already decoded fields."""
    bs = BLOCK_BYTES[fmt]
    blk = col // QK
    base = blk * bs
    j = col % QK
    d_at, m_at = scales or (lambda r, b: scale_at(load, r, b, 0, fmt),
                            lambda r, b: scale_at(load, r, b, 1, fmt))
    if fmt == "q8_0":
        q = tirx.Cast("float32", tirx.reinterpret("int8", load(0, row, base + 2 + j)))
        v = q * d_at(row, blk)
    else:
        byte = tirx.Cast("uint32", load(0, row, base + 4 + j % 16))
        q = tirx.shift_right(byte, tirx.Cast("uint32", (j // 16) * 4)) & _u32(15)
        v = tirx.Cast("float32", q) * d_at(row, blk) + m_at(row, blk)
    return v if dtype == "float32" else tirx.Cast(dtype, v)


def _chunks(K: int, align: int) -> int:
    """Reduction chunks: 1 up to _KS_MAX, else the fewest equal chunks of <= _KS_MAX weights,
    each a multiple of `align` (whole blocks when the reduction runs along them)."""
    return next(c for c in range(1, K + 1)
                if K % c == 0 and (K // c) % align == 0 and (K // c <= _KS_MAX or K // c == align))


def _panel_block(npan: int, per: int, tasks_outer: int, threads: int) -> int:
    """Panels per task: the largest divisor of npan within the L2 budget that still leaves at
    least `threads` parallel tasks (preferring a multiple of `threads`)."""
    divs = [d for d in gemm._divisors(npan) if d * per <= _BUDGET] or [1]
    for ok in (lambda d: tasks_outer * npan // d % threads == 0,
               lambda d: tasks_outer * npan // d >= threads, lambda d: True):
        good = [d for d in divs if ok(d)]
        if good:
            return max(good)
    return 1


def default_config(M: int, N: int, K: int, *, trans_b: bool = False, arch, batch=(),
                   fmt: str = "q8_0", dtype: str = "float32") -> dict[str, Any]:
    """Register tile as the float GEMM's; ``ks`` reduction chunks; ``nc`` panels per task."""
    base = gemm.default_config(M, N, K, trans_b=trans_b, arch=arch, dtype=dtype)
    L = arch.lanes(dtype)
    nr = base["nr"]
    ks = _chunks(K, QK if trans_b else 1)
    npan = -(-N // (nr * L))
    tasks = ks
    for b in batch:
        tasks *= int(b)
    nc = _panel_block(npan, (K // ks) * nr * L * gemm._BYTES[dtype], tasks, arch.threads)
    return {"mr": base["mr"], "nr": nr, "nc": nc, "ks": ks}


def config_space(M: int, N: int, K: int, *, trans_b: bool = False, arch, batch=(),
                 fmt: str = "q8_0", dtype: str = "float32") -> list[dict[str, Any]]:
    """Candidates for the on-board tuner: register tiles x panels per task."""
    base = default_config(M, N, K, trans_b=trans_b, arch=arch, batch=batch, fmt=fmt, dtype=dtype)
    L = arch.lanes(dtype)
    regs = gemm._registers(arch)
    out = [base]
    for nr in (1, 2, 3, 4):
        cap = (regs - nr - 1) // nr
        for mr in sorted({min(cap, r) for r in (4, 6, 8, 12, 14)}):
            npan = -(-N // (nr * L))
            per = (K // base["ks"]) * nr * L * gemm._BYTES[dtype]
            for nc in sorted({1, _panel_block(npan, per, 1, arch.threads)}):
                c = {"mr": mr, "nr": nr, "nc": nc, "ks": base["ks"]}
                if c not in out:
                    out.append(c)
    return out[:40]


def build_qgemm(M: int, N: int, K: int, *, fmt: str, trans_b: bool = False, batch=(),
                dtype: str = "float32", arch, config: dict | None = None, bias: bool = False,
                epilogue: str | None = None) -> tvm.tirx.PrimFunc:
    """Build ``C = epilogue(A B (+bias))`` with B from the blocked weight W (see module docstring).

    Parameters
    ----------
    M, N, K : int
        Output rows, output columns, reduction length.
    fmt : {"q8_0", "q4_1"}
        W's block format. The blocked dimension (K if trans_b, else N) must be a multiple of 32.
    trans_b : bool
        W is [N, K] (a weight in HF ``[out, in]`` layout used as ``X W^T``), else [K, N].
    batch : tuple of int
        Leading batch dimensions of A, W, the extra input and C.
    dtype : str
        "float32" or "float64" (A, bias, extra input and C; W is always uint8 blocks).
    arch : Arch
        Compile target; GPU arches get the unscheduled compute (for dlight).
    config : dict, optional
        ``mr, nr, nc, ks`` (see `default_config`); missing keys take the defaults.
    bias, epilogue
        As `compiler.kernels.gemm.build_gemm`.

    Returns
    -------
    tvm.tirx.PrimFunc
        Buffers ``A, W, [bias], [U or R], C``; on GPU arches W is followed by its byte aliases
        (``gpu_aliases(fmt) - 1`` more uint8 buffers: pass W again for each).
    """
    if fmt not in BLOCK_BYTES:
        raise ValueError(f"unknown block format {fmt!r}; choose one of {list(BLOCK_BYTES)}")
    if epilogue not in gemm.EPILOGUES:
        raise ValueError(f"unknown epilogue {epilogue!r}; choose one of {gemm.EPILOGUES}")
    blocked = K if trans_b else N
    if blocked % QK:
        raise ValueError(f"the blocked dimension of W ({blocked}) must be a multiple of {QK}")
    batch = tuple(int(b) for b in batch)
    nb = len(batch)
    bs = BLOCK_BYTES[fmt]
    A = te.placeholder((*batch, M, K), dtype, "A")
    wshape = (*batch, N, K // QK * bs) if trans_b else (*batch, K, N // QK * bs)
    # See [Note: byte aliases]: on GPUs every byte role of W is its own buffer parameter.
    roles = ["W"] + ([] if arch.is_cpu else ["Wd0", "Wd1", "Wm0", "Wm1"][: gpu_aliases(fmt) - 1])
    Ws = [te.placeholder(wshape, "uint8", r) for r in roles]
    bias_t = te.placeholder((N,), dtype, "bias") if bias else None
    extra_t = None
    if epilogue in ("gelu_grad", "add"):
        extra_t = te.placeholder((*batch, M, N), dtype, "U" if epilogue == "gelu_grad" else "R")
    ins = [A, *Ws] + ([bias_t] if bias else []) + ([extra_t] if extra_t is not None else [])

    def epi(acc_at):
        return te.compute(
            (*batch, M, N),
            lambda *i: gemm._epilogue(acc_at(i), i[nb:], dtype=dtype, bias_t=bias_t,
                                      extra_t=extra_t, epilogue=epilogue, batch_idx=i[:nb]),
            name="C")

    if not arch.is_cpu:   # dlight-schedulable: one reduction block, dequantization inline
        k = te.reduce_axis((0, K), "k")

        def term(i):
            load, n = _loader(Ws, i[:nb]), i[nb + 1]
            w = dequant(load, n, k, fmt, dtype) if trans_b else dequant(load, k, n, fmt, dtype)
            return A[(*i[:nb], i[nb], k)] * w

        acc = te.compute((*batch, M, N), lambda *i: te.sum(term(i), axis=k), name="acc")
        return te.create_prim_func([*ins, epi(lambda i: acc[i])])
    return _cpu(M, N, K, fmt, trans_b, batch, dtype, arch, config, A, Ws[0], ins, epi)


def _cpu(M, N, K, fmt, trans_b, batch, dtype, arch, config, A, W, ins, epi):
    nb = len(batch)
    cfg = default_config(M, N, K, trans_b=trans_b, arch=arch, batch=batch, fmt=fmt, dtype=dtype)
    cfg.update(config or {})
    L = arch.lanes(dtype)
    mr, nr, ks = int(cfg["mr"]), int(cfg["nr"]), int(cfg["ks"])
    if K % ks or (trans_b and (K // ks) % QK):
        raise ValueError(f"ks={ks} does not split K={K} into whole blocks")
    NR = nr * L
    Mp, Np = -(-M // mr) * mr, -(-N // NR) * NR
    npan = Np // NR
    nc = max(d for d in gemm._divisors(npan) if d <= max(1, int(cfg["nc"])))
    kc = K // ks
    cm = (lambda m: te.min(m, M - 1)) if Mp != M else (lambda m: m)
    cn = (lambda n: te.min(n, N - 1)) if Np != N else (lambda n: n)

    # Each task first decodes the fp16 fields of the blocks it reads (once per block, scalar),
    # then dequantizes its panels Bp[..., c, p, kk, r] = weight (k = c*kc + kk, n = p*NR + r).
    rows, cols = (N, K) if trans_b else (K, N)

    def table(which, name):
        return te.compute((*batch, rows, cols // QK), lambda *i: scale_at(
            _loader([W], i[:nb]), i[nb], i[nb + 1], which, fmt), name=name)

    tabs = [table(w, nm) for w, nm in enumerate(("Dsc", "Msc")[: 1 if fmt == "q8_0" else 2])]

    def b_tab(bi, k, n):
        row, col = (n, k) if trans_b else (k, n)
        sc = [lambda r, b, t=t: t[(*bi, r, b)] for t in tabs] + [None]
        return dequant(_loader([W], bi), row, col, fmt, dtype, scales=(sc[0], sc[1]))

    Bp = te.compute((*batch, ks, npan, kc, NR),
                    lambda *i: b_tab(i[:nb], i[nb] * kc + i[nb + 2],
                                     cn(i[nb + 1] * NR + i[nb + 3])),
                    name="Bp")
    kk = te.reduce_axis((0, kc), "kk")
    part = te.compute(
        (*batch, ks, Mp, Np),
        lambda *i: te.sum(A[(*i[:nb], cm(i[nb + 1]), i[nb] * kc + kk)]
                          * Bp[(*i[:nb], i[nb], i[nb + 2] // NR, kk, i[nb + 2] % NR)], axis=kk),
        name="acc")
    if ks == 1:
        C = epi(lambda i: part[(*i[:nb], 0, *i[nb:])])
    else:
        c = te.reduce_axis((0, ks), "c")
        tot = te.compute((*batch, M, N), lambda *i: te.sum(part[(*i[:nb], c, *i[nb:])], axis=c),
                         name="tot")
        C = epi(lambda i: tot[i])
    sch = s_tir.Schedule(te.create_prim_func([*ins, C]))

    # -- (batch, chunk, N-block) parallel | dequantize the block | M-strip | panel | k | tile
    blk = sch.get_sblock("acc")
    *bl, cc, m, n, kx = sch.get_loops(blk)
    mo, mi = sch.split(m, [None, mr])
    noo, noi, nvo, nvi = sch.split(n, [None, nc, nr, L])
    sch.reorder(*bl, cc, noo, mo, noi, kx, mi, nvo, nvi)
    task = sch.fuse(*bl, cc, noo)
    sch.parallel(task)
    sch.unroll(mi)
    sch.unroll(nvo)
    sch.vectorize(nvi)
    if ks == 1:
        cblk = sch.get_sblock("C")
        sch.reverse_compute_at(cblk, noi)   # epilogue + store straight from the register tile
        own = sch.get_loops(cblk)[3:]        # below (task, M-strip, panel)
        if len(own) == 2 and NR == int(sch.get(own[1]).extent):
            c0, c1 = sch.split(own[1], [None, L])
            sch.unroll(own[0])
            sch.unroll(c0)
            sch.vectorize(c1)
        sch.set_scope(blk, 0, "local")       # the register tile
    sch.decompose_reduction(blk, kx)
    pb = sch.get_sblock("Bp")
    sch.compute_at(pb, task)
    _schedule_dequant(sch, pb, trans_b, L, nc, kc)
    for t in tabs:
        sch.compute_at(sch.get_sblock(t.op.name), task)
    if ks > 1:
        _schedule_chunk_sum(sch, L)
    return sch.mod["main"].with_attr("global_symbol", "main")


def _schedule_dequant(sch, pb, trans_b: bool, L: int, nc: int, kc: int) -> None:
    """The per-task dequantization into Bp[p, kk, r]: vectorised along W's rows (the blocks),
    `L` consecutive weights of one block per vector (L divides 32, so one scale per vector)."""
    lps = sch.get_loops(pb)[1:]      # below the task loop; unit loops (nc or kc = 1) are elided
    r = lps[-1]
    k = lps[-2] if kc > 1 else None
    p = [lps[-3 if kc > 1 else -2]] if nc > 1 else []
    if trans_b:   # weight (n = p*NR + r, k): blocks along k -> vectorise k, scatter into Bp
        kb, kv, kl = sch.split(k, [None, QK // L, L])
        sch.reorder(*p, r, kb, kv, kl)
        sch.unroll(kv)
        sch.vectorize(kl)
    else:         # weight (k, n = p*NR + r): blocks along n -> vectorise r, contiguous stores
        r0, rl = sch.split(r, [None, L])
        sch.unroll(r0)
        sch.vectorize(rl)


def _schedule_chunk_sum(sch, L: int) -> None:
    """tot = sum over chunks of the partial sums (rows parallel, columns vectorised), with the
    epilogue fused into the same loop nest."""
    tot = sch.get_sblock("tot")
    *bl, m, n, c = sch.get_loops(tot)
    sch.parallel(sch.fuse(*bl, m))
    if int(sch.get(n).extent) % L == 0:
        n0, n1 = sch.split(n, [None, L])
        sch.reorder(n0, c, n1)
        sch.vectorize(n1)
    sch.decompose_reduction(tot, c)
    cblk = sch.get_sblock("C")
    *cl, cm, cn = sch.get_loops(cblk)
    sch.parallel(sch.fuse(*cl, cm))
    if int(sch.get(cn).extent) % L == 0:
        _, c1 = sch.split(cn, [None, L])
        sch.vectorize(c1)
