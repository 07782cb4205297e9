"""BERT embeddings: word + position + token-type gather (forward) and their gradients (backward).

The backward is a scatter-add (not expressible as a TE compute). CPU: one `te.extern` with
hand-built loops: zero fills (dword is 30522x384: `threads` contiguous chunks in parallel, vectorised,
which LLVM turns into memsets), then ONE pass over ds, parallel over column vectors of D and serial
over tokens in order (deterministic, no atomics), adding each ds vector into its word, position and
token-type rows. GPU: the dword scatter as an extern with explicit thread bindings (threads over D,
serial over tokens), dpos/dtype as plain TE reductions for dlight.
"""

from __future__ import annotations

from tvm import te, tirx

from compiler.arch import Arch
from compiler.kernels.elementwise import PAR_MIN_ELEMS, resolve_arch, sched_rows

_FK = tirx.ForKind


def build_embed_fwd(B: int, T: int, V: int, D: int, P: int, NT: int, *, dtype: str = "float32",
                    arch: Arch | None = None, config: dict | None = None) -> tirx.PrimFunc:
    """ids [B,T] int64, token_type [B,T] int64, word [V,D], pos [P,D], type [NT,D] ->
    s [B*T, D] = word[ids[b,t]] + pos[t] + type[token_type[b,t]] (position ids 0..T-1)."""
    arch = resolve_arch(arch)
    if T > P:
        raise ValueError(f"sequence length {T} exceeds max positions {P}")
    ids = te.placeholder((B, T), "int64", name="ids")
    tt = te.placeholder((B, T), "int64", name="token_type")
    word = te.placeholder((V, D), dtype, name="word")
    pos = te.placeholder((P, D), dtype, name="pos")
    typ = te.placeholder((NT, D), dtype, name="type")

    def f_s(r, d):
        b, t = r // T, r % T
        return (word[tirx.Cast("int32", ids[b, t]), d] + pos[t, d]
                + typ[tirx.Cast("int32", tt[b, t]), d])

    s = te.compute((B * T, D), f_s, name="s")
    f = te.create_prim_func([ids, tt, word, pos, typ, s])
    return sched_rows(f, "s", arch, dtype) if arch.is_cpu else f


def _loop(name: str, extent: int, kind, body_fn, start: int = 0):
    v = tirx.Var(name, "int32")
    return tirx.For(v, tirx.const(start, "int32"), tirx.const(extent, "int32"), kind, body_fn(v))


def _seq(*stmts):
    stmts = [s for s in stmts if s is not None]
    return stmts[0] if len(stmts) == 1 else tirx.SeqStmt(stmts)


def _zero_fill(buf, n: int, lanes: int, threads: int):
    """buf (any shape, n elements) = 0: `threads` contiguous chunks in parallel, each a vectorised
    run (LLVM turns it into one memset per chunk), plus a scalar tail."""
    flat = tirx.decl_buffer((n,), buf.dtype, name=buf.name + "_flat", data=buf.data)
    zero = tirx.const(0.0, buf.dtype)
    nth = threads if n >= PAR_MIN_ELEMS else 1
    per = n // (nth * lanes)  # vectors per chunk
    stmts = [tirx.DeclBuffer(flat, data=buf.data)]
    if per:
        kind = _FK.PARALLEL if nth > 1 else _FK.SERIAL
        stmts.append(_loop("c", nth, kind, lambda c: _loop("e", per, _FK.SERIAL, lambda e: _loop(
            "l", lanes, _FK.VECTORIZED,
            lambda l: tirx.BufferStore(flat, zero, [(c * per + e) * lanes + l])))))
    done = nth * per * lanes
    if done < n:
        stmts.append(_loop("t", n - done, _FK.SERIAL,
                           lambda t: tirx.BufferStore(flat, zero, [t]), start=done))
    return _seq(*stmts)


def _embed_bwd_cpu(ids, tt, ds, dword, dpos, dtyp, B, T, V, D, P, NT, lanes, threads):
    """Zero the gradients, then ONE pass over ds: parallel over column vectors of D, serial
    over tokens in order (deterministic, no atomics), each ds vector added to its word row, its
    position row and its token-type row. A gradient given as None (a frozen table) is skipped:
    no zero fill, no scatter."""
    vl = lanes if D >= lanes else 1
    nv = D // vl
    main = nv * vl

    def add_at(b, t, col):
        i = b * T + t
        val = tirx.BufferLoad(ds, [i, col])
        w = tirx.Cast("int32", tirx.BufferLoad(ids, [b, t]))
        k = tirx.Cast("int32", tirx.BufferLoad(tt, [b, t]))
        stores = [tirx.BufferStore(g, tirx.BufferLoad(g, [r, col]) + val, [r, col])
                  for g, r in ((dword, w), (dpos, t), (dtyp, k)) if g is not None]
        return _seq(*stores)

    stmts = [_zero_fill(g, n * D, lanes, threads)
             for g, n in ((dword, V), (dpos, P), (dtyp, NT)) if g is not None]
    skind = _FK.PARALLEL if B * T * D >= PAR_MIN_ELEMS and nv > 1 else _FK.SERIAL
    vkind = _FK.VECTORIZED if vl > 1 else _FK.SERIAL
    stmts.append(_loop("j", nv, skind, lambda j: _loop("b", B, _FK.SERIAL, lambda b: _loop(
        "t", T, _FK.SERIAL, lambda t: _loop("l", vl, vkind, lambda l: add_at(b, t, j * vl + l))))))
    if main < D:
        stmts.append(_loop("b", B, _FK.SERIAL, lambda b: _loop("t", T, _FK.SERIAL, lambda t: _loop(
            "dt", D - main, _FK.SERIAL, lambda d: add_at(b, t, d), start=main))))
    return _seq(*stmts)


