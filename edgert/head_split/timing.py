"""Timing harness: warm-up + median of N `time.perf_counter()` samples, variance recorded."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Timing:
    """median / mean in ms, variance in ms^2, and the samples (ms)."""

    median: float
    mean: float
    var: float
    samples: tuple[float, ...]

    @classmethod
    def of(cls, samples_ms: list[float]) -> Timing:
        s = tuple(float(x) for x in samples_ms)
        var = statistics.variance(s) if len(s) > 1 else 0.0
        return cls(statistics.median(s), statistics.fmean(s), var, s)

    def as_dict(self) -> dict[str, Any]:
        return {"median_ms": self.median, "mean_ms": self.mean, "var_ms2": self.var,
                "n": len(self.samples)}


def time_fn(fn: Callable[[], Any], *, warmup: int = 2, n: int = 7) -> Timing:
    """Run fn `warmup` times untimed, then n timed runs."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return Timing.of(out)
