"""Element-wise and small reduction kernels of a BERT training stage (TE, scheduled for CPU).

All of these are memory-bound. The CPU schedules flatten the iteration space, split it into a
`parallel` outer loop (TVM's thread pool splits it statically into `arch.threads` contiguous ranges)
and a `vectorized` inner loop of `arch.lanes(dtype)` lanes; a remainder that is not a multiple of the
vector width is peeled off with `loop_partition` into a short scalar loop (a predicate inside the
vectorised loop would turn every access into a masked gather/scatter). Column sums over rows are
split into per-thread partial sums (`rfactor`) and a small final reduction.

The scheduling helpers (`sched_flat`, `sched_colsum`, `sched_rowsum`, ...) are shared with the other
non-matmul kernel modules (norm, embed, loss, optim).

For `arch.kind == "gpu"` every builder returns the unscheduled PrimFunc (dlight schedules it).
"""

from __future__ import annotations

import math

import tvm
from tvm import te, tirx

from compiler.arch import Arch, get_arch
from compiler.kernels import common

# Below this many elements a parallel loop costs more (thread-pool wake-up, ~5-20 us) than it saves.
PAR_MIN_ELEMS = 1 << 14


# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------


def resolve_arch(arch: Arch | None) -> Arch:
    return arch if arch is not None else get_arch("host")


def vec_width(n: int, lanes: int) -> int:
    """Largest power of two <= lanes that divides n (1 if n is odd)."""
    v = 1
    while v * 2 <= lanes and n % (v * 2) == 0:
        v *= 2
    return v


def _extent(sch, loop) -> int:
    return int(sch.get(loop).extent)


def schedule_of(func: tirx.PrimFunc) -> tvm.s_tir.Schedule:
    return tvm.s_tir.Schedule(func)


def vectorize_loop(sch, loop, lanes: int):
    """Vectorise `loop` by `lanes`, peeling a scalar tail. Returns the outer (non-vector) loop of the
    main part, or None if the loop is shorter than one vector (then it stays scalar)."""
    n = _extent(sch, loop)
    if lanes <= 1:
        return None
    main = n // lanes * lanes
    if main == 0:
        return None
    if main < n:
        loop, _tail = sch.loop_partition(loop, [main, None])
    if main == lanes:
        sch.vectorize(loop)
        return None
    outer, inner = sch.split(loop, [None, lanes])
    sch.vectorize(inner)
    return outer


def vectorize_exact(sch, loop, lanes: int):
    """Vectorise `loop` by the largest power-of-two width <= lanes that divides its extent (no
    tail: used inside reduction nests, where loop_partition would replace the reduction block).
    Returns the outer loop (or None)."""
    n = _extent(sch, loop)
    v = vec_width(n, lanes)
    if v <= 1:
        return None
    if v == n:
        sch.vectorize(loop)
        return None
    outer, inner = sch.split(loop, [None, v])
    sch.vectorize(inner)
    return outer


def sched_flat(sch, block, arch: Arch, dtype: str, *, parallel: bool = True) -> None:
    """Element-wise block: fuse all its loops, parallel outer / vectorised inner, scalar tail."""
    loops = sch.get_loops(block)
    n = 1
    for lp in loops:
        n *= _extent(sch, lp)
    f = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    outer = vectorize_loop(sch, f, arch.lanes(dtype))
    if outer is not None and parallel and n >= PAR_MIN_ELEMS:
        sch.parallel(outer)
    elif outer is None and parallel and n >= PAR_MIN_ELEMS:
        sch.parallel(f)


def sched_rows(f: tirx.PrimFunc, block: str, arch: Arch, dtype: str, *, parallel: bool = True
               ) -> tirx.PrimFunc:
    """A [rows, D] gather/select block: rows in parallel (when big enough), D vectorised."""
    sch = schedule_of(f)
    blk = sch.get_sblock(block)
    r, d = sch.get_loops(blk)
    n = _extent(sch, r) * _extent(sch, d)
    if parallel and n >= PAR_MIN_ELEMS:
        sch.parallel(r)
    vectorize_loop(sch, d, arch.lanes(dtype))
    return finish(sch)


