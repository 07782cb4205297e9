"""Forward-gradient core (control/fwdgrad.py): unbiasedness, variance, sampler, rounds. No TVM."""

from __future__ import annotations

import numpy as np
import pytest

from control.fwdgrad import (
    Estimate,
    FwdGradConfig,
    ServerSGD,
    central_difference,
    combine,
    cosine_filter,
    draw_seeds,
    estimate,
    flatten,
    gather,
    trainable_names,
    unflatten,
)
from edgert.errors import ConfigError
from edgert.fwdgrad import perturbation

N = 12


def _problem(seed=0):
    """A smooth non-quadratic loss with a known gradient: softplus terms + a quadratic."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((N, N))
    A = A @ A.T / N + np.eye(N)
    c = rng.standard_normal((5, N))
    theta = rng.standard_normal(N) * 0.5

    def loss(t):
        return 0.5 * t @ A @ t + float(np.sum(np.logaddexp(0, c @ t)))

    def grad(t):
        return A @ t + c.T @ (1 / (1 + np.exp(-(c @ t))))

    return loss, grad, theta


def _z(est_mean, g, k):
    # Var of one sample's component j: E[(g.v)^2 v_j^2] - g_j^2 = ||g||^2 + g_j^2 (v ~ N(0, I))
    se = np.sqrt((g @ g + g * g) / k)
    return (est_mean - g) / se


def test_central_difference_matches_the_directional_derivative():
    loss, grad, theta = _problem()
    v = perturbation(3, N).astype(np.float64)
    d = central_difference(loss, theta, v, 1e-4)
    assert d == pytest.approx(grad(theta) @ v, rel=1e-6)


def test_estimate_is_unbiased_z_test():
    """Mean of k = 4000 samples is within 4.5 standard errors of the true gradient per component
    (12 components: a false alarm has probability ~1e-4 for an unbiased estimator)."""
    loss, grad, theta = _problem()
    g, k = grad(theta), 4000
    seeds = draw_seeds(1, 0, 0, k)
    d = [central_difference(loss, theta, perturbation(s, N).astype(np.float64), 1e-3)
         for s in seeds]
    z = _z(estimate(d, seeds, N), g, k)
    assert np.max(np.abs(z)) < 4.5, z
    # The same test has power: an estimate 30% too small (e.g. a wrongly scaled perturbation) fails.
    assert np.max(np.abs(_z(0.7 * estimate(d, seeds, N), g, k))) > 6


def test_variance_estimate_matches_theory_and_repeats():
    """tr Var(mean) for isotropic draws is (||g||^2 (n + 1)) / k; the sample estimate agrees."""
    loss, grad, theta = _problem(1)
    g, k = grad(theta), 200
    means, rel = [], []
    for r in range(40):
        seeds = draw_seeds(5, r, 0, k)
        e = Estimate.empty(N)
        e.add([float(g @ perturbation(s, N)) for s in seeds], seeds)
        means.append(e.mean)
        rel.append(e.trace_variance())
    theory = (g @ g) * (N + 1) / k
    empirical = float(np.sum(np.var(np.array(means), axis=0, ddof=1)))
    assert np.mean(rel) == pytest.approx(theory, rel=0.1)
    assert empirical == pytest.approx(theory, rel=0.35)      # 40 repeats: ~22% standard error


def test_weighted_estimate_equals_weighted_average_of_clients():
    s1, s2 = draw_seeds(0, 0, 0, 5), draw_seeds(0, 0, 1, 5)
    d1, d2 = list(np.linspace(-1, 1, 5)), list(np.linspace(2, 0, 5))
    e = Estimate.empty(N)
    e.add(d1, s1, 30.0)
    e.add(d2, s2, 10.0)
    ref = combine([(estimate(d1, s1, N), 30.0), (estimate(d2, s2, N), 10.0)])
    np.testing.assert_allclose(e.mean, ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ConfigError):
        combine([])


def test_seeds_are_reproducible_distinct_and_extendable():
    a = draw_seeds(3, 7, 1, 8)
    assert a == draw_seeds(3, 7, 1, 8) and len(set(a)) == 8
    assert a == draw_seeds(3, 7, 1, 5) + draw_seeds(3, 7, 1, 3, start=5)
    assert set(a).isdisjoint(draw_seeds(3, 7, 2, 8)) and set(a).isdisjoint(draw_seeds(3, 8, 1, 8))


def test_cosine_filter_keeps_best_aligned_and_improves_the_estimate():
    _, grad, theta = _problem(2)
    g = grad(theta)
    pool = draw_seeds(0, 1, 0, 200)
    kept = cosine_filter(pool, g, 20)
    cos = {s: abs(perturbation(s, N) @ g) / np.linalg.norm(perturbation(s, N)) / np.linalg.norm(g)
           for s in pool}
    assert min(cos[s] for s in kept) >= max(cos[s] for s in pool if s not in kept)
    assert cosine_filter(pool, None, 20) == pool[:20]
    plain = estimate([g @ perturbation(s, N) for s in pool[:20]], pool[:20], N)
    filt = estimate([g @ perturbation(s, N) for s in kept], kept, N)

    def c(x):
        return x @ g / np.linalg.norm(x) / np.linalg.norm(g)

    assert c(filt) > c(plain) + 0.1


def test_gather_grows_k_until_the_variance_is_under_threshold():
    _, grad, theta = _problem(3)
    g = grad(theta)
    calls = []

    def evaluate(seeds_per_client):
        calls.append([len(s) for s in seeds_per_client])
        return [[float(g @ perturbation(s, N)) for s in ss] for ss in seeds_per_client]

    cfg = FwdGradConfig(k_init=4, k_max=256, var_threshold=0.5)
    r = gather(evaluate, [1.0, 3.0], N, cfg, round_=0)
    assert r.estimate.relative_variance() <= 0.5 and r.k > 4
    # r ~ (13/m) / (1 + 13/m) <= 0.5 needs m >= 13 effective samples; weights 1 and 3 give
    # m = 16/10 * k per client, so k >= 8.1: doubling from 4 stops at 16 (32 if unlucky)
    assert r.k in (16, 32) and r.passes == len(calls)
    # each later pass asks every client only for the new half of the doubled k
    assert calls[0] == [4, 4] and all(c == [k // 2] * 2
                                      for c, k in zip(calls[1:], [8, 16, 32], strict=False))
    capped = gather(evaluate, [1.0], N, FwdGradConfig(k_init=2, k_max=4, var_threshold=1e-6), 1)
    assert capped.k == 4
    fixed = gather(evaluate, [1.0], N, FwdGradConfig(k_init=3, k_max=64), 2)
    assert fixed.k == 3 and fixed.passes == 1


def test_forward_gradient_descent_lowers_the_loss():
    loss, _, theta = _problem(4)
    cfg = FwdGradConfig(eps=1e-3, lr=0.02, k_init=8, k_max=8)
    opt, prev = ServerSGD(theta, cfg.lr), None
    start = loss(theta)
    for rnd in range(150):
        t = opt.theta.copy()

        def evaluate(sp, t=t):
            return [[central_difference(loss, t, perturbation(s, N).astype(np.float64), cfg.eps)
                     for s in ss] for ss in sp]

        r = gather(evaluate, [1.0], N, cfg, rnd, prev)
        prev = r.gradient
        opt.step(r.gradient)
    opt_loss = loss(_optimum(4))
    assert loss(opt.theta) - opt_loss < 0.1 * (start - opt_loss)


def _optimum(seed):
    """The exact minimiser of _problem(seed)'s loss, by Newton's method."""
    _, grad, _ = _problem(seed)
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((N, N))
    A = A @ A.T / N + np.eye(N)
    c = rng.standard_normal((5, N))
    t = np.zeros(N)
    for _ in range(50):
        s = 1 / (1 + np.exp(-(c @ t)))
        t = t - np.linalg.solve(A + c.T @ np.diag(s * (1 - s)) @ c, grad(t))
    return t


def test_flatten_roundtrip_and_trainable_sets():
    vals = {"a.bias": np.arange(3, dtype=np.float32), "b.weight": np.ones((2, 2), np.float32)}
    flat = flatten(vals, ["b.weight", "a.bias"])
    assert flat.tolist() == [1, 1, 1, 1, 0, 1, 2]
    back = unflatten(flat, vals, ["b.weight", "a.bias"])
    assert back["a.bias"].dtype == np.float32 and back["b.weight"].shape == (2, 2)
    names = ["embeddings.LayerNorm.weight", "encoder.layer.0.attention.self.qkv.weight",
             "encoder.layer.0.attention.self.qkv.bias", "pooler.dense.weight", "classifier.weight"]
    assert trainable_names(names, "bitfit") == [names[0], names[2], names[4]]
    assert trainable_names(names, "head") == ["classifier.weight"]
    with pytest.raises(ConfigError, match="needs a bundle compiled with LoRA factors"):
        trainable_names(names, "lora")
    with pytest.raises(ConfigError, match="use 'bitfit', 'head', 'lora'"):
        trainable_names(names, "prefix")
    lora = [*names, "encoder.layer.0.attention.self.qkv.lora_A",
            "encoder.layer.0.attention.self.qkv.lora_B"]
    # LoRA-FA: B and the head; A only with lora_ab (dL/dA = 0 while B = 0)
    assert trainable_names(lora, "lora") == [names[4], lora[-1]]
    assert trainable_names(lora, "lora_ab") == [names[4], *lora[-2:]]
