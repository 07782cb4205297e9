"""Stage planner: layer costs + board specs (control/costs.py) -> a `PartitionPlan` (pure: no TVM,
no sockets).

FTPipeHD's formulation (arXiv 2110.02781, `utils/scheduler.py: calculate_partition_point`; see
docs/partition.md) with a per-board memory constraint and an intra-board attention-head split:

    f[k][j] = min over i < j of  max( f[k-1][i],                      stages 0..k-1 on layers [0, i)
                                      link(k-1 -> k, activation of layer i-1),
                                      stage_time(board k, layers [i, j)) )
              over splits whose stage k fits board k's memory budget,

for boards in pipeline order k = 0..K-1 and layer prefixes j; O(L^2 K). The embeddings always go
with stage 0 and the pooler/classifier/loss head with stage K-1. A second pass over the same table
picks, among the splits with the optimal bottleneck, the one with the least total compute time.
`plan(..., objective="memory")` runs the same DP with the stage footprint as the term: it minimises
the largest stage's memory (ties: the least bottleneck), for boards too small for an even split.

    >>> from compiler.model_spec import ModelDims
    >>> dims = ModelDims(vocab=30522, hidden=384, layers=6, heads=12, ffn=1536, max_pos=512,
    ...                  type_vocab=2, eps=1e-12, hidden_dropout=0.1, attn_dropout=0.1,
    ...                  num_labels=2)
    >>> costs = bert_costs(dims, batch=8, seq=128)
    >>> slow = BoardSpec("b", 2 << 30, gflops=HOST_GFLOPS / 4)   # a quarter of the host's speed
    >>> p = plan(costs, [BoardSpec("a", 2 << 30), slow], n_micro=4)
    >>> p.to_split()
    '0:5,5:6'
    >>> print(p.explain())  # doctest: +SKIP

Memory per board is what `edgert.contract.estimate_footprint` charges a loaded stage: parameters x 4
(weights, gradients, Adam m and v) + (saved activations + forward outputs) x the micro-batches that
1F1B keeps in flight at that position, min(K - s, n_micro) (`edgert.schedule.one_f_one_b`).
"""

from __future__ import annotations

import html
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from control.costs import (
    HOST_GFLOPS,
    HOST_MEM_GBPS,
    MIB,
    BoardSpec,
    LayerCost,
    Links,
    ModelCosts,
    bert_costs,
    host_gflops,
    in_flight,
)
from edgert.errors import ConfigError

# The planner's inputs live in control/costs.py; they are re-exported here, where callers plan.
__all__ = ["HOST_GFLOPS", "HOST_MEM_GBPS", "MIB", "Board", "BoardSpec", "LayerCost", "Links",
           "ModelCosts", "PartitionPlan", "PlanError", "StagePlan", "bert_costs", "evaluate",
           "host_gflops", "in_flight", "plan"]



class PlanError(ConfigError):
    """No split fits the boards' memory budgets (the message gives the numbers and what to do)."""


# ---- the plan ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class StagePlan:
    board: str
    first: int
    last: int
    ms: float                 # fwd + bwd per micro-batch
    memory: int               # bytes, as estimate_footprint
    budget: int | None
    params: int
    saved_per_mb: int
    in_flight: int
    accel_heads: int = 0      # heads per layer on the board's second processor
    heads: int = 0
    why: str = ""

    @property
    def layers(self) -> int:
        return self.last - self.first