def _decompose_vec(sch, block, loop, lanes: int):
    """Move a reduction block's init out of `loop` and make sure the init loop is vectorised too."""
    init = sch.decompose_reduction(block, loop)
    loops = sch.get_loops(init)
    if loops and sch.get(loops[-1]).kind != tirx.ForKind.VECTORIZED:
        vectorize_exact(sch, loops[-1], lanes)
    return init


def sched_colsum(sch, block, arch: Arch, dtype: str, *, chunks: int | None = None) -> None:
    """A column-sum block (spatial loops first, then ONE reduction loop over rows, innermost):
    per-chunk partial sums over `chunks` row ranges in parallel (rfactor), vectorised along the
    contiguous (last) spatial axis, then a small vectorised final reduction over the chunks."""
    lanes = arch.lanes(dtype)
    loops = sch.get_loops(block)
    *sp, k = loops
    rows = _extent(sch, k)
    ncols = 1
    for lp in sp:
        ncols *= _extent(sch, lp)
    if chunks is None:
        chunks = arch.threads
    chunks = max(1, min(chunks, rows))
    if chunks == 1 or rows * ncols < PAR_MIN_ELEMS:
        # small: serial over rows, vectorised over columns
        sch.reorder(k, *sp)
        vectorize_exact(sch, sp[-1], lanes)
        _decompose_vec(sch, block, k, lanes)
        return
    c, kj = sch.split(k, [chunks, None])
    rf = sch.rfactor(c, 0)
    # rf block loops: (spatial..., c, kj) -> (c, kj, spatial...)
    lr = sch.get_loops(rf)
    nsp = len(sp)
    spr, cr, kr = lr[-2 - nsp:-2], lr[-2], lr[-1]
    sch.reorder(cr, kr, *spr)
    sch.parallel(cr)
    vectorize_exact(sch, spr[-1], lanes)
    _decompose_vec(sch, rf, kr, lanes)
    # final block: loops (spatial..., c) -> (c, spatial...)
    lf = sch.get_loops(block)
    spf, cf = lf[-1 - nsp:-1], lf[-1]
    sch.reorder(cf, *spf)
    vectorize_exact(sch, spf[-1], lanes)
    _decompose_vec(sch, block, cf, lanes)


def sched_rowsum(sch, block, row_loop, lanes: int, *, reverse: bool = False,
                 anchor_parallel: bool | None = None):
    """A row reduction block (loops: row, k): vectorise the reduction over k with `lanes` partial
    accumulators (rfactor) and place it under `row_loop`: compute_at for a producer of the row's
    consumers, reverse_compute_at (`reverse=True`) for a consumer of a producer already there.

    With `anchor_parallel` set (True/False) the block is the FIRST of the row instead: `row_loop`
    is ignored, the block's own row loop becomes the anchor (parallel if True) and is returned."""
    k = sch.get_loops(block)[-1]
    n = _extent(sch, k)
    v = vec_width(n, lanes)
    anchor = anchor_parallel is not None
    if v <= 1 or n // v < 2:
        if anchor:
            row = sch.get_loops(block)[0]
            if anchor_parallel:
                sch.parallel(row)
            return row
        (sch.reverse_compute_at if reverse else sch.compute_at)(block, row_loop)
        return row_loop
    ko, kl = sch.split(k, [None, v])
    rf = sch.rfactor(kl, 0)
    if anchor:
        row, ko_r, kl_r = sch.get_loops(rf)
        if anchor_parallel:
            sch.parallel(row)
        sch.vectorize(kl_r)
        _decompose_vec(sch, rf, ko_r, v)
        sch.reverse_compute_at(block, row)
        return row
    if reverse:
        sch.reverse_compute_at(rf, row_loop)
        sch.reverse_compute_at(block, row_loop)
    else:
        sch.compute_at(block, row_loop)
        sch.compute_at(rf, row_loop)
    lr = sch.get_loops(rf)
    # rf loops below row_loop: (kl spatial, ko reduce) in block-iter order -> (ko, kl)
    kl_r, ko_r = lr[-2], lr[-1]
    if _extent(sch, kl_r) != v:
        kl_r, ko_r = ko_r, kl_r
    sch.reorder(ko_r, kl_r)
    sch.vectorize(kl_r)
    _decompose_vec(sch, rf, ko_r, v)
    return row_loop