def _dword_gpu(ids, ds, dword, B, T, V, D):
    dt = dword.dtype
    nthr = 256
    total = V * D
    bx = te.thread_axis("blockIdx.x")
    tx = te.thread_axis("threadIdx.x")
    idx = bx.var * nthr + tx.var
    zero_fill = tirx.AttrStmt(bx, "thread_extent", (total + nthr - 1) // nthr, tirx.AttrStmt(
        tx, "thread_extent", nthr, tirx.IfThenElse(
            idx < total, tirx.BufferStore(dword, tirx.const(0.0, dt), [idx // D, idx % D]), None)))
    nthr2 = 64
    bx2 = te.thread_axis("blockIdx.x")
    tx2 = te.thread_axis("threadIdx.x")
    d = bx2.var * nthr2 + tx2.var

    def body(b):
        def inner(t):
            row = tirx.Cast("int32", tirx.BufferLoad(ids, [b, t]))
            return tirx.BufferStore(
                dword, tirx.BufferLoad(dword, [row, d]) + tirx.BufferLoad(ds, [b * T + t, d]),
                [row, d])
        return _loop("t", T, _FK.SERIAL, inner)

    scatter = tirx.AttrStmt(bx2, "thread_extent", (D + nthr2 - 1) // nthr2, tirx.AttrStmt(
        tx2, "thread_extent", nthr2, tirx.IfThenElse(d < D, _loop("b", B, _FK.SERIAL, body), None)))
    return tirx.SeqStmt([zero_fill, scatter])


EMBED_TABLES = ("word", "pos", "type")


def build_embed_bwd(B: int, T: int, V: int, D: int, P: int, NT: int, *, dtype: str = "float32",
                    arch: Arch | None = None, config: dict | None = None,
                    grads: tuple[str, ...] = EMBED_TABLES) -> tirx.PrimFunc:
    """ids [B,T] int64, token_type [B,T] int64, ds [B*T,D] ->
    dword [V,D] (zeros + scatter-add of the rows of ds at ids; deterministic token order),
    dpos [P,D] (sum over b; rows >= T are zero), dtype [NT,D].

    `grads` names the outputs wanted, in this order, among "word", "pos", "type": a frozen table's
    gradient is not computed at all (for MiniLM the word table is 30522 x 384: its zero fill alone
    writes 47 MB per step; see [Note: frozen params] in compiler/stage.py)."""
    arch = resolve_arch(arch)
    bad = [g for g in grads if g not in EMBED_TABLES]
    if bad or not grads or len(set(grads)) != len(grads):
        raise ValueError(f"grads must be distinct names among {EMBED_TABLES}, got {grads!r}")
    grads = tuple(g for g in EMBED_TABLES if g in grads)
    rows = {"word": V, "pos": P, "type": NT}
    ids = te.placeholder((B, T), "int64", name="ids")
    tt = te.placeholder((B, T), "int64", name="token_type")
    ds = te.placeholder((B * T, D), dtype, name="ds")
    lanes = arch.lanes(dtype)
    if arch.is_cpu:
        def body(ins, o):
            named = dict(zip(grads, o, strict=True))
            return _embed_bwd_cpu(*ins, *(named.get(g) for g in EMBED_TABLES),
                                  B, T, V, D, P, NT, lanes, arch.threads)
        outs = te.extern([(rows[g], D) for g in grads], [ids, tt, ds], body,
                         name="embed_bwd", dtype=[dtype] * len(grads))
        outs = outs if isinstance(outs, list) else [outs]
        return te.create_prim_func([ids, tt, ds, *outs])
    # GPU: the scatter as an extern with explicit thread bindings, dpos/dtype as TE reductions
    zero = tirx.const(0.0, dtype)
    made = {}
    if "word" in grads:
        made["word"] = te.extern((V, D), [ids, ds],
                                 lambda ins, outs: _dword_gpu(ins[0], ins[1], outs[0], B, T, V, D),
                                 name="dword", dtype=dtype)
    b = te.reduce_axis((0, B), name="b")
    made["pos"] = te.compute(
        (P, D),
        lambda p, d: te.sum(
            tirx.Select(p < T, ds[b * T + te.min(p, T - 1), d], zero), axis=b),
        name="dpos",
    )
    i = te.reduce_axis((0, B * T), name="i")
    made["type"] = te.compute(
        (NT, D),
        lambda k, d: te.sum(
            tirx.Select(tirx.Cast("int32", tt[i // T, i % T]) == k, ds[i, d], zero), axis=i),
        name="dtype",
    )
    return te.create_prim_func([ids, tt, ds, *(made[g] for g in grads)])