@dataclass(frozen=True)
class PartitionPlan:
    """Which board runs which layers, what that costs, and why (see `explain`)."""

    stages: tuple[StagePlan, ...]
    link_ms: tuple[float, ...]     # stage s -> s+1, activation + gradient
    n_micro: int
    schedule: str = "1f1b"
    what: str = ""
    notes: tuple[str, ...] = field(default=())

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return [(s.first, s.last) for s in self.stages]

    @property
    def boards(self) -> list[str]:
        return [s.board for s in self.stages]

    @property
    def bottleneck_ms(self) -> float:
        return max([s.ms for s in self.stages] + list(self.link_ms))

    @property
    def step_ms(self) -> float:
        """Estimated optimizer step of sync 1F1B with a flush: (M + K - 1) bottleneck slots."""
        return (self.n_micro + len(self.stages) - 1) * self.bottleneck_ms

    @property
    def feasible(self) -> bool:
        return all(s.budget is None or s.memory <= s.budget for s in self.stages)

    def binding(self) -> str:
        """The constraint that sets the pace."""
        b = self.bottleneck_ms
        for s, st in enumerate(self.stages):
            if math.isclose(st.ms, b, rel_tol=1e-9):
                return f"compute of stage {s} ({st.board})"
        for s, t in enumerate(self.link_ms):
            if math.isclose(t, b, rel_tol=1e-9):
                return f"link {self.stages[s].board} -> {self.stages[s + 1].board}"
        return "?"

    def to_split(self) -> str:
        """The `--split` string that compiler.model_spec.parse_split accepts."""
        return ",".join(f"{a}:{b}" for a, b in self.ranges)

    def _rows(self) -> list[list[str]]:
        rows = []
        for s, st in enumerate(self.stages):
            parts = (["emb"] if s == 0 else []) + [f"L{st.first}-{st.last - 1}"] \
                + (["head"] if s == len(self.stages) - 1 else [])
            budget = "-" if st.budget is None else f"{st.budget / MIB:.0f}"
            use = "" if st.budget is None else f" ({100 * st.memory / st.budget:.0f}%)"
            acc = f"{st.accel_heads}/{st.heads}" if st.accel_heads else "-"
            link = f"{self.link_ms[s]:.1f}" if s < len(self.link_ms) else "-"
            rows.append([str(s), st.board, " ".join(parts), f"{st.ms:.1f}", link,
                         f"{st.memory / MIB:.1f}{use}", budget, str(st.in_flight), acc, st.why])
        return rows

    _HEAD = ["stage", "board", "units", "ms/mb", "link ms", "MiB (of budget)", "budget MiB",
             "in flight", "accel heads", "why"]

    def summary(self) -> str:
        return (f"split {self.to_split()} over {', '.join(self.boards)}: bottleneck "
                f"{self.bottleneck_ms:.1f} ms per micro-batch ({self.binding()}); "
                f"~{self.step_ms:.0f} ms per step of {self.n_micro} micro-batches "
                f"({self.schedule})")

    def explain(self) -> str:
        rows = [self._HEAD, *self._rows()]
        w = [max(len(r[i]) for r in rows) for i in range(len(self._HEAD) - 1)]
        lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(r[:-1])) + "  " + r[-1]
                 for r in rows]
        head = [self.summary()] + ([self.what] if self.what else [])
        return "\n".join(head + lines + list(self.notes))

    def _repr_html_(self) -> str:
        e = html.escape
        th = "".join(f"<th>{e(h)}</th>" for h in self._HEAD)
        trs = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>"
                      for r in self._rows())
        notes = "".join(f"<br>{e(n)}" for n in self.notes)
        return (f"<div><b>{e(self.summary())}</b><table><tr>{th}</tr>{trs}</table>"
                f"<small>{e(self.what)}{notes}</small></div>")


# ---- evaluation and search -----------------------------------------------------------------------


