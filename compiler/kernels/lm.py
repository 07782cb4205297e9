"""Causal-LM kernels: token-embedding gather/scatter and the shifted next-token cross-entropy.

* ``build_tok_embed_fwd``: ids [B,T] -> x [B*T, D] = word[ids].
* ``build_tok_embed_bwd``: ids, dx -> dword [V, D]: zero fill + ONE deterministic pass over the
  tokens (parallel over column vectors of D, tokens in order), as compiler/kernels/embed.py.
* ``build_lm_loss_fwd``: logits [B*T, V], labels [B, T] -> loss [1], lse [B*T]. Row (b, t) predicts
  ``labels[b, t+1]``; the last position of a row and labels equal to -100 (padding) are ignored;
  ``loss = sum(lse - logit[target]) / n_valid`` (n_valid >= 1 enforced by a max).
* ``build_lm_loss_bwd``: logits, lse, labels, scale [1] -> dlogits = (softmax - onehot) * valid *
  scale / n_valid (softmax recomputed from the saved log-sum-exp: no [B*T, V] probs kept), in a
  vocabulary-chunked layout for the head's backward (see [Note: head accumulation]).
"""

from __future__ import annotations

from tvm import te, tirx

from compiler.arch import Arch
from compiler.kernels.common import const
from compiler.kernels.common import exp as common_exp
from compiler.kernels.elementwise import (
    PAR_MIN_ELEMS, finish, resolve_arch, sched_flat, sched_rows, sched_rowsum, schedule_of,
    vectorize_exact, vectorize_loop,
)
from compiler.kernels.embed import _FK, _loop, _seq, _zero_fill

IGNORE_INDEX = -100


