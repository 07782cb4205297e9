"""Compile one kernel (PrimFunc) for the target, check it against the default's outputs and time
it on this machine."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np

from compiler.arch import Arch


def make_inputs(params, n_out: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Random inputs by buffer name: masks keep >= half of each row, seeds enable dropout."""
    out = []
    for p in params[:len(params) - n_out]:
        shape, dt = tuple(int(s) for s in p.shape), str(p.dtype)
        if p.name == "seed":
            a = np.array([1234, 1] + [0] * (math.prod(shape) - 2), np.int64)[:math.prod(shape)]
        elif p.name == "mask":
            keep = rng.integers(shape[-1] // 2, shape[-1] + 1, size=shape[:-1])
            a = (np.arange(shape[-1]) < keep[..., None]).astype(dt)
        elif np.dtype(dt).kind in "iu":
            a = rng.integers(0, 2, size=shape).astype(dt)
        else:
            a = rng.uniform(-1, 1, size=shape).astype(dt)
        out.append(a.reshape(shape))
    return out


class Measurer:
    """Compiles one PrimFunc for the target and times it on this machine (min of N runs)."""

    def __init__(self, arch: Arch, min_seconds: float = 0.15, min_runs: int = 3,
                 max_runs: int = 50, rtol: float = 1e-4):
        import tvm

        self.arch, self.target, self.dev = arch, arch.tvm_target(), tvm.cpu()
        self.min_seconds, self.min_runs, self.max_runs = min_seconds, min_runs, max_runs
        self.rtol = rtol

    def compile(self, f) -> Callable:
        import tvm

        mod = tvm.IRModule({"main": f.with_attr("global_symbol", "main")})
        return tvm.compile(mod, target=self.target)["main"]

    def args(self, f, n_out: int, inputs: list[np.ndarray]) -> list:
        """Device tensors: the inputs, then outputs filled with NaN (a skipped store shows)."""
        import tvm

        outs = []
        for p in f.params[len(f.params) - n_out:]:
            dt = str(p.dtype)
            fill = np.nan if np.dtype(dt).kind == "f" else -1
            outs.append(np.full(tuple(int(s) for s in p.shape), fill, dt))
        return [tvm.runtime.tensor(a, self.dev) for a in [*inputs, *outs]]

    def run_once(self, fn, args, n_out: int) -> list[np.ndarray]:
        fn(*args)
        return [a.numpy() for a in args[len(args) - n_out:]]

    def time(self, fn, args, cutoff: float | None = None) -> float:
        """Min over runs (seconds); stops after two runs once slower than `cutoff`."""
        fn(*args)                                   # warm-up
        t_min, total, n = math.inf, 0.0, 0
        while n < self.min_runs or (total < self.min_seconds and n < self.max_runs):
            t0 = time.perf_counter()
            fn(*args)
            dt = time.perf_counter() - t0
            t_min, total, n = min(t_min, dt), total + dt, n + 1
            if cutoff is not None and n >= 2 and t_min > cutoff:
                break
        return t_min

    def mismatch(self, out: list[np.ndarray], ref: list[np.ndarray]) -> str | None:
        """Why `out` differs from the reference outputs (None if it agrees)."""
        for i, (o, r) in enumerate(zip(out, ref, strict=True)):
            scale = float(np.abs(r).max()) if r.size else 0.0
            if not np.allclose(o, r, rtol=self.rtol, atol=self.rtol * max(scale, 1e-30)):
                with np.errstate(invalid="ignore"):
                    err = float(np.nanmax(np.abs(o.astype(np.float64) - r))) if o.size else 0.0
                nan = int(np.isnan(o).sum())
                return f"output {i}: max |diff| {err:.3g} (scale {scale:.3g}, {nan} NaN)"
        return None
