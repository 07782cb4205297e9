"""AdamW (torch.optim.AdamW semantics), one fused element-wise kernel, safe to run in place.

For every index i the kernel loads param[i], grad[i], m[i], v[i] and stores param_out[i], then
m_out[i], then v_out[i]. param_out is computed from the *inputs* m, v (m_new, v_new are recomputed,
not read back) and is stored first; m_out/v_out never read param. So with param_out aliasing param,
m_out aliasing m and v_out aliasing v (relax call_tir_inplace) no element is read after it has been
overwritten, in the vectorised loop (whole vectors: load all, store p, m, v) as in the scalar tail.
The function is marked `tirx.noalias = False` so LLVM may not reorder loads of one buffer across
stores to another. CPU: hand-built loops in a te.extern (parallel x vectorised + scalar tail;
`loop_partition` of TE's multi-output loop segfaults in TVM 0.27). GPU: the plain TE compute.
"""

from __future__ import annotations

from tvm import te, tirx

from compiler.arch import Arch
from compiler.kernels.elementwise import (
    PAR_MIN_ELEMS,
    resolve_arch,
    hand_flat,
)
from edgert.contract import HYPER


def build_adamw(n: int, *, dtype: str = "float32", arch: Arch | None = None,
                config: dict | None = None) -> tirx.PrimFunc:
    """param [n], grad [n], m [n], v [n], hyper [8] (dtype) -> param_out [n], m_out [n], v_out [n].

    hyper = (lr, beta1, beta2, eps, weight_decay, 1-beta1^t, 1-beta2^t, grad_scale), laid out as
    edgert.contract.HYPER;
    g = grad*grad_scale; p *= 1 - lr*wd; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g*g;
    p -= (lr/bc1) * m / (sqrt(v)/sqrt(bc2) + eps)."""
    arch = resolve_arch(arch)
    param = te.placeholder((n,), dtype, name="param")
    grad = te.placeholder((n,), dtype, name="grad")
    m = te.placeholder((n,), dtype, name="m")
    v = te.placeholder((n,), dtype, name="v")
    hyper = te.placeholder((len(HYPER),), dtype, name="hyper")
    one = tirx.const(1.0, dtype)
    lr, b1, b2, eps, wd, bc1, bc2, gs = (hyper[k] for k in range(len(HYPER)))

    def fcompute(i):
        g = grad[i] * gs
        m_new = b1 * m[i] + (one - b1) * g
        v_new = b2 * v[i] + (one - b2) * g * g
        denom = te.sqrt(v_new) / te.sqrt(bc2) + eps
        p_new = param[i] * (one - lr * wd) - (lr / bc1) * m_new / denom
        return p_new, m_new, v_new  # stored in this order (see module docstring)

    if not arch.is_cpu:
        p_out, m_out, v_out = te.compute((n,), fcompute, name="adamw")
        f = te.create_prim_func([param, grad, m, v, hyper, p_out, m_out, v_out])
        return f.with_attr("tirx.noalias", False)

    # CPU: hand-built loops (loop_partition of a multi-output loop crashes TVM 0.27), vectorised with
    # a scalar tail, three stores per index in the order p, m, v.
    def body(ins, outs):
        bp, bg, bm, bv, bh = ins
        op, om, ov = outs
        hp = [tirx.BufferLoad(bh, [k]) for k in range(8)]
        lr_, b1_, b2_, eps_, wd_, bc1_, bc2_, gs_ = hp

        def at(i):
            g = tirx.BufferLoad(bg, [i]) * gs_
            m_new = b1_ * tirx.BufferLoad(bm, [i]) + (one - b1_) * g
            v_new = b2_ * tirx.BufferLoad(bv, [i]) + (one - b2_) * g * g
            denom = te.sqrt(v_new) / te.sqrt(bc2_) + eps_
            p_new = tirx.BufferLoad(bp, [i]) * (one - lr_ * wd_) - (lr_ / bc1_) * m_new / denom
            return tirx.SeqStmt([tirx.BufferStore(op, p_new, [i]), tirx.BufferStore(om, m_new, [i]),
                                 tirx.BufferStore(ov, v_new, [i])])

        return hand_flat(n, arch.lanes(dtype), n >= PAR_MIN_ELEMS, at)

    outs = te.extern([(n,), (n,), (n,)], [param, grad, m, v, hyper], body, name="adamw",
                     dtype=[dtype] * 3)
    f = te.create_prim_func([param, grad, m, v, hyper, *outs])
    return f.with_attr("tirx.noalias", False)
