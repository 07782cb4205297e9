"""Numerical helpers shared by the kernel tests."""

from __future__ import annotations

import numpy as np


def central_fd(fun, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central finite differences of scalar fun(x) w.r.t. every entry of x (float64); x is
    perturbed in place and restored."""
    g = np.zeros_like(x)
    flat, gf = x.reshape(-1), g.reshape(-1)
    for k in range(flat.size):
        old = flat[k]
        flat[k] = old + eps
        fp = fun(x)
        flat[k] = old - eps
        fm = fun(x)
        flat[k] = old
        gf[k] = (fp - fm) / (2 * eps)
    return g