class _Model:
    """Prefix sums for O(1) stage cost queries, for one pipeline order."""

    def __init__(self, costs: ModelCosts, boards: Sequence[BoardSpec], idx: Sequence[int],
                 n_micro: int, links: Links, schedule: str):
        self.costs, self.boards, self.idx, self.links = costs, boards, list(idx), links
        self.L, self.K, self.n_micro, self.schedule = costs.layers, len(idx), n_micro, schedule
        u = costs.units
        self.ms, self.heads = [], []
        for b in boards:
            ms, heads = b.unit_times(costs, n_micro)
            self.ms.append(ms)
            self.heads.append(heads)
        # layer prefix sums (layer l = unit l + 1)
        self.pms = [list(itertools.accumulate((m[1:-1]), initial=0.0)) for m in self.ms]
        self.pparams = list(itertools.accumulate((c.param_bytes for c in u[1:-1]), initial=0))
        self.psaved = list(itertools.accumulate((c.saved_bytes for c in u[1:-1]), initial=0))
        self.flight = [in_flight(k, self.K, n_micro, schedule) for k in range(self.K)]

    def stage_ms(self, k: int, i: int, j: int) -> float:
        m = self.ms[self.idx[k]]
        t = self.pms[self.idx[k]][j] - self.pms[self.idx[k]][i]
        return t + (m[0] if k == 0 else 0.0) + (m[-1] if k == self.K - 1 else 0.0)

    def stage_mem(self, k: int, i: int, j: int) -> tuple[int, int, int]:
        u = self.costs.units
        params = self.pparams[j] - self.pparams[i]
        saved = self.psaved[j] - self.psaved[i] + self.costs.stage_saved_bytes
        if k == 0:
            params, saved = params + u[0].param_bytes, saved + u[0].saved_bytes
        if k == self.K - 1:
            params, saved = params + u[-1].param_bytes, saved + u[-1].saved_bytes
            saved += u[-1].out_bytes
        else:
            saved += u[j].out_bytes      # layer j-1 = unit j
        return 4 * params + self.flight[k] * saved, params, saved

    def excess(self, k: int, i: int, j: int) -> float:
        budget = self.boards[self.idx[k]].budget_bytes
        return -math.inf if budget is None else self.stage_mem(k, i, j)[0] - budget

    def link_ms(self, k: int, i: int) -> float:
        """Link from stage k-1 (ending at layer i-1) to stage k."""
        return self.links.time_ms(self.idx[k - 1], self.idx[k], self.costs.units[i].out_bytes)

    def dp(self, term: Callable[[int, int, int], float], combine: Callable[[float, float], float],
           allowed: Callable[[int, int, int], bool]) -> tuple[float, list[int]]:
        """min over splits of combine-folded term(k, i, j); returns (value, bounds)."""
        L, K, inf = self.L, self.K, math.inf
        f = [[inf] * (L + 1) for _ in range(K)]
        arg = [[-1] * (L + 1) for _ in range(K)]
        for j in range(1, L - K + 2):
            if allowed(0, 0, j):
                f[0][j] = term(0, 0, j)
        for k in range(1, K):
            for j in range(k + 1, L - K + k + 2):
                best, bi = inf, -1
                for i in range(k, j):
                    if f[k - 1][i] == inf or not allowed(k, i, j):
                        continue
                    v = combine(f[k - 1][i], term(k, i, j))
                    if v < best:
                        best, bi = v, i
                f[k][j], arg[k][j] = best, bi
        if f[K - 1][L] == inf:
            return inf, []
        bounds, j = [L], L
        for k in range(K - 1, 0, -1):
            j = arg[k][j]
            bounds.append(j)
        bounds.append(0)
        return f[K - 1][L], bounds[::-1]

    def bottleneck_term(self, k: int, i: int, j: int) -> float:
        t = self.stage_ms(k, i, j)
        return t if k == 0 else max(t, self.link_ms(k, i))

    def fits(self, k: int, i: int, j: int) -> bool:
        return self.excess(k, i, j) <= 0

    def solve(self) -> tuple[float, list[int]]:
        best, _ = self.dp(self.bottleneck_term, max, self.fits)
        if best == math.inf:
            return best, []
        cap = best * (1 + 1e-9) + 1e-12

        def ok(k: int, i: int, j: int) -> bool:
            return self.fits(k, i, j) and self.bottleneck_term(k, i, j) <= cap

        _, bounds = self.dp(self.stage_ms, lambda a, b: a + b, ok)
        return best, bounds

    def mem_term(self, k: int, i: int, j: int) -> float:
        return float(self.stage_mem(k, i, j)[0])

    def solve_memory(self) -> tuple[float, list[int]]:
        """Least largest-stage footprint; among those splits, the least bottleneck."""
        best, _ = self.dp(self.mem_term, max, self.fits)
        if best == math.inf:
            return best, []
        cap = best * (1 + 1e-9) + 1e-12

        def ok(k: int, i: int, j: int) -> bool:
            return self.fits(k, i, j) and self.mem_term(k, i, j) <= cap

        return best, self.dp(self.bottleneck_term, max, ok)[1]

    def least_short(self) -> list[int]:
        """The split whose worst memory excess is smallest (for the error message)."""
        return self.dp(self.excess, max, lambda k, i, j: True)[1]


