"""Learning-rate schedule and the AdamW hyper-parameter vector (pure)."""

from __future__ import annotations

import pytest

from control.local import OptimConfig, seed_vec, step_seed
from edgert.errors import ConfigError


def test_warmup_then_linear_decay():
    o = OptimConfig(lr=1.0, warmup_steps=4, total_steps=12)
    assert [o.lr_at(s) for s in (1, 2, 4)] == [0.25, 0.5, 1.0]
    assert o.lr_at(8) == pytest.approx(0.5)
    assert o.lr_at(12) == 0.0


def test_hyper_vector_bias_corrections():
    h = OptimConfig(lr=0.1, beta1=0.5, beta2=0.75).hyper(2, grad_scale=0.5)
    assert list(h) == pytest.approx([0.1, 0.5, 0.75, 1e-8, 0.01, 0.75, 1 - 0.75 ** 2, 0.5])


def test_bad_optimizer_config():
    with pytest.raises(ConfigError, match="learning rate"):
        OptimConfig(lr=0)
    with pytest.raises(ConfigError, match="betas"):
        OptimConfig(beta1=1.0)


def test_seeds_distinct_and_reproducible():
    seeds = {step_seed(0, s, m) for s in range(1, 50) for m in range(4)}
    assert len(seeds) == 49 * 4 and all(0 < x < 2 ** 31 for x in seeds)
    assert step_seed(3, 7, 1) == step_seed(3, 7, 1)
    assert list(seed_vec(5, False)) == [5, 0]
