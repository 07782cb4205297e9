"""Head-split search space and search (pure, stdlib only): which backend runs which attention heads.

[Note: head-split cost model]
An attention layer of H heads runs heads [0, k) on backend A and [k, H) on backend B at the same
time; the caller gathers each part's q|k|v columns, and afterwards concatenates ctx and scatters
dqkv back. Its time is modelled as

    split_cost(k) = max(cost_a(k), cost_b(H - k)) + copy(k)    cost_x(0) = 0, copy(0) = copy(H) = 0

cost_x(n): fwd+bwd time of n heads alone on backend x (measured on the board, ms), non-decreasing
in n. copy(k): everything that is serial around the concurrent part: the gathers, the scatters and
the dispatch to both backends (on a CPU+GPU board the host<->device copies of B's heads; here the
parent's numpy copies plus the pipe round trip). k = 0 and k = H run one unsplit kernel and copy
nothing. As cost_a(k) rises and cost_b(H - k) falls with k, max(..) is smallest where the two
curves cross, so `search_crossing` binary-searches the crossing (O(log H) measurements per backend
instead of H) and then compares the neighbours of the crossing and both single backends in full.

Candidate order (the tie-break of `select`): fewer backends first, then more heads on earlier
backends: for two backends [A=H], [B=H], then k = H-1, ..., 1 heads on A.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from edgert.errors import ConfigError

Cost = Callable[[int], float]   # heads -> ms


@dataclass(frozen=True, slots=True)
class HeadSplit:
    """How many heads each backend runs; backend i runs the contiguous heads after backend i-1's.

    counts: ((backend, n_heads), ...) in head order, e.g. (("cpu0", 5), ("cpu1", 7)) runs heads
    [0, 5) on cpu0 and [5, 12) on cpu1.
    """

    counts: tuple[tuple[str, int], ...]

    def __post_init__(self) -> None:
        names = [b for b, _ in self.counts]
        if not names or len(set(names)) != len(names) or any(n < 0 for _, n in self.counts):
            raise ConfigError(f"bad head split {self.counts}: need distinct backends and "
                              f"non-negative head counts")

    @classmethod
    def of(cls, backends: Sequence[str], counts: Sequence[int]) -> HeadSplit:
        return cls(tuple(zip(backends, (int(c) for c in counts), strict=True)))

    @classmethod
    def from_dict(cls, d: Mapping[str, int]) -> HeadSplit:
        return cls(tuple((str(b), int(n)) for b, n in d.items()))

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)

    @property
    def n_heads(self) -> int:
        return sum(n for _, n in self.counts)

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(b for b, _ in self.counts)

    @property
    def k(self) -> int:
        """Heads on the first backend (the split point of a two-backend split)."""
        return self.counts[0][1]

    def ranges(self) -> dict[str, tuple[int, int]]:
        """backend -> (h0, h1) head range; empty ranges (h0 == h1) for unused backends."""
        out, h = {}, 0
        for b, n in self.counts:
            out[b] = (h, h + n)
            h += n
        return out

    def __str__(self) -> str:
        return " | ".join(f"{b}:[{h0},{h1})" for b, (h0, h1) in self.ranges().items())


def candidates(n_heads: int, backends: Sequence[str]) -> list[HeadSplit]:
    """Every split of n_heads over the backends, in tie-break order (see module docstring)."""
    if n_heads < 1 or not backends:
        raise ConfigError(f"need n_heads >= 1 and at least one backend, got {n_heads}, {backends}")
    nb = len(backends)
    comps = [c for c in itertools.product(range(n_heads + 1), repeat=nb) if sum(c) == n_heads]
    comps.sort(key=lambda c: (sum(1 for x in c if x), tuple(-x for x in c)))
    return [HeadSplit.of(backends, c) for c in comps]


def split_cost(k: int, n_heads: int, cost_a: Cost, cost_b: Cost, copy: Cost) -> float:
    """Modelled layer time, heads [0, k) on A and [k, H) on B. See [Note: head-split cost model]."""
    if not 0 <= k <= n_heads:
        raise ConfigError(f"split point {k} outside [0, {n_heads}]")
    a = cost_a(k) if k > 0 else 0.0
    b = cost_b(n_heads - k) if k < n_heads else 0.0
    return max(a, b) + (copy(k) if 0 < k < n_heads else 0.0)


@dataclass(frozen=True, slots=True)
class SearchResult:
    """The chosen two-backend split, its modelled cost (ms), the split points evaluated in full."""

    split: HeadSplit
    cost: float
    evaluated: tuple[int, ...]


def _best(ks: Iterable[int], n_heads: int, backends: Sequence[str], cost_a: Cost, cost_b: Cost,
          copy: Cost) -> SearchResult:
    ks = sorted(set(ks))
    costs = {HeadSplit.of(backends, (k, n_heads - k)): split_cost(k, n_heads, cost_a, cost_b, copy)
             for k in ks}
    split = select(costs)
    return SearchResult(split, costs[split], tuple(ks))


def exhaustive(n_heads: int, cost_a: Cost, cost_b: Cost, copy: Cost,
               backends: Sequence[str] = ("a", "b")) -> SearchResult:
    """Every split point 0..H (H + 1 model evaluations, 2H backend measurements)."""
    return _best(range(n_heads + 1), n_heads, backends, cost_a, cost_b, copy)


def search_crossing(n_heads: int, cost_a: Cost, cost_b: Cost, copy: Cost,
                    backends: Sequence[str] = ("a", "b")) -> SearchResult:
    """Binary search for the smallest k with cost_a(k) >= cost_b(H - k), then the best of
    {k-1, k, k+1} and both single backends by the full model (copy included)."""
    lo, hi = 1, n_heads   # f(k) = cost_a(k) - cost_b(H-k); f(H) = cost_a(H) - 0 >= 0 always
    while lo < hi:
        mid = (lo + hi) // 2
        if cost_a(mid) >= cost_b(n_heads - mid):
            hi = mid
        else:
            lo = mid + 1
    ks = [k for k in (lo - 1, lo, lo + 1) if 0 <= k <= n_heads] + [0, n_heads]
    return _best(ks, n_heads, backends, cost_a, cost_b, copy)


def select(measurements: Mapping[HeadSplit, float] | Iterable[tuple[HeadSplit, float]]
           ) -> HeadSplit:
    """The cheapest split; equal costs go to the earlier candidate (NaN counts as infinite)."""
    items = list(measurements.items() if isinstance(measurements, Mapping) else measurements)
    if not items:
        raise ConfigError("no measurements to select a head split from")
    first = items[0][0]
    order = {s: i for i, s in enumerate(candidates(first.n_heads, first.backends))}
    if any(s not in order for s, _ in items):
        raise ConfigError("measurements mix head splits of different head counts or backends")

    def rank(item: tuple[HeadSplit, float]) -> tuple[float, int]:
        cost = item[1]
        return (math.inf if math.isnan(cost) else cost, order[item[0]])

    return min(items, key=rank)[0]
