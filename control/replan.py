"""Re-partitioning on speed drift: when to re-plan a running pipeline, and onto which split (pure).

[Note: speed drift]
After every step each stage board reports the seconds it spent computing that step (forward,
backward and AdamW of its M micro-batches; `edgert/board.py` STATS `compute_s`). The current plan
predicts that time (`StagePlan.ms * M`, from `control.partition` with the boards' current speed
estimates). Their ratio r_k = measured / predicted absorbs the cost model's calibration error,
which is shared by every board, so drift is *relative*: d_k = r_k / min_j r_j (1.0 = as planned
relative to the fastest board). A board drifts when d_k >= `drift` (slower than planned) or
d_k <= 1 / `drift` (faster, e.g. its owner stopped using it) on `patience` consecutive measured
steps. The first step after a deploy is not measured (first-call warm-up on the boards).

Then every stage board's speed estimate becomes speed_b / r_k (the median r_k over the patience
window): absolute speeds, so the plan also sees a board that got faster. The planner runs over the
same boards with those speeds; the move happens only if the new split's predicted bottleneck beats
the current split's (evaluated with the same new speeds) by `margin`. Hysteresis against
flapping: the drift must persist `patience` steps, the new plan must win by `margin`, and after a
decision (moved or not) the counters restart and nothing is measured for `cooldown` steps.

Examples
--------
>>> from control.partition import BoardSpec
>>> d = Drift(drift=1.5, patience=2)
>>> w = Watch(d)
>>> w.observe([0.10, 0.10], [0.10, 0.10])       # as planned
>>> w.observe([0.10, 0.40], [0.10, 0.10])       # board 1 four times slower than planned
>>> w.observe([0.10, 0.40], [0.10, 0.10]) is not None
True
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from control.partition import HOST_GFLOPS, HOST_MEM_GBPS, BoardSpec, ModelCosts, PartitionPlan
from control.partition import evaluate as evaluate_plan
from control.partition import plan as make_plan
from edgert.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Drift:
    """Thresholds of re-partitioning (see [Note: speed drift]).

    drift: a stage board's relative slowdown (or 1/speed-up) that counts as drift (> 1; 0 = off)
    patience: consecutive measured steps of drift before a re-plan is considered
    margin: the new split's predicted bottleneck must be below (1 - margin) x the current one's
    cooldown: measured steps ignored after a decision (besides the warm-up step after a deploy)
    """

    drift: float = 1.5
    patience: int = 3
    margin: float = 0.1
    cooldown: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.drift, int | float) or not (self.drift == 0 or self.drift > 1):
            raise ConfigError(f"replan_drift must be 0 (off) or a factor > 1 such as 1.5, got "
                              f"{self.drift!r}")
        if type(self.patience) is not int or self.patience < 1:
            raise ConfigError(f"replan_patience must be an integer >= 1, got {self.patience!r}")
        if not 0 <= self.margin < 1:
            raise ConfigError(f"replan margin must be in [0, 1), got {self.margin!r}")
        if type(self.cooldown) is not int or self.cooldown < 0:
            raise ConfigError(f"replan cooldown must be an integer >= 0, got {self.cooldown!r}")

    @property
    def on(self) -> bool:
        return self.drift > 0


def ratios(measured_s: Sequence[float], predicted_s: Sequence[float]) -> list[float]:
    """r_k = measured / predicted compute seconds of each stage."""
    if len(measured_s) != len(predicted_s) or not measured_s:
        raise ConfigError(f"{len(measured_s)} measured stage times for {len(predicted_s)} "
                          f"predicted ones")
    if min(predicted_s) <= 0 or min(measured_s) <= 0:
        raise ConfigError(f"stage times must be > 0: measured {list(measured_s)}, predicted "
                          f"{list(predicted_s)}")
    return [m / p for m, p in zip(measured_s, predicted_s, strict=True)]


def relative_drift(r: Sequence[float]) -> list[float]:
    """d_k = r_k / min_j r_j: how much slower than planned, relative to the fastest stage."""
    lo = min(r)
    return [x / lo for x in r]


def drifting(d: Sequence[float], drift: float) -> list[int]:
    """Stages whose relative drift is past the threshold, either way."""
    return [k for k, x in enumerate(d) if x >= drift or x <= 1 / drift]


@dataclass
class Watch:
    """Per-step drift detector with hysteresis: `observe` returns the median r per stage over the
    patience window once drift persisted `patience` measured steps, else None."""

    cfg: Drift
    skip: int = 1                       # steps not to measure (warm-up after a deploy)
    window: list[list[float]] = field(default_factory=list)

    def observe(self, measured_s: Sequence[float], predicted_s: Sequence[float]
                ) -> list[float] | None:
        if not self.cfg.on:
            return None
        if self.skip > 0:
            self.skip -= 1
            return None
        r = ratios(measured_s, predicted_s)
        if not drifting(relative_drift(r), self.cfg.drift):
            self.window.clear()         # consecutive steps only
            return None
        self.window.append(r)
        if len(self.window) < self.cfg.patience:
            return None
        return [statistics.median(col) for col in zip(*self.window, strict=True)]

    def reset(self, deployed: bool, decided: bool) -> None:
        """Restart: skip the warm-up step after a deploy, and `cooldown` steps after a decision."""
        self.window.clear()
        self.skip = (1 if deployed else 0) + (self.cfg.cooldown if decided else 0)


def with_speed(board: BoardSpec, speed: float) -> BoardSpec:
    """`board` running at `speed` x the host's modelled speed (compute and memory traffic)."""
    return replace(board, gflops=HOST_GFLOPS * speed, mem_gbps=HOST_MEM_GBPS * speed)