def _stage_why(m: _Model, bounds: list[int], k: int, bottleneck: float) -> str:
    i, j = bounds[k], bounds[k + 1]
    t = m.stage_ms(k, i, j)
    mem, _, _ = m.stage_mem(k, i, j)
    budget = m.boards[m.idx[k]].budget_bytes
    if budget is not None and mem > budget:
        return f"OVER budget by {(mem - budget) / MIB:.1f} MiB"
    if math.isclose(t, bottleneck, rel_tol=1e-9):
        reason = "bottleneck: sets the pace"
    else:
        reason = f"{bottleneck - t:.1f} ms slack"
    # What one more layer (from a neighbour) would do.
    grow = []   # what this stage would cost with one more layer, whatever its neighbours keep
    if k > 0:
        grow.append((i - 1, j))
    if k < m.K - 1:
        grow.append((i, j + 1))
    blocks = []
    for a, b in grow:
        gm = m.stage_mem(k, a, b)[0]
        gt = m.stage_ms(k, a, b)
        if budget is not None and gm > budget:
            blocks.append(f"{gm / MIB:.0f} MiB > budget")
        elif gt > bottleneck * (1 + 1e-9):
            blocks.append(f"{gt:.1f} ms > bottleneck")
    if blocks and not reason.startswith("bottleneck"):
        reason += "; one more layer: " + min(blocks, key=lambda s: "MiB" not in s)
    elif blocks and any("MiB" in s for s in blocks):
        reason += "; memory also binds"
    return reason


def evaluate(costs: ModelCosts, boards: Sequence[BoardSpec], ranges: Sequence[tuple[int, int]],
             n_micro: int, *, links: Links | None = None, schedule: str = "1f1b",
             order: Sequence[int | str] | None = None) -> PartitionPlan:
    """The plan of a given split (e.g. an even one, or a hand-written --split), feasible or not."""
    idx = _order(boards, order)
    if len(ranges) != len(idx):
        raise ConfigError(f"{len(ranges)} ranges for {len(idx)} boards")
    m = _Model(costs, boards, idx, n_micro, links or Links(), schedule)
    bounds = [r[0] for r in ranges] + [ranges[-1][1]]
    return _build(m, bounds, costs)


def _build(m: _Model, bounds: list[int], costs: ModelCosts,
           notes: tuple[str, ...] = ()) -> PartitionPlan:
    stages, links = [], []
    for k in range(m.K):
        i, j = bounds[k], bounds[k + 1]
        mem, params, saved = m.stage_mem(k, i, j)
        b = m.boards[m.idx[k]]
        acc = max(m.heads[m.idx[k]][1 + i:1 + j], default=0)
        stages.append(StagePlan(b.name, i, j, m.stage_ms(k, i, j), mem, b.budget_bytes, params,
                                saved, m.flight[k], acc, costs.units[1].heads if acc else 0))
        if k:
            links.append(m.link_ms(k, i))
    bn = max([s.ms for s in stages] + links)
    stages = [replace(s, why=_stage_why(m, bounds, k, bn)) for k, s in enumerate(stages)]
    return PartitionPlan(tuple(stages), tuple(links), m.n_micro, m.schedule, costs.what, notes)


def _order(boards: Sequence[BoardSpec], order: Sequence[int | str] | None) -> list[int]:
    if not boards:
        raise ConfigError("no boards to plan for")
    names = [b.name for b in boards]
    if len(set(names)) != len(names):
        raise ConfigError(f"board names must be unique: {names}")
    if order is None:
        return list(range(len(boards)))
    idx = [names.index(o) if isinstance(o, str) and o in names else o for o in order]
    ints = [i for i in idx if isinstance(i, int)]
    if len(ints) != len(idx) or sorted(ints) != list(range(len(boards))):
        raise ConfigError(f"order {list(order)} is not a permutation of the boards {names}")
    return idx  # type: ignore[return-value]


MAX_ORDER_SEARCH = 6


