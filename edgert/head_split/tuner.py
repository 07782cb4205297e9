"""The head-split tuner: cached search of the split point over measurement callables.

A cached choice is reused without measuring; `retune=True` measures again. The callables give the
ms of n heads on each backend and the serial copy cost of a split (see edgert/head_split/space.py
[Note: head-split cost model]); edgert/head_split/executor.py passes the board's measurements, unit
tests pass fake cost functions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgert.errors import ConfigError
from edgert.head_split.cache import CacheKey, SplitCache
from edgert.head_split.space import HeadSplit, search_crossing

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TuneResult:
    """The chosen split, its modelled cost, whether it came from the cache, what was measured."""

    split: HeadSplit
    cost_ms: float
    from_cache: bool
    n_measured: int                  # backend/copy measurements this call made (0 from cache)
    record: dict[str, Any] = field(default_factory=dict)


class _Memo:
    """Memoised measurement callable that remembers what it measured."""

    def __init__(self, fn: Callable[[int], float]):
        self.fn, self.seen = fn, {}

    def __call__(self, n: int) -> float:
        if n not in self.seen:
            self.seen[n] = float(self.fn(n))
        return self.seen[n]


def tune_head_split(n_heads: int, cost_a: Callable[[int], float], cost_b: Callable[[int], float],
                    copy: Callable[[int], float], *, cache: SplitCache, key: CacheKey,
                    retune: bool = False) -> TuneResult:
    """Split point for the two backends of `key.backends` (heads [0, k) on the first).

    cost_a(n) / cost_b(n): ms for n heads on backend A / B; copy(k): serial copy + dispatch ms of
    split k. Cached under `key`; see edgert/head_split/space.py [Note: head-split cost model].
    """
    if len(key.backends) != 2:
        raise ConfigError(f"the head-split tuner splits over 2 backends, key has {key.backends}")
    rec = cache.get(key, retune=retune)
    if rec is not None:
        split = HeadSplit.from_dict(rec["split"])
        log.info("head split %s from cache %s (%.3f ms)", split, cache.path, rec["cost_ms"])
        return TuneResult(split, float(rec["cost_ms"]), True, 0, rec)
    a, b, c = _Memo(cost_a), _Memo(cost_b), _Memo(copy)
    res = search_crossing(n_heads, a, b, c, backends=key.backends)
    rec = {"split": res.split.as_dict(), "k": res.split.k, "cost_ms": res.cost,
           "evaluated": list(res.evaluated), "tuned_at": time.time(),
           "measured": {name: {str(n): v for n, v in sorted(m.seen.items())}
                        for name, m in (("a", a), ("b", b), ("copy", c))}}
    cache.put(key, rec)
    n = len(a.seen) + len(b.seen) + len(c.seen)
    log.info("head split %s tuned: %.3f ms, %d measurements", res.split, res.cost, n)
    return TuneResult(res.split, res.cost, False, n, rec)