def predicted_step_s(p: PartitionPlan) -> list[float]:
    """Seconds of compute per optimizer step on each stage: M micro-batches of fwd + bwd (the
    AdamW traffic is already spread over them in the cost model)."""
    return [s.ms * p.n_micro / 1e3 for s in p.stages]


@dataclass(frozen=True)
class Decision:
    """What `decide` concluded: new speeds, both plans (with those speeds), whether to move."""

    speeds: dict[str, float]
    current: PartitionPlan
    proposed: PartitionPlan
    move: bool
    why: str


def decide(costs: ModelCosts, boards: Sequence[BoardSpec], speeds: dict[str, float],
           ranges: Sequence[tuple[int, int]], r: Sequence[float], n_micro: int,
           margin: float) -> Decision:
    """Re-plan stage boards `boards` (pipeline order, one per range) whose current speed estimates
    are `speeds` and whose measured/predicted ratios are `r`; move if the new split's bottleneck
    beats the current split's by `margin` (both with the new speeds)."""
    new = {b.name: speeds.get(b.name, 1.0) / x for b, x in zip(boards, r, strict=True)}
    fast = [with_speed(b, new[b.name]) for b in boards]
    cur = evaluate_plan(costs, fast, list(ranges), n_micro)
    prop = make_plan(costs, fast, n_micro)
    gain = 1 - prop.bottleneck_ms / cur.bottleneck_ms
    move = prop.ranges != [tuple(x) for x in ranges] and gain > margin
    speeds_txt = ", ".join(f"{n} {s:.2f}x" for n, s in new.items())
    why = (f"measured speeds {speeds_txt}: split {cur.to_split()} bottleneck "
           f"{cur.bottleneck_ms:.1f} ms, re-planned {prop.to_split()} {prop.bottleneck_ms:.1f} ms "
           f"({gain:+.0%}; margin {margin:.0%})")
    return Decision(new, cur, prop, move, why)


class Planner:
    """A run's planner: the memory-aware split over named boards at their measured speeds
    (control.partition.plan), and the drift watch that says when to re-plan a running pipeline.

    Examples
    --------
    >>> from compiler.model_spec import ModelDims
    >>> from control.partition import bert_costs
    >>> dims = ModelDims(vocab=30522, hidden=384, layers=6, heads=12, ffn=1536, max_pos=512,
    ...                  type_vocab=2, eps=1e-12, hidden_dropout=0.1, attn_dropout=0.1,
    ...                  num_labels=2)
    >>> p = Planner(bert_costs(dims, 8, 64), None, 2, Drift(0))
    >>> p.plan_over(["board0", "board1"]).ranges
    [(0, 3), (3, 6)]
    """

    def __init__(self, costs: ModelCosts, budget_bytes: int | None, micro_batches: int,
                 drift: Drift) -> None:
        self.costs, self.budget_bytes, self.micro_batches = costs, budget_bytes, micro_batches
        self.watch = Watch(drift)
        self.speeds: dict[str, float] = {}      # measured speed per board (1.0 = as modelled)

    def boards(self, names: Sequence[str]) -> list[BoardSpec]:
        """Planner boards for `names` with the budget and the measured speed estimates."""
        return [with_speed(BoardSpec(n, self.budget_bytes), self.speeds.get(n, 1.0)) for n in names]

    def plan_over(self, names: Sequence[str]) -> PartitionPlan:
        """The split over these boards (one stage each)."""
        return make_plan(self.costs, self.boards(names), self.micro_batches)

    def watching(self, n_stages: int) -> bool:
        """Whether `observe` needs this step's measured stage times."""
        return self.watch.cfg.on and n_stages >= 2

    def observe(self, names: Sequence[str], ranges: Sequence[tuple[int, int]],
                measured_s: Sequence[float]) -> Decision | None:
        """Fold in one step's measured compute seconds per stage board; a Decision once drift
        persisted (its `move` says whether a better split exists), else None."""
        boards = self.boards(names)
        current = evaluate_plan(self.costs, boards, list(ranges), self.micro_batches)
        r = self.watch.observe(measured_s, predicted_step_s(current))
        if r is None:
            return None
        d = decide(self.costs, boards, self.speeds, ranges, r, self.micro_batches,
                   self.watch.cfg.margin)
        self.speeds.update(d.speeds)
        if not d.move:
            self.watch.reset(deployed=False, decided=True)
        return d