def build_tok_embed_fwd(B: int, T: int, V: int, D: int, *, dtype: str = "float32",
                        arch: Arch | None = None, config: dict | None = None) -> tirx.PrimFunc:
    """ids [B,T] int64, word [V,D] -> x [B*T, D] = word[ids[b, t]]."""
    arch = resolve_arch(arch)
    ids = te.placeholder((B, T), "int64", name="ids")
    word = te.placeholder((V, D), dtype, name="word")
    x = te.compute((B * T, D), lambda r, d: word[tirx.Cast("int32", ids[r // T, r % T]), d],
                   name="x")
    f = te.create_prim_func([ids, word, x])
    return sched_rows(f, "x", arch, dtype) if arch.is_cpu else f


def build_tok_embed_bwd(B: int, T: int, V: int, D: int, *, dtype: str = "float32",
                        arch: Arch | None = None, config: dict | None = None) -> tirx.PrimFunc:
    """ids [B,T] int64, dx [B*T, D] -> dword [V, D] (zeros + scatter-add at ids, token order)."""
    arch = resolve_arch(arch)
    if not arch.is_cpu:
        raise NotImplementedError("GPU token-embedding backward: use the CPU board for stage 0")
    ids = te.placeholder((B, T), "int64", name="ids")
    dx = te.placeholder((B * T, D), dtype, name="dx")
    lanes = arch.lanes(dtype)

    def body(ins, outs):
        ids_b, dx_b, dw = ins[0], ins[1], outs[0]
        vl = lanes if D % lanes == 0 else 1
        nv = D // vl

        def add(r, col):
            w = tirx.Cast("int32", tirx.BufferLoad(ids_b, [r // T, r % T]))
            return tirx.BufferStore(dw, tirx.BufferLoad(dw, [w, col])
                                    + tirx.BufferLoad(dx_b, [r, col]), [w, col])

        kind = _FK.PARALLEL if B * T * D >= PAR_MIN_ELEMS and nv > 1 else _FK.SERIAL
        vkind = _FK.VECTORIZED if vl > 1 else _FK.SERIAL
        return _seq(_zero_fill(dw, V * D, lanes, arch.threads),
                    _loop("j", nv, kind, lambda j: _loop("r", B * T, _FK.SERIAL, lambda r: _loop(
                        "l", vl, vkind, lambda l: add(r, j * vl + l)))))

    dword = te.extern((V, D), [ids, dx], body, name="tok_embed_bwd", dtype=dtype)
    return te.create_prim_func([ids, dx, dword])


def _target(labels, m, T):
    """(valid, target as int32 clamped into range) of row m."""
    b, t = m // T, m % T
    nxt = labels[b, te.min(t + 1, T - 1)]
    valid = tirx.And(t < T - 1, nxt != tirx.const(IGNORE_INDEX, "int64"))
    return valid, tirx.Cast("int32", te.max(nxt, tirx.const(0, "int64")))


def _count(labels, B, T, dtype):
    r = te.reduce_axis((0, B * T), name="r")
    return te.compute((1,), lambda _: te.sum(tirx.Select(
        _target(labels, r, T)[0], const(1.0, dtype), const(0.0, dtype)), axis=r), name="cnt")


def build_lm_loss_fwd(B: int, T: int, V: int, *, dtype: str = "float32", arch: Arch | None = None,
                      config: dict | None = None) -> tirx.PrimFunc:
    """logits [B*T, V], labels [B, T] int64 -> loss [1], lse [B*T]."""
    arch = resolve_arch(arch)
    M = B * T
    logits = te.placeholder((M, V), dtype, name="logits")
    labels = te.placeholder((B, T), "int64", name="labels")
    k1 = te.reduce_axis((0, V), name="k1")
    mx = te.compute((M,), lambda m: te.max(logits[m, k1], axis=k1), name="mx")
    k2 = te.reduce_axis((0, V), name="k2")
    se = te.compute((M,), lambda m: te.sum(common_exp(logits[m, k2] - mx[m]), axis=k2), name="se")
    lse = te.compute((M,), lambda m: mx[m] + te.log(se[m]), name="lse")
    cnt = _count(labels, B, T, dtype)

    def nll(m):
        valid, tgt = _target(labels, m, T)
        return tirx.Select(valid, lse[m] - logits[m, tgt], const(0.0, dtype))

    r = te.reduce_axis((0, M), name="rr")
    tot = te.compute((1,), lambda _: te.sum(nll(r), axis=r), name="tot")
    loss = te.compute((1,), lambda i: tot[i] / te.max(cnt[i], const(1.0, dtype)), name="loss")
    f = te.create_prim_func([logits, labels, loss, lse])
    if not arch.is_cpu:
        return f
    lanes = arch.lanes(dtype)
    sch = schedule_of(f)
    row = sched_rowsum(sch, sch.get_sblock("mx"), None, lanes,
                       anchor_parallel=M * V >= PAR_MIN_ELEMS)
    sched_rowsum(sch, sch.get_sblock("se"), row, lanes, reverse=True)
    sch.reverse_compute_at(sch.get_sblock("lse"), row)
    return finish(sch)


def head_chunk(V: int, target: int = 1024) -> int:
    """Vocabulary chunk for the head's backward: the largest divisor of V not above `target`.

    [Note: head accumulation] dhidden = dlogits @ W_head reduces over the whole vocabulary
    (49152 for SmolLM2). One float32 accumulator per output over 49152 terms lost ~8e-5 relative
    (torch's blocked sgemm: 5e-7), which dominated the gradient error of a 30-layer model. The
    head's backward therefore runs as a batched GEMM over vocabulary chunks followed by a sum of
    the partial results (`build_chunk_sum`).
    """
    c = max(c for c in range(1, min(V, target) + 1) if V % c == 0)
    return c if c >= 64 else V   # a vocabulary without a useful divisor: one chunk


def build_lm_loss_bwd(B: int, T: int, V: int, *, chunk: int | None = None, dtype: str = "float32",
                      arch: Arch | None = None, config: dict | None = None) -> tirx.PrimFunc:
    """logits [B*T, V], lse [B*T], labels [B, T] int64, scale [1] ->
    dlogits [V/chunk, B*T, chunk] (vocabulary-chunked layout, see [Note: head accumulation]):
    dlogits[c, m, k] is the gradient of logit (m, c*chunk + k)."""
    arch = resolve_arch(arch)
    M = B * T
    Vc = chunk or V
    if V % Vc:
        raise ValueError(f"chunk {Vc} does not divide the vocabulary {V}")
    nb = V // Vc
    logits = te.placeholder((M, V), dtype, name="logits")
    lse = te.placeholder((M,), dtype, name="lse")
    labels = te.placeholder((B, T), "int64", name="labels")
    scale = te.placeholder((1,), dtype, name="scale")
    cnt = _count(labels, B, T, dtype)
    coef = te.compute((M,), lambda m: tirx.Select(
        _target(labels, m, T)[0], scale[0] / te.max(cnt[0], const(1.0, dtype)),
        const(0.0, dtype)), name="coef")
    tg = te.compute((M,), lambda m: _target(labels, m, T)[1], name="tg")
    dl = te.compute((nb, M, Vc), lambda c, m, k: (common_exp(logits[m, c * Vc + k] - lse[m])
                                                  - tirx.Select(tg[m] == c * Vc + k,
                                                                const(1.0, dtype),
                                                                const(0.0, dtype))) * coef[m],
                    name="dlogits")
    f = te.create_prim_func([logits, lse, labels, scale, dl])
    if not arch.is_cpu:
        return f
    sch = schedule_of(f)
    c, m, k = sch.get_loops(sch.get_sblock("dlogits"))
    if M * V >= PAR_MIN_ELEMS:
        sch.parallel(sch.fuse(c, m))
    vectorize_loop(sch, k, arch.lanes(dtype))
    return finish(sch)


def build_replicate(nb: int, M: int, N: int, *, dtype: str = "float32", arch: Arch | None = None,
                    config: dict | None = None) -> tirx.PrimFunc:
    """x [M, N] -> y [nb, M, N] (nb copies: the shared operand of a batched GEMM)."""
    arch = resolve_arch(arch)
    x = te.placeholder((M, N), dtype, name="x")
    y = te.compute((nb, M, N), lambda b, m, n: x[m, n], name="y")
    f = te.create_prim_func([x, y])
    if not arch.is_cpu:
        return f
    sch = schedule_of(f)
    sched_flat(sch, sch.get_sblock("y"), arch, dtype)
    return finish(sch)


def build_chunk_sum(nb: int, M: int, N: int, *, dtype: str = "float32", arch: Arch | None = None,
                    config: dict | None = None) -> tirx.PrimFunc:
    """parts [nb, M, N] -> out [M, N] = sum over the nb chunks."""
    arch = resolve_arch(arch)
    parts = te.placeholder((nb, M, N), dtype, name="parts")
    r = te.reduce_axis((0, nb), name="r")
    out = te.compute((M, N), lambda m, n: te.sum(parts[r, m, n], axis=r), name="out")
    f = te.create_prim_func([parts, out])
    if not arch.is_cpu:
        return f
    sch = schedule_of(f)
    blk = sch.get_sblock("out")
    m, n, rr = sch.get_loops(blk)
    sch.reorder(m, rr, n)
    if M * N >= PAR_MIN_ELEMS:
        sch.parallel(m)
    vectorize_exact(sch, n, arch.lanes(dtype))
    init = sch.decompose_reduction(blk, rr)
    vectorize_exact(sch, sch.get_loops(init)[-1], arch.lanes(dtype))
    return finish(sch)
