"""Classification loss: mean softmax cross-entropy (forward) and its gradient (backward).

B x C is tiny for sequence classification (8 x 2): the CPU schedule is serial (a parallel loop's
thread-pool wake-up would cost more than the whole kernel) with the element-wise parts inlined.
"""

from __future__ import annotations

from tvm import te, tirx

from compiler.arch import Arch
from compiler.kernels.elementwise import finish, resolve_arch, sched_flat, schedule_of


def build_xent_fwd(B: int, C: int, *, dtype: str = "float32", arch: Arch | None = None,
                   config: dict | None = None) -> tirx.PrimFunc:
    """logits [B,C], labels [B] int64 -> loss [1] (mean cross-entropy, stable log-sum-exp),
    probs [B,C] (softmax)."""
    arch = resolve_arch(arch)
    logits = te.placeholder((B, C), dtype, name="logits")
    labels = te.placeholder((B,), "int64", name="labels")
    c1 = te.reduce_axis((0, C), name="c1")
    mx = te.compute((B,), lambda b: te.max(logits[b, c1], axis=c1), name="mx")
    ex = te.compute((B, C), lambda b, c: te.exp(logits[b, c] - mx[b]), name="ex")
    c2 = te.reduce_axis((0, C), name="c2")
    se = te.compute((B,), lambda b: te.sum(ex[b, c2], axis=c2), name="se")
    probs = te.compute((B, C), lambda b, c: ex[b, c] / se[b], name="probs")
    nll = te.compute(
        (B,),
        lambda b: mx[b] + te.log(se[b]) - logits[b, tirx.Cast("int32", labels[b])],
        name="nll",
    )
    bb = te.reduce_axis((0, B), name="bb")
    lsum = te.compute((1,), lambda _: te.sum(nll[bb], axis=bb), name="lsum")
    loss = te.compute((1,), lambda i: lsum[i] * tirx.const(1.0 / B, dtype), name="loss")
    f = te.create_prim_func([logits, labels, loss, probs])
    if not arch.is_cpu:
        return f
    sch = schedule_of(f)
    sch.compute_inline(sch.get_sblock("nll"))
    return finish(sch)


def build_xent_bwd(B: int, C: int, *, dtype: str = "float32", arch: Arch | None = None,
                   config: dict | None = None) -> tirx.PrimFunc:
    """probs [B,C], labels [B] int64, scale [1] (dtype) ->
    dlogits [B,C] = (probs - onehot(labels)) * scale[0] / B."""
    arch = resolve_arch(arch)
    probs = te.placeholder((B, C), dtype, name="probs")
    labels = te.placeholder((B,), "int64", name="labels")
    scale = te.placeholder((1,), dtype, name="scale")
    one = tirx.const(1.0, dtype)
    zero = tirx.const(0.0, dtype)
    dl = te.compute(
        (B, C),
        lambda b, c: (probs[b, c] - tirx.Select(tirx.Cast("int32", labels[b]) == c, one, zero))
        * (scale[0] * tirx.const(1.0 / B, dtype)),
        name="dlogits",
    )
    f = te.create_prim_func([probs, labels, scale, dl])
    if not arch.is_cpu:
        return f
    sch = schedule_of(f)
    sched_flat(sch, sch.get_sblock("dlogits"), arch, dtype)
    return finish(sch)
