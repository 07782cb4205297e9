"""Decoder kernels (RMSNorm, RoPE, SwiGLU, causal GQA attention, LM loss) vs torch and finite diffs.

For each op:
* float64 backward kernel vs central finite differences of the float64 forward kernel
  (L = sum(out * W) for a random W; step 1e-6, atol 1e-7 relative to the gradient's scale);
* float32 forward + backward vs torch float64 autograd of the textbook formula (rel. error < 1e-5),
  at SmolLM2's widths (d = 64, 9 query / 3 key-value heads, hidden 576, FFN 1536) where cheap.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from compiler.arch import get_arch
from compiler.kernels import causal_attention as CA
from compiler.kernels import rmsnorm as RN
from compiler.kernels import rope as RP
from compiler.kernels import swiglu as SG
from tests.numeric_util import central_fd

torch = pytest.importorskip("torch")

HOST = get_arch("host")
TGT = HOST.tvm_target()
rng = np.random.default_rng(10)


class K:
    """A compiled kernel called with numpy arrays: inputs, then output (shape) specs."""

    def __init__(self, f, out_shapes, dtype):
        self.fn = tvm.compile(f, target=TGT)["main"]
        self.outs, self.dtype = out_shapes, dtype

    def __call__(self, *ins):
        args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in ins]
        outs = [tvm.runtime.tensor(np.zeros(s, self.dtype)) for s in self.outs]
        self.fn(*args, *outs)
        res = [o.numpy() for o in outs]
        return res[0] if len(res) == 1 else res


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _t(a, grad=False):
    return torch.tensor(np.asarray(a, np.float64), requires_grad=grad)


# ------------------------------------------------------------------------------ torch references
def ref_rmsnorm(x, r, w, eps):
    s = x + r
    return s * torch.rsqrt((s * s).mean(-1, keepdim=True) + eps) * w, s


def ref_rope(qkv, T, nh, nkv, d, theta):
    M = qkv.shape[0]
    cos, sin = (torch.tensor(t.astype(np.float64)) for t in RP.rope_tables(T, d, theta, "float64"))
    pos = torch.arange(M) % T
    qk = qkv[:, : (nh + nkv) * d].reshape(M, nh + nkv, d)
    a, b = qk[..., : d // 2], qk[..., d // 2:]
    c, s = cos[pos][:, None], sin[pos][:, None]
    rot = torch.cat([a * c - b * s, b * c + a * s], -1).reshape(M, -1)
    return torch.cat([rot, qkv[:, (nh + nkv) * d:]], 1)


def ref_swiglu(gu, I):
    g, u = gu[:, :I], gu[:, I:]
    return torch.nn.functional.silu(g) * u


def ref_attention(qkv, mask, B, T, nh, nkv, d):
    G = nh // nkv
    x = qkv.reshape(B, T, nh + 2 * nkv, d).transpose(1, 2)
    q, k, v = x[:, :nh], x[:, nh:nh + nkv], x[:, nh + nkv:]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)   # HF repeat_kv grouping
    s = q @ k.transpose(-1, -2) / np.sqrt(d)
    ok = torch.ones(T, T, dtype=torch.bool).tril()[None, None] & mask.bool()[:, None, None, :]
    p = torch.softmax(s.masked_fill(~ok, float("-inf")), -1)
    return (p @ v).transpose(1, 2).reshape(B * T, nh * d), p


# ---------------------------------------------------------------------------------------- RMSNorm
def _rms_kernels(M, D, dtype, eps=1e-5):
    f = K(RN.build_rmsnorm_fwd(M, D, eps=eps, dtype=dtype, arch=HOST), [(M, D), (M, D), (M,)],
          dtype)
    b = K(RN.build_rmsnorm_bwd(M, D, dtype=dtype, arch=HOST), [(M, D), (D,)], dtype)
    return f, b


def test_rmsnorm_fd_f64():
    M, D = 4, 12
    f, b = _rms_kernels(M, D, "float64")
    x, r, w = rng.standard_normal((M, D)), rng.standard_normal((M, D)), rng.standard_normal(D)
    W, Ws = rng.standard_normal((M, D)), rng.standard_normal((M, D))   # weights on y and on s

    def L(x_, r_, w_):
        y, s, _ = f(x_, r_, w_)
        return float((y * W).sum() + (s * Ws).sum())

    _, s, rstd = f(x, r, w)
    ds, dw = b(W, s, rstd, w, Ws)
    np.testing.assert_allclose(ds, central_fd(lambda v: L(v, r, w), x.copy()), atol=1e-7)
    np.testing.assert_allclose(ds, central_fd(lambda v: L(x, v, w), r.copy()), atol=1e-7)
    np.testing.assert_allclose(dw, central_fd(lambda v: L(x, r, v), w.copy()), atol=1e-7)


def test_rmsnorm_f32_vs_torch():
    M, D, eps = 64, 576, 1e-5
    f, b = _rms_kernels(M, D, "float32", eps)
    x, r = (rng.standard_normal((M, D)).astype("float32") for _ in range(2))
    w = (1 + 0.1 * rng.standard_normal(D)).astype("float32")
    dy, dres = (rng.standard_normal((M, D)).astype("float32") for _ in range(2))
    y, s, rstd = f(x, r, w)
    tx, tr, tw = _t(x, True), _t(r, True), _t(w, True)
    ty, ts = ref_rmsnorm(tx, tr, tw, eps)
    ((ty * _t(dy)).sum() + (ts * _t(dres)).sum()).backward()
    assert _rel(y, ty.detach()) < 1e-6 and _rel(s, ts.detach()) < 1e-7
    ds, dw = b(dy, s, rstd, w, dres)
    assert _rel(ds, tx.grad) < 1e-5 and _rel(dw, tw.grad) < 1e-5


# ------------------------------------------------------------------------------------------- RoPE
def test_rope_fd_f64_and_inverse():
    B, T, nh, nkv, d, theta = 2, 5, 4, 2, 8, 100.0
    M, C = B * T, (nh + 2 * nkv) * d
    cos, sin = RP.rope_tables(T, d, theta, "float64")
    f = K(RP.build_rope(B, T, nh, nkv, d, dtype="float64", arch=HOST), [(M, C)], "float64")
    fi = K(RP.build_rope(B, T, nh, nkv, d, inverse=True, dtype="float64", arch=HOST), [(M, C)],
           "float64")
    x, W = rng.standard_normal((M, C)), rng.standard_normal((M, C))
    np.testing.assert_allclose(f(x, cos, sin), ref_rope(_t(x), T, nh, nkv, d, theta).numpy(),
                               atol=1e-13)
    np.testing.assert_allclose(fi(f(x, cos, sin), cos, sin), x, atol=1e-13)   # orthogonal
    g = central_fd(lambda v: float((f(v, cos, sin) * W).sum()), x.copy())
    np.testing.assert_allclose(fi(W, cos, sin), g, atol=1e-7)


def test_rope_f32_vs_torch():
    B, T, nh, nkv, d, theta = 2, 32, 9, 3, 64, 100000.0
    M, C = B * T, (nh + 2 * nkv) * d
    cos, sin = RP.rope_tables(T, d, theta)
    f = K(RP.build_rope(B, T, nh, nkv, d, arch=HOST), [(M, C)], "float32")
    fi = K(RP.build_rope(B, T, nh, nkv, d, inverse=True, arch=HOST), [(M, C)], "float32")
    x, dy = (rng.standard_normal((M, C)).astype("float32") for _ in range(2))
    tx = _t(x, True)
    ty = ref_rope(tx, T, nh, nkv, d, theta)
    (ty * _t(dy)).sum().backward()
    assert _rel(f(x, cos, sin), ty.detach()) < 1e-6
    assert _rel(fi(dy, cos, sin), tx.grad) < 1e-6


# ----------------------------------------------------------------------------------------- SwiGLU
def test_swiglu_fd_f64_and_f32_vs_torch():
    M, I = 3, 6
    f = K(SG.build_swiglu_fwd(M, I, dtype="float64", arch=HOST), [(M, I)], "float64")
    b = K(SG.build_swiglu_bwd(M, I, dtype="float64", arch=HOST), [(M, 2 * I)], "float64")
    gu, W = rng.standard_normal((M, 2 * I)) * 3, rng.standard_normal((M, I))
    np.testing.assert_allclose(f(gu), ref_swiglu(_t(gu), I).numpy(), atol=1e-13)
    np.testing.assert_allclose(b(W, gu), central_fd(lambda v: float((f(v) * W).sum()), gu.copy()),
                               atol=1e-7)
    M, I = 64, 1536
    f = K(SG.build_swiglu_fwd(M, I, arch=HOST), [(M, I)], "float32")
    b = K(SG.build_swiglu_bwd(M, I, arch=HOST), [(M, 2 * I)], "float32")
    gu = (rng.standard_normal((M, 2 * I)) * 4).astype("float32")
    da = rng.standard_normal((M, I)).astype("float32")
    tg = _t(gu, True)
    ta = ref_swiglu(tg, I)
    (ta * _t(da)).sum().backward()
    assert _rel(f(gu), ta.detach()) < 1e-6
    assert _rel(b(da, gu), tg.grad) < 1e-6


# -------------------------------------------------------------------------- causal GQA attention
def _attn(B, T, nh, nkv, d, dtype):
    M, C = B * T, (nh + 2 * nkv) * d
    f = K(CA.build_causal_attention_fwd(B, T, nh, nkv, d, dtype=dtype, arch=HOST),
          [(M, nh * d), (B, nh, T, T)], dtype)
    b = K(CA.build_causal_attention_bwd(B, T, nh, nkv, d, dtype=dtype, arch=HOST), [(M, C)], dtype)
    return f, b


def _mask(B, T, dtype):
    m = np.ones((B, T), dtype)
    m[-1, T - T // 3:] = 0   # right padding in the last row
    return m


def test_causal_attention_fd_f64():
    B, T, nh, nkv, d = 2, 6, 4, 2, 4
    f, b = _attn(B, T, nh, nkv, d, "float64")
    C, mask = (nh + 2 * nkv) * d, _mask(B, T, "float64")
    qkv, W = rng.standard_normal((B * T, C)), rng.standard_normal((B * T, nh * d))
    ctx, P = f(qkv, mask)
    rc, rp = ref_attention(_t(qkv), _t(mask), B, T, nh, nkv, d)
    np.testing.assert_allclose(ctx, rc.numpy(), atol=1e-13)
    np.testing.assert_allclose(P, rp.numpy(), atol=1e-13)
    g = central_fd(lambda v: float((f(v, mask)[0] * W).sum()), qkv.copy())
    np.testing.assert_allclose(b(qkv, P, W), g, atol=1e-7)


@pytest.mark.parametrize("B,T,nh,nkv,d", [(2, 32, 9, 3, 64), (1, 16, 4, 4, 16)])
def test_causal_attention_f32_vs_torch(B, T, nh, nkv, d):
    f, b = _attn(B, T, nh, nkv, d, "float32")
    C, mask = (nh + 2 * nkv) * d, _mask(B, T, "float32")
    qkv = rng.standard_normal((B * T, C)).astype("float32")
    dctx = rng.standard_normal((B * T, nh * d)).astype("float32")
    tq = _t(qkv, True)
    rc, rp = ref_attention(tq, _t(mask), B, T, nh, nkv, d)
    (rc * _t(dctx)).sum().backward()
    ctx, P = f(qkv, mask)
    assert _rel(ctx, rc.detach()) < 1e-5 and _rel(P, rp.detach()) < 1e-5
    assert _rel(b(qkv, P, dctx), tq.grad) < 1e-5


# ----------------------------------------------------------------- token embedding, causal-LM loss
from compiler.kernels import lm as LM  # noqa: E402


def test_tok_embed_fwd_bwd():
    B, T, V, D = 2, 8, 50, 24
    ids = rng.integers(0, V, (B, T)).astype("int64")
    ids[1, :3] = ids[0, 0]   # repeated tokens accumulate
    word = rng.standard_normal((V, D)).astype("float32")
    dx = rng.standard_normal((B * T, D)).astype("float32")
    x = K(LM.build_tok_embed_fwd(B, T, V, D, arch=HOST), [(B * T, D)], "float32")(ids, word)
    np.testing.assert_array_equal(x, word[ids.reshape(-1)])
    dw = K(LM.build_tok_embed_bwd(B, T, V, D, arch=HOST), [(V, D)], "float32")(ids, dx)
    ref = np.zeros((V, D))
    np.add.at(ref, ids.reshape(-1), dx.astype(np.float64))
    np.testing.assert_allclose(dw, ref, atol=1e-5)


def _lm_ref(logits, labels):
    lab = torch.tensor(labels)[:, 1:].reshape(-1)
    B, T = labels.shape
    lg = logits.reshape(B, T, -1)[:, :-1].reshape(-1, logits.shape[-1])
    return torch.nn.functional.cross_entropy(lg, lab, ignore_index=-100)


@pytest.mark.parametrize("dtype,B,T,V", [("float64", 2, 4, 7), ("float32", 2, 16, 49152)])
def test_lm_loss_vs_torch_and_fd(dtype, B, T, V):
    M = B * T
    logits = (rng.standard_normal((M, V)) * 3).astype(dtype)
    labels = rng.integers(0, V, (B, T)).astype("int64")
    labels[1, T - 2:] = -100   # padding
    fwd = K(LM.build_lm_loss_fwd(B, T, V, dtype=dtype, arch=HOST), [(1,), (M,)], dtype)
    Vc = LM.head_chunk(V)
    bwd_c = K(LM.build_lm_loss_bwd(B, T, V, chunk=Vc, dtype=dtype, arch=HOST),
              [(V // Vc, M, Vc)], dtype)

    def bwd(*a):   # chunked layout [nb, M, Vc] -> [M, V]
        return bwd_c(*a).transpose(1, 0, 2).reshape(M, V)

    tl = _t(logits, True)
    ref = _lm_ref(tl, labels)
    ref.backward()
    loss, lse = fwd(logits, labels)
    scale = np.array([1.0], dtype)
    tol = 1e-12 if dtype == "float64" else 1e-5
    assert abs(loss[0] - float(ref)) <= tol * abs(float(ref))
    assert _rel(bwd(logits, lse, labels, scale), tl.grad) < tol
    if dtype == "float64":
        g = central_fd(lambda v: float(fwd(v, labels)[0][0]), logits.copy())
        np.testing.assert_allclose(bwd(logits, lse, labels, scale), g, atol=1e-8)


def test_head_chunk_helpers():
    nb, M, N = 5, 6, 20
    x = rng.standard_normal((M, N)).astype("float32")
    parts = rng.standard_normal((nb, M, N)).astype("float32")
    rep = K(LM.build_replicate(nb, M, N, arch=HOST), [(nb, M, N)], "float32")(x)
    np.testing.assert_array_equal(rep, np.broadcast_to(x, (nb, M, N)))
    out = K(LM.build_chunk_sum(nb, M, N, arch=HOST), [(M, N)], "float32")(parts)
    np.testing.assert_allclose(out, parts.astype(np.float64).sum(0), atol=1e-5)
    assert LM.head_chunk(49152) == 1024 and LM.head_chunk(7) == 7 and LM.head_chunk(2053) == 2053