# Vectorisable exp / GELU gradient and the dropout factor live in common.py (one definition each).
exp_vec = common.exp
gelu_grad_vec = common.gelu_grad
keep_scale = common.keep_scale


# ---- hand-built loops (te.extern bodies) --------------------------------------------------------


def hand_loop(name: str, extent: int, kind, body_fn, start: int = 0):
    v = tirx.Var(name, "int32")
    return tirx.For(v, tirx.const(start, "int32"), tirx.const(extent, "int32"), kind, body_fn(v))


def hand_seq(*stmts):
    stmts = [s for s in stmts if s is not None]
    return stmts[0] if len(stmts) == 1 else tirx.SeqStmt(stmts)


def hand_flat(n: int, lanes: int, parallel: bool, body_fn):
    """for o in parallel(n // lanes): for l in vectorized(lanes): body(o*lanes + l); scalar tail."""
    FK = tirx.ForKind
    nv = n // lanes if lanes > 1 else 0
    main = nv * lanes
    stmts = []
    if nv:
        kind = FK.PARALLEL if parallel and nv > 1 else FK.SERIAL
        stmts.append(hand_loop("o", nv, kind, lambda o: hand_loop(
            "l", lanes, FK.VECTORIZED, lambda l: body_fn(o * lanes + l))))
    if main < n:
        stmts.append(hand_loop("t", n - main, FK.SERIAL, body_fn, start=main))
    return hand_seq(*stmts)


def finish(sch) -> tirx.PrimFunc:
    return sch.mod["main"]


def flat_index(i, j, ncols: int):
    return i * ncols + j


# --------------------------------------------------------------------------------------------
# builders
# --------------------------------------------------------------------------------------------


def build_gelu(M: int, N: int, *, dtype: str = "float32", arch: Arch | None = None,
               config: dict | None = None) -> tirx.PrimFunc:
    """u [M,N] -> g [M,N] = gelu(u) (exact-erf GELU, vectorisable erf for float32)."""
    arch = resolve_arch(arch)
    u = te.placeholder((M, N), dtype, name="u")
    g = te.compute((M, N), lambda i, j: common.gelu(u[i, j]), name="g")
    f = te.create_prim_func([u, g])
    if not arch.is_cpu:
        return f
    sch = schedule_of(f)
    sched_flat(sch, sch.get_sblock("g"), arch, dtype)
    return finish(sch)


def build_gelu_bwd(M: int, N: int, *, dtype: str = "float32", arch: Arch | None = None,
                   config: dict | None = None) -> tirx.PrimFunc:
    """dg [M,N], u [M,N] -> du [M,N] = dg * gelu'(u)."""
    arch = resolve_arch(arch)
    dg = te.placeholder((M, N), dtype, name="dg")
    u = te.placeholder((M, N), dtype, name="u")
    du = te.compute((M, N), lambda i, j: dg[i, j] * gelu_grad_vec(u[i, j]), name="du")
    f = te.create_prim_func([dg, u, du])
    if not arch.is_cpu:
        return f
    sch = schedule_of(f)
    sched_flat(sch, sch.get_sblock("du"), arch, dtype)
    return finish(sch)


