"""Non-matmul kernels (norm, elementwise, embed, loss, optim) vs float64 numpy references,
backward kernels vs central finite differences of the float64 forward kernels, AdamW vs torch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tvm

from compiler.arch import get_arch
from compiler.kernels import elementwise as E
from compiler.kernels import embed as EM
from compiler.kernels import loss as L
from compiler.kernels import norm as N
from compiler.kernels import optim as O
from compiler.kernels.common import keep_mask_numpy
from edgert.contract import adamw_hyper
from tests.numeric_util import central_fd

HOST = get_arch("host")
TGT = HOST.tvm_target()
SEED = 20261122


def _compile(f):
    return tvm.compile(f, target=TGT)["main"]


class K:
    """A compiled kernel called with numpy arrays: inputs, then output (shape, dtype) specs."""

    def __init__(self, f, out_specs):
        self.fn = _compile(f)
        self.out_specs = out_specs

    def __call__(self, *ins):
        args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in ins]
        outs = [tvm.runtime.tensor(np.zeros(s, d)) for s, d in self.out_specs]
        self.fn(*args, *outs)
        res = [o.numpy() for o in outs]
        return res[0] if len(res) == 1 else res


def _erf(x):
    return np.vectorize(math.erf)(x)


def _gelu_ref(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _close(a, b, atol, rtol=0.0):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), atol=atol,
                               rtol=rtol)


rng = np.random.default_rng(0)


# ------------------------------------------------------------------------------- elementwise


@pytest.mark.parametrize("M,Nn", [(10, 12), (7, 13), (64, 384)])
def test_gelu_f32(M, Nn):
    u = (rng.standard_normal((M, Nn)) * 3).astype("float32")
    g = K(E.build_gelu(M, Nn, arch=HOST), [((M, Nn), "float32")])(u)
    _close(g, _gelu_ref(u.astype(np.float64)), atol=2e-6, rtol=1e-6)


def test_gelu_grad_fd_f64():
    M, Nn = 3, 5
    u = rng.standard_normal((M, Nn)) * 2
    w = rng.standard_normal((M, Nn))
    fwd = K(E.build_gelu(M, Nn, dtype="float64", arch=HOST), [((M, Nn), "float64")])
    bwd = K(E.build_gelu_bwd(M, Nn, dtype="float64", arch=HOST), [((M, Nn), "float64")])
    fd = central_fd(lambda x: float((fwd(x) * w).sum()), u.copy())
    _close(bwd(w, u), fd, atol=1e-7)
    # and float32 gradient vs the analytic float64 one
    du32 = K(E.build_gelu_bwd(M, Nn, arch=HOST), [((M, Nn), "float32")])(
        w.astype("float32"), u.astype("float32"))
    _close(du32, fd, atol=1e-5)


@pytest.mark.parametrize("M,Nn,p", [(10, 12, 0.1), (7, 13, 0.5), (32, 48, 0.3), (5, 6, 0.0)])
def test_dropout_f32(M, Nn, p):
    x = rng.standard_normal((M, Nn)).astype("float32")
    seed = np.array([SEED + M, 1], "int64")
    y = K(E.build_dropout(M, Nn, p=p, salt=7, arch=HOST), [((M, Nn), "float32")])(x, seed)
    keep = keep_mask_numpy(M * Nn, int(seed[0]), 7, p).reshape(M, Nn) if p > 0 else 1.0
    _close(y, x.astype(np.float64) * keep, atol=1e-6, rtol=1e-6)


def test_dropout_seed_flag():
    """seed_len=2: seed[1] switches dropout off (factor exactly 1) without recompiling."""
    M, Nn, p = 6, 20, 0.4
    x = rng.standard_normal((M, Nn)).astype("float32")
    k = K(E.build_dropout(M, Nn, p=p, salt=5, arch=HOST, seed_len=2), [((M, Nn), "float32")])
    keep = keep_mask_numpy(M * Nn, 77, 5, p).reshape(M, Nn)
    _close(k(x, np.array([77, 1], "int64")), x * keep, atol=1e-6)
    _close(k(x, np.array([77, 0], "int64")), x, atol=0)
    ln = K(N.build_layernorm_fwd(M, Nn, eps=1e-5, arch=HOST, dropout=p, salt=5, seed_len=2),
           [((M, Nn), "float32"), ((M, Nn), "float32"), ((M,), "float32")])
    ln0 = K(N.build_layernorm_fwd(M, Nn, eps=1e-5, arch=HOST),
            [((M, Nn), "float32"), ((M, Nn), "float32"), ((M,), "float32")])
    g, b = np.ones(Nn, "float32"), np.zeros(Nn, "float32")
    _close(ln(x, x, g, b, np.array([77, 0], "int64"))[0], ln0(x, x, g, b, np.array([0, 0]))[0],
           atol=1e-6)


def test_dropout_hash_small_unrolled_shape():
    """Regression: with uint32 wrap-around multiplies (common.hash_u32) TVM 0.27 emits `mul nuw`
    and LLVM mis-folds the hash in small fully-unrolled 2-D loops (wrong masks for rows >= 1).
    common.hash_u32 now widens its multiplies: exact masks."""
    from tvm import te

    M, Nn, p = 10, 12, 0.3
    x = te.placeholder((M, Nn), "float32", name="x")
    seed = te.placeholder((1,), "int64", name="seed")
    y = te.compute((M, Nn), lambda i, j: x[i, j] * E.keep_scale(i * Nn + j, seed[0], 3, p,
                                                                   "float32"), name="y")
    k = K(te.create_prim_func([x, seed, y]), [((M, Nn), "float32")])
    got = k(np.ones((M, Nn), "float32"), np.array([1234], "int64"))
    _close(got, keep_mask_numpy(M * Nn, 1234, 3, p).reshape(M, Nn), atol=1e-6)


Z = 5.0           # binomial bounds at 5 standard deviations: a false alarm has odds ~6e-7 per check


def _assert_dropout_statistics(y: np.ndarray, p: float, blocks: int = 16) -> None:
    """`y` = dropout applied to ones: every element is 0 or exactly float32(1 / (1 - p)); the
    dropped count of all n elements, and of each of `blocks` contiguous runs of the flat index,
    is within Z standard deviations of Binomial(count, p)."""
    scale = np.float32(1.0 / (1.0 - p))
    flat = y.reshape(-1)
    assert np.all((flat == 0) | (flat == scale)), "kept elements must be scaled by 1/(1-p)"
    for part in [flat, *np.array_split(flat, blocks)]:
        n, dropped = part.size, int(np.count_nonzero(part == 0))
        sd = math.sqrt(n * p * (1 - p))
        assert abs(dropped - n * p) <= Z * sd, \
            f"dropped {dropped} of {n} (p = {p}: expected {n * p:.0f} +- {Z * sd:.0f})"


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5])
def test_dropout_drops_p_and_scales_the_rest(p):
    """The compiled dropout mask (counter hash of seed, salt, element index) over 2^18 elements,
    for two seeds and two salts: drops p of them (binomial bound above, overall and per 1/16 of
    the index range, so a rate that is right only on average fails), scales the kept ones by
    exactly 1/(1-p), and masks of another seed or salt are independent of it (both drop an
    element with probability p^2, same bound)."""
    M, Nn = 256, 1024
    ones = np.ones((M, Nn), "float32")
    masks = []
    for salt in (7, 8):
        k = K(E.build_dropout(M, Nn, p=p, salt=salt, arch=HOST), [((M, Nn), "float32")])
        for seed in (SEED, SEED + 1):
            y = k(ones, np.array([seed, 1], "int64"))
            _assert_dropout_statistics(y, p)
            masks.append(y == 0)
    n = M * Nn
    for a, b in ((0, 1), (0, 2), (1, 3)):                    # other seed; other salt; both
        both = int(np.count_nonzero(masks[a] & masks[b]))
        sd = math.sqrt(n * p * p * (1 - p * p))
        assert abs(both - n * p * p) <= Z * sd, (a, b, both, n * p * p)
    bound = Z * math.sqrt(p * (1 - p) / n)
    print(f"p = {p}: dropped share {np.mean(masks[0]):.4f} (bound +- {bound:.4f})")


def test_dropout_statistics_check_can_fail():
    """The test of the test: a threshold off by 5% of p, a mask right only on average (the first
    p of the elements dropped), and an unscaled kept value each fail the check."""
    n, p = 1 << 18, 0.1
    off = np.where(keep_mask_numpy(n, SEED, 7, 1.05 * p) > 0, 1 / (1 - p), 0).astype("float32")
    with pytest.raises(AssertionError, match="dropped"):
        _assert_dropout_statistics(off, p)
    ordered = np.full(n, 1 / (1 - p), "float32")
    ordered[: int(n * p)] = 0
    with pytest.raises(AssertionError, match="dropped"):
        _assert_dropout_statistics(ordered, p)
    unscaled = np.where(keep_mask_numpy(n, SEED, 7, p) > 0, 1.0, 0.0).astype("float32")
    with pytest.raises(AssertionError, match="scaled by 1/"):
        _assert_dropout_statistics(unscaled, p)


def test_tanh_f32_and_fd_f64():
    M, Nn = 7, 13
    x = rng.standard_normal((M, Nn)).astype("float32")
    y = K(E.build_tanh_fwd(M, Nn, arch=HOST), [((M, Nn), "float32")])(x)
    _close(y, np.tanh(x.astype(np.float64)), atol=2e-6)
    dy = rng.standard_normal((M, Nn)).astype("float32")
    dx = K(E.build_tanh_bwd(M, Nn, arch=HOST), [((M, Nn), "float32")])(dy, y)
    _close(dx, dy * (1 - y.astype(np.float64) ** 2), atol=1e-6)
    # FD at float64
    M, Nn = 3, 4
    x = rng.standard_normal((M, Nn))
    w = rng.standard_normal((M, Nn))
    fwd = K(E.build_tanh_fwd(M, Nn, dtype="float64", arch=HOST), [((M, Nn), "float64")])
    bwd = K(E.build_tanh_bwd(M, Nn, dtype="float64", arch=HOST), [((M, Nn), "float64")])
    fd = central_fd(lambda z: float((fwd(z) * w).sum()), x.copy())
    _close(bwd(w, fwd(x)), fd, atol=1e-7)


@pytest.mark.parametrize("M,Nn", [(10, 12), (1000, 7), (1024, 384), (33, 40)])
def test_bias_grad_f32(M, Nn):
    dy = rng.standard_normal((M, Nn)).astype("float32")
    db = K(E.build_bias_grad(M, Nn, arch=HOST), [((Nn,), "float32")])(dy)
    _close(db, dy.astype(np.float64).sum(0), atol=1e-6 * M, rtol=1e-5)


def test_take_and_scatter_rows():
    B, T, D = 3, 5, 12
    h = rng.standard_normal((B * T, D)).astype("float32")
    cls = K(E.build_take_rows(B, T, D, arch=HOST), [((B, D), "float32")])(h)
    _close(cls, h[::T], atol=0)
    dh = K(E.build_scatter_rows_bwd(B, T, D, arch=HOST), [((B * T, D), "float32")])(cls)
    ref = np.zeros_like(h)
    ref[::T] = cls
    _close(dh, ref, atol=0)


@pytest.mark.parametrize("n", [1000, 1, 100003])
def test_accumulate_and_sumsq_f32(n):
    a = rng.standard_normal(n).astype("float32")
    g = rng.standard_normal(n).astype("float32")
    out = K(E.build_accumulate(n, arch=HOST), [((n,), "float32")])(a, g)
    _close(out, a.astype(np.float64) + g, atol=1e-6)
    s = K(E.build_sumsq(n, arch=HOST), [((1,), "float32")])(a)
    ref = (a.astype(np.float64) ** 2).sum()
    _close(s, [ref], atol=1e-6, rtol=2e-6)


def test_accumulate_in_place():
    n = 1000
    fn = _compile(E.build_accumulate(n, arch=HOST))
    a = rng.standard_normal(n).astype("float32")
    g = rng.standard_normal(n).astype("float32")
    ta = tvm.runtime.tensor(a)
    fn(ta, tvm.runtime.tensor(g), ta)
    _close(ta.numpy(), a.astype(np.float64) + g, atol=1e-6)


# ------------------------------------------------------------------------------- layernorm


def _ln_ref(x, resid, gamma, beta, eps, keep):
    s = x * keep + (resid if resid is not None else 0.0)
    mu = s.mean(1, keepdims=True)
    var = s.var(1, keepdims=True)
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = (s - mu) * rstd
    return xhat * gamma + beta, xhat, rstd[:, 0]


def _ln_bwd_ref(dy, xhat, rstd, gamma, keep):
    g = dy * gamma
    D = dy.shape[1]
    ds = rstd[:, None] * (g - g.mean(1, keepdims=True) - xhat * (g * xhat).mean(1, keepdims=True))
    return ds, (dy * xhat).sum(0), dy.sum(0), ds * keep


@pytest.mark.parametrize("M,D,residual,p", [
    (10, 12, True, 0.0), (10, 12, True, 0.2), (10, 12, False, 0.0), (7, 40, True, 0.1),
    (64, 384, True, 0.1), (64, 384, False, 0.0)])
def test_layernorm_f32(M, D, residual, p):
    eps = 1e-12
    x = rng.standard_normal((M, D)).astype("float32")
    r = rng.standard_normal((M, D)).astype("float32")
    gamma = (1 + 0.1 * rng.standard_normal(D)).astype("float32")
    beta = (0.1 * rng.standard_normal(D)).astype("float32")
    seed = np.array([SEED, 1], "int64")
    keep = keep_mask_numpy(M * D, SEED, 3, p).reshape(M, D) if p > 0 else 1.0
    fwd = K(N.build_layernorm_fwd(M, D, eps=eps, arch=HOST, residual=residual, dropout=p, salt=3),
            [((M, D), "float32"), ((M, D), "float32"), ((M,), "float32")])
    ins = [x] + ([r] if residual else []) + [gamma, beta, seed]
    y, xhat, rstd = fwd(*ins)
    yr, xr, rr = _ln_ref(x.astype(np.float64), r.astype(np.float64) if residual else None,
                         gamma, beta, eps, keep)
    _close(y, yr, atol=1e-5)
    _close(xhat, xr, atol=1e-5)
    _close(rstd, rr, atol=0, rtol=2e-6)
    dy = rng.standard_normal((M, D)).astype("float32")
    outs = [((M, D), "float32"), ((D,), "float32"), ((D,), "float32")]
    if p > 0:
        outs.append(((M, D), "float32"))
    bwd = K(N.build_layernorm_bwd(M, D, arch=HOST, dropout=p, salt=3), outs)
    res = bwd(dy, xr.astype("float32"), rr.astype("float32"), gamma, seed)
    ref = _ln_bwd_ref(dy.astype(np.float64), xr, rr, gamma.astype(np.float64), keep)
    _close(res[0], ref[0], atol=2e-5)
    _close(res[1], ref[1], atol=2e-6 * M, rtol=1e-5)
    _close(res[2], ref[2], atol=2e-6 * M, rtol=1e-5)
    if p > 0:
        _close(res[3], ref[3], atol=3e-5)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_layernorm_bwd_fd_f64(p):
    M, D, eps = 3, 8, 1e-5
    x = rng.standard_normal((M, D))
    r = rng.standard_normal((M, D))
    gamma = 1 + 0.3 * rng.standard_normal(D)
    beta = 0.3 * rng.standard_normal(D)
    w = rng.standard_normal((M, D))
    seed = np.array([SEED, 1], "int64")
    fwd = K(N.build_layernorm_fwd(M, D, eps=eps, dtype="float64", arch=HOST, dropout=p, salt=9),
            [((M, D), "float64"), ((M, D), "float64"), ((M,), "float64")])
    outs = [((M, D), "float64"), ((D,), "float64"), ((D,), "float64")]
    if p > 0:
        outs.append(((M, D), "float64"))
    bwd = K(N.build_layernorm_bwd(M, D, dtype="float64", arch=HOST, dropout=p, salt=9), outs)

    def loss(x_, r_, g_, b_):
        return float((fwd(x_, r_, g_, b_, seed)[0] * w).sum())

    _, xhat, rstd = fwd(x, r, gamma, beta, seed)
    res = bwd(w, xhat, rstd, gamma, seed)
    tol = 2e-7
    _close(res[0], central_fd(lambda z: loss(x, z, gamma, beta), r.copy()), atol=tol)  # d/d resid
    _close(res[1], central_fd(lambda z: loss(x, r, z, beta), gamma.copy()), atol=tol)
    _close(res[2], central_fd(lambda z: loss(x, r, gamma, z), beta.copy()), atol=tol)
    dx_fd = central_fd(lambda z: loss(z, r, gamma, beta), x.copy())
    _close(res[3] if p > 0 else res[0], dx_fd, atol=tol)


# ------------------------------------------------------------------------------- embeddings


def _embed_inputs(B, T, V, P, NT, D, dtype):
    ids = rng.integers(0, V, (B, T)).astype("int64")
    ids[0, :2] = 1  # duplicate ids: the scatter must accumulate
    ids[-1, -1] = 1
    tt = rng.integers(0, NT, (B, T)).astype("int64")
    word = rng.standard_normal((V, D)).astype(dtype)
    pos = rng.standard_normal((P, D)).astype(dtype)
    typ = rng.standard_normal((NT, D)).astype(dtype)
    return ids, tt, word, pos, typ


def _embed_bwd_ref(ids, tt, ds, V, P, NT, T):
    D = ds.shape[1]
    dword = np.zeros((V, D))
    np.add.at(dword, ids.reshape(-1), ds)
    dpos = np.zeros((P, D))
    dpos[:T] = ds.reshape(-1, T, D).sum(0)
    dtyp = np.zeros((NT, D))
    np.add.at(dtyp, tt.reshape(-1), ds)
    return dword, dpos, dtyp


@pytest.mark.parametrize("B,T,V,D,P,NT", [(2, 3, 11, 12, 7, 2), (4, 16, 300, 40, 20, 2),
                                          (8, 128, 1000, 384, 512, 2)])
def test_embed_f32(B, T, V, D, P, NT):
    ids, tt, word, pos, typ = _embed_inputs(B, T, V, P, NT, D, "float32")
    s = K(EM.build_embed_fwd(B, T, V, D, P, NT, arch=HOST), [((B * T, D), "float32")])(
        ids, tt, word, pos, typ)
    ref = (word[ids] + pos[None, :T] + typ[tt]).reshape(B * T, D)
    _close(s, ref, atol=1e-6)
    ds = rng.standard_normal((B * T, D)).astype("float32")
    bwd = K(EM.build_embed_bwd(B, T, V, D, P, NT, arch=HOST),
            [((V, D), "float32"), ((P, D), "float32"), ((NT, D), "float32")])
    dword, dpos, dtyp = bwd(ids, tt, ds)
    rw, rp, rt = _embed_bwd_ref(ids, tt, ds.astype(np.float64), V, P, NT, T)
    _close(dword, rw, atol=1e-5)
    _close(dpos, rp, atol=1e-5)
    _close(dtyp, rt, atol=2e-6 * B * T, rtol=1e-5)


def test_embed_bwd_fd_f64():
    B, T, V, D, P, NT = 2, 3, 5, 4, 6, 2
    ids, tt, word, pos, typ = _embed_inputs(B, T, V, P, NT, D, "float64")
    w = rng.standard_normal((B * T, D))
    fwd = K(EM.build_embed_fwd(B, T, V, D, P, NT, dtype="float64", arch=HOST),
            [((B * T, D), "float64")])
    bwd = K(EM.build_embed_bwd(B, T, V, D, P, NT, dtype="float64", arch=HOST),
            [((V, D), "float64"), ((P, D), "float64"), ((NT, D), "float64")])
    dword, dpos, dtyp = bwd(ids, tt, w)
    loss = lambda wo, po, ty: float((fwd(ids, tt, wo, po, ty) * w).sum())  # noqa: E731
    _close(dword, central_fd(lambda z: loss(z, pos, typ), word.copy()), atol=1e-8)
    _close(dpos, central_fd(lambda z: loss(word, z, typ), pos.copy()), atol=1e-8)
    _close(dtyp, central_fd(lambda z: loss(word, pos, z), typ.copy()), atol=1e-8)


@pytest.mark.parametrize("grads", [("pos", "type"), ("word",), ("type",)])
def test_embed_bwd_subset(grads):
    """Frozen tables (grads=...) are left out; the others equal the float64 reference."""
    B, T, V, D, P, NT = 4, 16, 300, 40, 20, 2
    ids, tt, *_ = _embed_inputs(B, T, V, P, NT, D, "float32")
    ds = rng.standard_normal((B * T, D)).astype("float32")
    rows = {"word": V, "pos": P, "type": NT}
    bwd = K(EM.build_embed_bwd(B, T, V, D, P, NT, arch=HOST, grads=grads),
            [((rows[g], D), "float32") for g in grads])
    got = bwd(ids, tt, ds)
    got = got if isinstance(got, (list, tuple)) else [got]
    ref = dict(zip(("word", "pos", "type"), _embed_bwd_ref(ids, tt, ds.astype(np.float64), V, P, NT, T)))
    assert len(got) == len(grads)
    for g, out in zip(grads, got, strict=True):
        _close(out, ref[g], atol=2e-6 * B * T, rtol=1e-5)
    with pytest.raises(ValueError, match="distinct names"):
        EM.build_embed_bwd(B, T, V, D, P, NT, arch=HOST, grads=("words",))


# ------------------------------------------------------------------------------- loss


@pytest.mark.parametrize("B,C", [(8, 2), (5, 7)])
def test_xent_f32(B, C):
    logits = (rng.standard_normal((B, C)) * 5 + 50).astype("float32")  # large: stability
    labels = rng.integers(0, C, B).astype("int64")
    loss, probs = K(L.build_xent_fwd(B, C, arch=HOST), [((1,), "float32"), ((B, C), "float32")])(
        logits, labels)
    lg = logits.astype(np.float64)
    mx = lg.max(1, keepdims=True)
    lse = mx[:, 0] + np.log(np.exp(lg - mx).sum(1))
    _close(loss, [(lse - lg[np.arange(B), labels]).mean()], atol=2e-6)
    pr = np.exp(lg - lse[:, None])
    _close(probs, pr, atol=1e-6)
    scale = np.array([0.5], "float32")
    dl = K(L.build_xent_bwd(B, C, arch=HOST), [((B, C), "float32")])(probs, labels, scale)
    onehot = np.eye(C)[labels]
    _close(dl, (pr - onehot) * 0.5 / B, atol=1e-7)


def test_xent_bwd_fd_f64():
    B, C = 4, 3
    logits = rng.standard_normal((B, C)) * 2
    labels = rng.integers(0, C, B).astype("int64")
    fwd = K(L.build_xent_fwd(B, C, dtype="float64", arch=HOST),
            [((1,), "float64"), ((B, C), "float64")])
    bwd = K(L.build_xent_bwd(B, C, dtype="float64", arch=HOST), [((B, C), "float64")])
    _, probs = fwd(logits, labels)
    dl = bwd(probs, labels, np.array([1.0]))
    fd = central_fd(lambda z: float(fwd(z, labels)[0][0]), logits.copy())
    _close(dl, fd, atol=1e-8)


# ------------------------------------------------------------------------------- adamw


def _adamw_np(p, g, m, v, h):
    lr, b1, b2, eps, wd, bc1, bc2, gs = h
    g = g * gs
    p = p * (1 - lr * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p - (lr / bc1) * m / (np.sqrt(v) / math.sqrt(bc2) + eps)
    return p, m, v


@pytest.mark.parametrize("n", [1000, 7])
def test_adamw_vs_numpy_f32(n):
    p = rng.standard_normal(n).astype("float32")
    m = np.zeros(n, "float32")
    v = np.zeros(n, "float32")
    k = K(O.build_adamw(n, arch=HOST), [((n,), "float32")] * 3)
    pr, mr, vr = p.astype(np.float64), m.astype(np.float64), v.astype(np.float64)
    for step in range(1, 4):
        g = rng.standard_normal(n).astype("float32")
        h = adamw_hyper(1e-2, 0.9, 0.999, 1e-8, 0.01, step, grad_scale=0.5)
        p, m, v = k(p, g, m, v, np.array(h, "float32"))
        pr, mr, vr = _adamw_np(pr, g.astype(np.float64), mr, vr, h)
    _close(p, pr, atol=2e-6)
    _close(m, mr, atol=1e-6)
    _close(v, vr, atol=1e-6)


def test_adamw_in_place_vs_torch():
    torch = pytest.importorskip("torch")
    n = 1000
    p0 = rng.standard_normal(n).astype("float32")
    grads = [rng.standard_normal(n).astype("float32") for _ in range(3)]
    fn = _compile(O.build_adamw(n, arch=HOST))
    tp, tm, tv = (tvm.runtime.tensor(a) for a in (p0, np.zeros(n, "float32"),
                                                   np.zeros(n, "float32")))
    tparam = torch.nn.Parameter(torch.tensor(p0))
    opt = torch.optim.AdamW([tparam], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    for step, g in enumerate(grads, start=1):
        h = adamw_hyper(1e-2, 0.9, 0.999, 1e-8, 0.01, step)
        fn(tp, tvm.runtime.tensor(g), tm, tv, tvm.runtime.tensor(np.array(h, "float32")),
           tp, tm, tv)  # in place
        tparam.grad = torch.tensor(g)
        opt.step()
    st = opt.state[tparam]
    _close(tp.numpy(), tparam.detach().numpy(), atol=2e-6)
    _close(tm.numpy(), st["exp_avg"].numpy(), atol=1e-6)
    _close(tv.numpy(), st["exp_avg_sq"].numpy(), atol=1e-6)