def plan(costs: ModelCosts, boards: Sequence[BoardSpec], n_micro: int, *,
         links: Links | None = None, order: Sequence[int | str] | None = None,
         search_order: bool = False, schedule: str = "1f1b",
         objective: str = "time") -> PartitionPlan:
    """Contiguous layer ranges, one per board, minimising the pipeline's bottleneck (or memory).

    Parameters
    ----------
    costs : ModelCosts
        From `bert_costs` (or measured units).
    boards : list of BoardSpec
        In pipeline order unless `order` or `search_order` says otherwise; each gets >= 1 layer.
    n_micro : int
        Micro-batches per optimizer step (sets how many are in flight on each stage).
    links : Links, optional
        Bandwidth and latency between boards (default: free).
    search_order : bool
        Also try every pipeline order of the boards (up to 6 boards) and keep the best.
    objective : {"time", "memory"}
        "time": least bottleneck (ties: least total compute). "memory": least footprint of the
        largest stage (ties: least bottleneck), for boards that cannot hold an even split; its
        stages are compute-unbalanced (stage 0 holds the embeddings, so it gets fewest layers).

    Raises
    ------
    PlanError
        If no split fits every budget: says which board is short by how much in the closest split.
    """
    links = links or Links()
    if objective not in ("time", "memory"):
        raise ConfigError(f"objective must be 'time' or 'memory', got {objective!r}")
    if n_micro < 1:
        raise ConfigError(f"n_micro must be >= 1, got {n_micro}")
    K, L = len(boards), costs.layers
    if K > L:
        raise ConfigError(f"{K} boards but only {L} layers: every stage needs a layer; use at most "
                          f"{L} boards")
    base = _order(boards, order)
    if search_order:
        if K > MAX_ORDER_SEARCH:
            raise ConfigError(f"search_order tries all K! orders; K = {K} > {MAX_ORDER_SEARCH}: "
                              f"pass an order instead")
        orders = [list(p) for p in itertools.permutations(base)]
    else:
        orders = [base]
    best: tuple[float, float, _Model, list[int]] | None = None
    for idx in orders:
        m = _Model(costs, boards, idx, n_micro, links, schedule)
        bn, bounds = m.solve() if objective == "time" else m.solve_memory()
        if not bounds:
            continue
        if objective == "time":
            total = sum(m.stage_ms(k, bounds[k], bounds[k + 1]) for k in range(K))
        else:    # bn is the largest stage's bytes; the tie-break is the bottleneck
            total = max(m.bottleneck_term(k, bounds[k], bounds[k + 1]) for k in range(K))
        if (best is None or bn < best[0] * (1 - 1e-9)
                or (bn <= best[0] * (1 + 1e-9) and total < best[1])):
            best = (bn, total, m, bounds)
    if best is None:
        m = _Model(costs, boards, base, n_micro, links, schedule)
        raise PlanError(_infeasible(m, m.least_short(), costs))
    _, _, m, bounds = best
    notes = []
    even = [(L * k // K, L * (k + 1) // K) for k in range(K)]
    if even != [(bounds[k], bounds[k + 1]) for k in range(K)]:
        ev = _build(_Model(costs, boards, m.idx, n_micro, links, schedule),
                    [a for a, _ in even] + [L], costs)
        fit = "" if ev.feasible else ", over budget on " + ", ".join(
            s.board for s in ev.stages if s.budget is not None and s.memory > s.budget)
        notes.append(f"even split {ev.to_split()}: bottleneck {ev.bottleneck_ms:.1f} ms, "
                     f"largest stage {max(s.memory for s in ev.stages) / MIB:.1f} MiB{fit}")
    return _build(m, bounds, costs, tuple(notes))


def _infeasible(m: _Model, bounds: list[int], costs: ModelCosts) -> str:
    p = _build(m, bounds, costs)
    short = [s for s in p.stages if s.budget is not None and s.memory > s.budget]
    lines = [f"no split of {costs.layers} layers over {m.K} boards fits every memory budget "
             f"({m.schedule}, {m.n_micro} micro-batches). Closest split {p.to_split()}:"]
    for s in short:
        budget = s.budget or 0
        lines.append(
            f"  {s.board} is short by {(s.memory - budget) / MIB:.1f} MiB: needs "
            f"{s.memory / MIB:.1f} MiB = 4 x {s.params / MIB:.1f} MiB parameters + {s.in_flight} "
            f"in flight x {s.saved_per_mb / MIB:.1f} MiB saved, budget {budget / MIB:.1f} MiB")
    lines.append("Raise those budgets, add a board, put a board with more memory first (stage 0 "
                 "holds the embeddings and the most in-flight micro-batches), or shrink the "
                 "micro-batch (batch x seq) or n_micro.")
    return "\n".join(lines)