def build_dropout(M: int, N: int, *, p: float, salt: int, dtype: str = "float32",
                  arch: Arch | None = None, config: dict | None = None,
                  seed_len: int = 2) -> tirx.PrimFunc:
    """x [M,N], seed [seed_len] int64 -> y [M,N] = x * keep_scale(m*N+n, seed, salt, p).
    Its own backward (dy -> dx with the same seed/salt). p == 0 gives a copy.
    seed_len=2: seed[1] is the dropout on/off flag (as common.keep_scale)."""
    arch = resolve_arch(arch)
    x = te.placeholder((M, N), dtype, name="x")
    seed = te.placeholder((seed_len,), "int64", name="seed")
    if p > 0.0:
        y = te.compute(
            (M, N),
            lambda i, j: x[i, j] * keep_scale(flat_index(i, j, N), seed[0], salt, p, dtype),
            name="y",
        )
    else:
        y = te.compute((M, N), lambda i, j: x[i, j], name="y")
    f = te.create_prim_func([x, seed, y])
    if not arch.is_cpu:
        return f
    sch = schedule_of(f)
    sched_flat(sch, sch.get_sblock("y"), arch, dtype)
    return finish(sch)


def build_tanh_fwd(M: int, N: int, *, dtype: str = "float32", arch: Arch | None = None,
                   config: dict | None = None) -> tirx.PrimFunc:
    """x [M,N] -> y [M,N] = tanh(x) (BERT pooler activation)."""
    arch = resolve_arch(arch)
    x = te.placeholder((M, N), dtype, name="x")
    y = te.compute((M, N), lambda i, j: te.tanh(x[i, j]), name="y")
    f = te.create_prim_func([x, y])
    if not arch.is_cpu:
        return f
    sch = schedule_of(f)
    sched_flat(sch, sch.get_sblock("y"), arch, dtype)
    return finish(sch)


def build_tanh_bwd(M: int, N: int, *, dtype: str = "float32", arch: Arch | None = None,
                   config: dict | None = None) -> tirx.PrimFunc:
    """dy [M,N], y [M,N] -> dx [M,N] = dy * (1 - y*y)."""
    arch = resolve_arch(arch)
    dy = te.placeholder((M, N), dtype, name="dy")
    y = te.placeholder((M, N), dtype, name="y")
    one = tirx.const(1.0, dtype)
    dx = te.compute((M, N), lambda i, j: dy[i, j] * (one - y[i, j] * y[i, j]), name="dx")
    f = te.create_prim_func([dy, y, dx])
    if not arch.is_cpu:
        return f
    sch = schedule_of(f)
    sched_flat(sch, sch.get_sblock("dx"), arch, dtype)
    return finish(sch)


def build_bias_grad(M: int, N: int, *, dtype: str = "float32", arch: Arch | None = None,
                    config: dict | None = None) -> tirx.PrimFunc:
    """dy [M,N] -> db [N] = sum_m dy[m, n] (per-thread partial column sums, then a final sum)."""
    arch = resolve_arch(arch)
    dy = te.placeholder((M, N), dtype, name="dy")
    k = te.reduce_axis((0, M), name="k")
    db = te.compute((N,), lambda j: te.sum(dy[k, j], axis=k), name="db")
    f = te.create_prim_func([dy, db])
    if not arch.is_cpu:
        return f
    sch = schedule_of(f)
    chunks = (config or {}).get("chunks")
    sched_colsum(sch, sch.get_sblock("db"), arch, dtype, chunks=chunks)
    return finish(sch)


def build_take_rows(B: int, T: int, D: int, *, dtype: str = "float32", arch: Arch | None = None,
                    config: dict | None = None) -> tirx.PrimFunc:
    """h [B*T, D] -> cls [B, D] = h[b*T, :] (the pooler's first token)."""
    arch = resolve_arch(arch)
    h = te.placeholder((B * T, D), dtype, name="h")
    cls = te.compute((B, D), lambda b, d: h[b * T, d], name="cls")
    f = te.create_prim_func([h, cls])
    return sched_rows(f, "cls", arch, dtype, parallel=False) if arch.is_cpu else f


