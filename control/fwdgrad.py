"""Forward-gradient estimation (FwdLLM): seeds, central differences, variance control, sampler, SGD.

Pure numpy; no TVM. The gradient of a loss L at theta is estimated from k perturbations
v_i ~ N(0, I)
and their directional derivatives d_i = (L(theta + eps v_i) - L(theta - eps v_i)) / (2 eps):

    g_hat = (1/k) sum_i d_i v_i           E[g_hat] = E[v v^T] grad L = grad L   (v Gaussian)

Perturbations are identified by integer seeds (edgert.fwdgrad.perturbation), so a board receives
seeds and returns k floats. Per round (see control/federated.py for the clients):

* the number of perturbations grows until the estimate's relative variance
  tr(Var g_hat) / ||g_hat||^2 is under `var_threshold`, capped at `k_max` (FwdLLM's "global
  perturbation pacing": it rolls the update back and asks for more perturbations);
* the cosine-filtered sampler draws `pool_factor * k` candidate seeds and keeps the k whose
  perturbations are best aligned (|cosine|) with the previous round's global gradient (FwdLLM's
  discriminative sampling). Note: this makes E[v v^T] anisotropic, so the filtered estimate is
  biased toward the previous direction (like momentum); the unbiasedness holds for plain draws.

The relative variance r = tr Var(g_hat) / ||g_hat||^2 is the share of the estimate's squared norm
that is noise: E||g_hat||^2 = ||g||^2 + tr Var, and for isotropic draws tr Var ~ ||g||^2 (n + 1) / k
(n = trainable values), so r ~ (n/k) / (1 + n/k). A threshold t < 1 asks for k >~ n (1 - t) / t;
e.g. t = 0.9 for k ~ n / 9 (docs/fwdgrad.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from edgert.errors import ConfigError
from edgert.fwdgrad import perturbation

__all__ = ["FwdGradConfig", "Estimate", "ServerSGD", "central_difference", "estimate",
           "combine", "draw_seeds", "cosine_filter", "flatten", "unflatten", "perturbation",
           "trainable_names"]


@dataclass(frozen=True, slots=True)
class FwdGradConfig:
    """Forward-gradient hyper-parameters of a run."""

    eps: float = 1e-3             # central-difference step along each perturbation
    lr: float = 0.05              # server SGD learning rate
    momentum: float = 0.0         # server SGD momentum
    k_init: int = 8               # perturbations per client in a round's first pass
    k_max: int = 64               # cap per client and round (variance control stops here)
    var_threshold: float = 0.0    # relative variance target; 0 = always k_init (no pacing)
    pool_factor: int = 1          # candidates per kept perturbation; 1 = no cosine filter
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.eps > 0 or not self.lr > 0:
            raise ConfigError(f"eps and lr must be > 0, got eps={self.eps}, lr={self.lr}")
        if not 1 <= self.k_init <= self.k_max:
            raise ConfigError(f"need 1 <= k_init <= k_max, got {self.k_init}, {self.k_max}")
        if self.pool_factor < 1 or self.var_threshold < 0 or not 0 <= self.momentum < 1:
            raise ConfigError("pool_factor must be >= 1, var_threshold >= 0, momentum in [0, 1)")


# ---- flat vectors --------------------------------------------------------------------------------
def flatten(values: dict[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    """The flat float64 trainable vector, tensors in `names` order (see edgert.fwdgrad's note)."""
    return np.concatenate([np.asarray(values[n], np.float64).ravel() for n in names])


def unflatten(flat: np.ndarray, like: dict[str, np.ndarray], names: Sequence[str]
              ) -> dict[str, np.ndarray]:
    out, pos = {}, 0
    for n in names:
        a = np.asarray(like[n])
        out[n] = flat[pos:pos + a.size].reshape(a.shape).astype(a.dtype)
        pos += a.size
    if pos != flat.size:
        raise ConfigError(f"flat vector has {flat.size} values, the tensors {pos}")
    return out


def trainable_names(param_names: Sequence[str], method: str) -> list[str]:
    """The PEFT set trained by forward gradients, in manifest order.

    bitfit: every bias, every LayerNorm weight and the classifier (the new head must learn);
    head: the classifier only;
    lora: the LoRA B factors and the classifier of a LoRA bundle, A kept at its random init
    (LoRA-FA): with B = 0 the loss does not depend on A to first order (dL/dA = s B^T G = 0), so
    perturbing A would only add noise to every estimate (docs/fwdgrad.md);
    lora_ab: both factors and the classifier.

    >>> trainable_names(["a.dense.weight", "a.dense.bias", "classifier.weight"], "bitfit")
    ['a.dense.bias', 'classifier.weight']
    >>> trainable_names(["q.lora_A", "q.lora_B", "q.weight", "classifier.bias"], "lora")
    ['q.lora_B', 'classifier.bias']
    """
    head = [n for n in param_names if n.startswith("classifier.")]
    if method == "head":
        return head
    if method == "bitfit":
        return [n for n in param_names if n.endswith(".bias") or ".LayerNorm." in n
                or n.startswith("classifier.")]
    if method in ("lora", "lora_ab"):
        keep = (".lora_B",) if method == "lora" else (".lora_A", ".lora_B")
        lora = [n for n in param_names if n.endswith(keep)]
        if not lora:
            raise ConfigError(f"method {method!r} needs a bundle compiled with LoRA factors "
                              f"(compiler.peft.peft_spec(..., 'lora')); this one has none")
        return [n for n in param_names if n in lora or n in head]
    raise ConfigError(f"unknown trainable set {method!r}: use 'bitfit', 'head', 'lora' or "
                      f"'lora_ab'")


# ---- estimation ----------------------------------------------------------------------------------
def central_difference(loss: Callable[[np.ndarray], float], theta: np.ndarray, v: np.ndarray,
                       eps: float) -> float:
    """(L(theta + eps v) - L(theta - eps v)) / (2 eps): exact for quadratics, O(eps^2) otherwise."""
    return (loss(theta + eps * v) - loss(theta - eps * v)) / (2.0 * eps)


@dataclass(slots=True)
class Estimate:
    """Running sums of per-perturbation samples s_i = d_i v_i (weights w_i): mean, variance."""

    n: int
    total: np.ndarray             # sum w_i s_i
    sq: float = 0.0               # sum w_i ||s_i||^2
    weight: float = 0.0           # W = sum w_i
    w2: float = 0.0               # sum w_i^2
    count: int = 0                # perturbations

    @classmethod
    def empty(cls, n: int) -> Estimate:
        return cls(n, np.zeros(n))

    def add(self, derivs: Sequence[float], seeds: Sequence[int], weight: float = 1.0) -> None:
        """Fold in one client's directional derivatives; each sample weighs `weight`."""
        if len(derivs) != len(seeds):
            raise ConfigError(f"{len(derivs)} derivatives for {len(seeds)} seeds")
        if not weight > 0:
            raise ConfigError(f"sample weight must be > 0, got {weight}")
        for d, s in zip(derivs, seeds, strict=True):
            sample = float(d) * perturbation(s, self.n).astype(np.float64)
            self.total += weight * sample
            self.sq += weight * float(sample @ sample)
            self.weight += weight
            self.w2 += weight * weight
            self.count += 1

    @property
    def mean(self) -> np.ndarray:
        return self.total / self.weight if self.weight else self.total.copy()

    def trace_variance(self) -> float:
        """tr Var(mean), from the samples (reliability-weighted, unbiased for independent draws)."""
        if self.count < 2:
            return float("inf")
        g = self.mean
        w, w2 = self.weight, self.w2
        tr_sigma = (self.sq - w * float(g @ g)) / (w - w2 / w)   # per-sample tr Cov
        return max(0.0, tr_sigma) * w2 / (w * w)

    def relative_variance(self) -> float:
        """tr Var(mean) / ||mean||^2: the noise share, ~ (n/k) / (1 + n/k) for isotropic draws."""
        g = self.mean
        nrm = float(g @ g)
        return float("inf") if nrm == 0 else self.trace_variance() / nrm


def estimate(derivs: Sequence[float], seeds: Sequence[int], n: int) -> np.ndarray:
    """g_hat = mean_i d_i v_i for the perturbations of `seeds` over n trainable values."""
    e = Estimate.empty(n)
    e.add(derivs, seeds)
    return e.mean


def combine(parts: Sequence[tuple[np.ndarray, float]]) -> np.ndarray:
    """Federated aggregation: sum_c w_c g_c / sum_c w_c (w_c = the client's samples)."""
    if not parts or sum(w for _, w in parts) <= 0:
        raise ConfigError("aggregation needs at least one client with a positive weight")
    tot = sum(w for _, w in parts)
    return sum(g * (w / tot) for g, w in parts)


# ---- perturbation sampling -----------------------------------------------------------------------
def draw_seeds(run_seed: int, round_: int, client: int, k: int, start: int = 0) -> list[int]:
    """k distinct 63-bit seeds of (run, round, client), reproducible; `start` continues a list."""
    ss = np.random.SeedSequence([run_seed, round_, client, 0xF0D])
    pool = ss.generate_state(2 * (start + k), dtype=np.uint64)
    return [int(x >> np.uint64(1)) for x in pool[2 * start: 2 * (start + k): 2]]


def cosine_filter(seeds: Sequence[int], prev: np.ndarray | None, k: int) -> list[int]:
    """Keep the k seeds whose perturbations have the largest |cosine| with `prev`.

    |cos|: a perturbation anti-aligned with the gradient is as informative (its d is negative).
    Without a previous gradient (first round) the first k seeds are kept.
    """
    if prev is None or not np.any(prev) or len(seeds) <= k:
        return list(seeds)[:k]
    p = prev / np.linalg.norm(prev)
    score = []
    for s in seeds:
        v = perturbation(s, p.size)
        score.append(abs(float(v @ p)) / float(np.linalg.norm(v)))
    order = np.argsort(-np.asarray(score), kind="stable")[:k]
    return [seeds[i] for i in sorted(order)]


# ---- server optimizer ----------------------------------------------------------------------------
class ServerSGD:
    """SGD (optional momentum) on the aggregated estimate, flat float64 state."""

    def __init__(self, theta: np.ndarray, lr: float, momentum: float = 0.0) -> None:
        self.theta = np.array(theta, np.float64)
        self.lr, self.momentum = lr, momentum
        self.buf = np.zeros_like(self.theta)

    def step(self, g: np.ndarray, lr: float | None = None) -> np.ndarray:
        if g.shape != self.theta.shape or not np.all(np.isfinite(g)):
            raise ConfigError("gradient estimate has the wrong shape or non-finite values")
        self.buf = self.momentum * self.buf + g
        self.theta -= (self.lr if lr is None else lr) * self.buf
        return self.theta


# ---- one round -----------------------------------------------------------------------------------
Evaluate = Callable[[list[list[int]]], list[list[float]]]


@dataclass(slots=True)
class Round:
    """What one round gathered: the aggregated estimate and how it got there."""

    estimate: Estimate
    k: int                        # perturbations per client
    passes: int                   # evaluation requests sent to every client (1 = no pacing)
    seeds: list[list[int]]        # per client, in evaluation order

    @property
    def gradient(self) -> np.ndarray:
        return self.estimate.mean


def gather(evaluate: Evaluate, weights: Sequence[float], n: int, cfg: FwdGradConfig,
           round_: int, prev: np.ndarray | None = None) -> Round:
    """Collect directional derivatives from every client until the variance is low enough.

    `evaluate(seeds_per_client)` returns each client's derivatives (clients evaluate in parallel);
    each client's samples weigh `weights[c]` (its examples), so the mean is the example-weighted
    federated average. k starts at `cfg.k_init` and doubles (capped at `k_max`) while the
    relative variance exceeds `cfg.var_threshold`; later passes only add new perturbations.
    """
    if len(weights) == 0:
        raise ConfigError("a round needs at least one client")
    est = Estimate.empty(n)
    done = [0] * len(weights)
    seeds: list[list[int]] = [[] for _ in weights]
    k, passes = cfg.k_init, 0
    while True:
        ask = []
        for c in range(len(weights)):
            want = k - done[c]
            p = cfg.pool_factor
            cand = draw_seeds(cfg.seed, round_, c, want * p, start=done[c] * p)
            ask.append(cosine_filter(cand, prev, want))
        got = evaluate(ask)
        passes += 1
        for c, (s, d) in enumerate(zip(ask, got, strict=True)):
            est.add(d, s, float(weights[c]))
            seeds[c] += s
            done[c] = k
        if (cfg.var_threshold == 0 or k >= cfg.k_max
                or est.relative_variance() <= cfg.var_threshold):
            return Round(est, k, passes, seeds)
        k = min(2 * k, cfg.k_max)
