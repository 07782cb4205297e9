"""FAR's reconfigured FFN inside a stage graph: a learner sublayer and a frozen sublayer.

After `compiler.far.reconfigure`, each layer's FFN nodes are permuted so the R learner nodes come
first; the dense tensors are held as contiguous parts (model_spec.FAR_SPLIT):

    W_iL [R, D], b_iL [R], W_oL [D, R]            learner (trained)
    W_iF [F-R, D], b_iF [F-R], W_oF [D, F-R]       frozen  (stage inputs, no gradient, no AdamW)

Forward (the same function as the dense FFN, because the output sums over the FFN nodes):

    u_L = h1 W_iL^T + b_iL,  u_F = h1 W_iF^T + b_iF,  g = gelu(u)
    z   = g_L W_oL^T + (g_F W_oF^T + b_o)             two GEMMs, the second with a fused add

Backward: dW_oL, dW_iL, db_iL for the learner part only; the input gradient flows through both
parts. g_F is never saved (only the frozen weight gradient would need it), so FAR also saves
activation memory: [M, F-R] per layer.
"""

from __future__ import annotations

from compiler.kernels import elementwise, gemm


def forward(g, h1, P):
    """FAR FFN forward of one layer; returns (z before LayerNorm, saved tensors)."""
    E, M, D = g.E, g.M, g.d.hidden
    R = g.s.ffn_learners
    Fr = g.d.ffn - R
    (u_l,) = E(gemm.build_gemm, [h1, P["intermediate.learner.weight"],
                                 P["intermediate.learner.bias"]], M, R, D, trans_b=True, bias=True)
    (u_f,) = E(gemm.build_gemm, [h1, P["intermediate.frozen.weight"],
                                 P["intermediate.frozen.bias"]], M, Fr, D, trans_b=True, bias=True)
    (g_l,) = E(elementwise.build_gelu, [u_l], M, R)
    (g_f,) = E(elementwise.build_gelu, [u_f], M, Fr)
    (z_f,) = E(gemm.build_gemm, [g_f, P["output.frozen.weight"], P["output.dense.bias"]],
               M, D, Fr, trans_b=True, bias=True)
    (z,) = E(gemm.build_gemm, [g_l, P["output.learner.weight"], z_f], M, D, R, trans_b=True,
             epilogue="add")
    return z, dict(u_l=u_l, u_f=u_f, g_l=g_l)


def backward(g, dz, ds2, S, P, G):
    """FAR FFN backward of one layer: learner weight gradients into G; returns dh1 (the gradient
    w.r.t. the FFN input, plus the residual gradient ds2)."""
    E, M, D = g.E, g.M, g.d.hidden
    R = g.s.ffn_learners
    Fr = g.d.ffn - R
    (G["output.learner.weight"],) = E(gemm.build_gemm, [dz, S["g_l"]], D, R, M, trans_a=True)
    (du_l,) = E(gemm.build_gemm, [dz, P["output.learner.weight"], S["u_l"]], M, R, D,
                epilogue="gelu_grad")
    (du_f,) = E(gemm.build_gemm, [dz, P["output.frozen.weight"], S["u_f"]], M, Fr, D,
                epilogue="gelu_grad")
    (G["intermediate.learner.weight"],) = E(gemm.build_gemm, [du_l, S["h1"]], R, D, M, trans_a=True)
    (G["intermediate.learner.bias"],) = E(elementwise.build_bias_grad, [du_l], M, R)
    (t,) = E(gemm.build_gemm, [du_f, P["intermediate.frozen.weight"], ds2], M, D, Fr,
             epilogue="add")
    (dh1,) = E(gemm.build_gemm, [du_l, P["intermediate.learner.weight"], t], M, D, R,
               epilogue="add")
    return dh1