def build_scatter_rows_bwd(B: int, T: int, D: int, *, dtype: str = "float32",
                           arch: Arch | None = None, config: dict | None = None) -> tirx.PrimFunc:
    """dcls [B, D] -> dh [B*T, D]: zeros except row b*T = dcls[b]."""
    arch = resolve_arch(arch)
    dcls = te.placeholder((B, D), dtype, name="dcls")
    zero = tirx.const(0.0, dtype)
    dh = te.compute(
        (B * T, D),
        lambda r, d: tirx.Select(r % T == 0, dcls[r // T, d], zero),
        name="dh",
    )
    f = te.create_prim_func([dcls, dh])
    return sched_rows(f, "dh", arch, dtype) if arch.is_cpu else f


def build_accumulate(n: int, *, dtype: str = "float32", arch: Arch | None = None,
                     config: dict | None = None) -> tirx.PrimFunc:
    """acc [n], g [n] -> out [n] = acc + g. Safe to run in place (out aliasing acc)."""
    arch = resolve_arch(arch)
    acc = te.placeholder((n,), dtype, name="acc")
    g = te.placeholder((n,), dtype, name="g")
    out = te.compute((n,), lambda i: acc[i] + g[i], name="out")
    f = te.create_prim_func([acc, g, out]).with_attr("tirx.noalias", False)
    if not arch.is_cpu:
        return f
    sch = schedule_of(f)
    sched_flat(sch, sch.get_sblock("out"), arch, dtype)
    return finish(sch)


def build_sumsq(n: int, *, dtype: str = "float32", arch: Arch | None = None,
                config: dict | None = None) -> tirx.PrimFunc:
    """x [n] -> out [1] = sum x^2 (global gradient-norm clipping).

    CPU: x is viewed as [chunks, J, lanes] (+ a scalar tail); part[c, l] = sum_j x^2 runs parallel
    over chunks with `lanes` vector accumulators, then out = sum(part) + tail."""
    arch = resolve_arch(arch)
    x = te.placeholder((n,), dtype, name="x")
    if not arch.is_cpu:
        k = te.reduce_axis((0, n), name="k")
        out = te.compute((1,), lambda _: te.sum(x[k] * x[k], axis=k), name="out")
        return te.create_prim_func([x, out])
    lanes = arch.lanes(dtype)
    unroll = int((config or {}).get("unroll", 4))  # independent vector accumulators per thread
    L = lanes * unroll
    chunks = arch.threads if n >= PAR_MIN_ELEMS else 1
    chunks = (config or {}).get("chunks", chunks)
    J = n // (chunks * L)
    if J == 0:
        chunks, L, lanes, unroll = 1, 1, 1, 1
        J = n
    main = chunks * J * L
    j = te.reduce_axis((0, J), name="j")
    part = te.compute(
        (chunks, L),
        lambda c, l: te.sum(x[(c * J + j) * L + l] * x[(c * J + j) * L + l], axis=j),
        name="part",
    )
    c2 = te.reduce_axis((0, chunks), name="c2")
    l2 = te.reduce_axis((0, L), name="l2")
    tot = te.compute((1,), lambda _: te.sum(part[c2, l2], axis=[c2, l2]), name="tot")
    if main < n:
        t = te.reduce_axis((0, n - main), name="t")
        tail = te.compute((1,), lambda _: te.sum(x[main + t] * x[main + t], axis=t), name="tail")
        out = te.compute((1,), lambda i: tot[i] + tail[i], name="out")
    else:
        out = te.compute((1,), lambda i: tot[i], name="out")
    f = te.create_prim_func([x, out])
    sch = schedule_of(f)
    blk = sch.get_sblock("part")
    c, lv, jr = sch.get_loops(blk)
    sch.reorder(c, jr, lv)
    if chunks > 1:
        sch.parallel(c)
    if L > 1:
        lu, lvv = sch.split(lv, [unroll, lanes])
        if unroll > 1:
            sch.unroll(lu)
        sch.vectorize(lvv)
    _decompose_vec(sch, blk, jr, lanes)
    return finish(sch)
