"""The dashboard's state: run events (control/events.py) folded into plain data (pure, stdlib).

`reduce(state, event)` applies one event; `DashState.from_events(events)` replays a whole stream
(e.g. a run directory's events.jsonl). The widgets (control/dashboard.py) only render a DashState,
so everything a user sees is unit-testable without a kernel, a widget or a board.

Besides the explicit `alert` events, the fold derives alerts a person should not miss: a plan whose
reason is not "start" (re-planned, board lost, resumed), a board that stops answering
(`alive` false), and a run that continues after a pause.

Examples
--------
>>> from control.events import Event
>>> s = DashState()
>>> s = reduce(s, Event("state", {"state": "running", "step": 0, "total_steps": 10}, t=100.0))
>>> s = reduce(s, Event("step", {"step": 1, "loss": 0.69, "step_s": 0.5}, t=101.0))
>>> s.state, s.step, s.total_steps, s.losses
('running', 1, 10, [0.69])
>>> s.eta_s()                     # 9 steps left x 0.5 s
4.5
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from control.events import Event

# A board is drawn red (and an alert raised) above this share of its memory budget.
MEMORY_WARN = 0.9


@dataclass
class BoardView:
    """The latest telemetry of one board (fields of the `board` event)."""

    name: str
    stage: int | None = None
    rss_mib: float | None = None
    peak_rss_mib: float | None = None
    budget_mib: float | None = None
    compute_s: float | None = None
    wait_s: float | None = None
    queue: int | None = None
    errors: int = 0
    alive: bool = True
    head_split: dict[str, int] | None = None

    @property
    def use(self) -> float | None:
        """max(rss, peak) / budget, None without a budget or a measurement."""
        m = max(self.rss_mib or 0.0, self.peak_rss_mib or 0.0)
        return m / self.budget_mib if self.budget_mib and m else None


@dataclass
class Alert:
    t: float
    level: str          # "info" | "warning" | "error"
    text: str
    step: int | None = None


@dataclass
class DashState:
    """Everything the dashboard shows, folded from events."""

    state: str = "waiting"
    note: str = ""
    step: int = 0
    total_steps: int | None = None
    t_start: float | None = None        # wall-clock s of the first event
    t_last: float | None = None         # of the latest event
    t_end: float | None = None          # when the run stopped / finished / failed
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    step_s: list[float | None] = field(default_factory=list)
    seq_per_s: list[float | None] = field(default_factory=list)
    lr: float | None = None
    evals: list[dict[str, Any]] = field(default_factory=list)   # step, loss, accuracy, examples
    boards: dict[str, BoardView] = field(default_factory=dict)  # in first-seen order
    plan: dict[str, Any] | None = None
    plans: int = 0
    timeline: dict[str, Any] | None = None   # the latest `timeline` event's data
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    events: int = 0

    @classmethod
    def from_events(cls, events: Iterable[Event]) -> DashState:
        s = cls()
        for ev in events:
            reduce(s, ev)
        return s

    # ---- derived values -------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.state in ("starting", "running", "stopping")

    def elapsed_s(self, now: float | None = None) -> float:
        """Wall-clock seconds since the first event (up to `now` while running)."""
        if self.t_start is None:
            return 0.0
        end = self.t_end if self.t_end is not None else (
            now if now is not None and self.running else self.t_last)
        return max(0.0, (end or self.t_start) - self.t_start)

    def mean_step_s(self, last: int = 20) -> float | None:
        xs = [x for x in self.step_s[-last:] if x is not None and math.isfinite(x)]
        return statistics.fmean(xs) if xs else None

    def eta_s(self, now: float | None = None) -> float | None:
        """Remaining steps x the mean of the last 20 step times (else of elapsed / steps)."""
        if self.total_steps is None or not self.steps:
            return None
        left = max(0, self.total_steps - self.step)
        per = self.mean_step_s()
        if per is None:
            per = self.elapsed_s(now) / max(1, len(self.steps))
        return left * per

    def throughput(self) -> float | None:
        xs = [x for x in self.seq_per_s[-20:] if x is not None and math.isfinite(x)]
        return statistics.median(xs) if xs else None

    def _alert(self, t: float, level: str, text: str) -> None:
        if not any(a.text == text for a in self.alerts[-20:]):
            self.alerts.append(Alert(t, level, text, self.step))


def _f(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def reduce(s: DashState, ev: Event) -> DashState:
    """Fold one event into `s` (in place, for speed on long runs) and return it."""
    d = ev.data
    s.events += 1
    if s.t_start is None:
        s.t_start = ev.t
    s.t_last = ev.t
    handler = _HANDLERS.get(ev.kind)
    if handler is not None:
        handler(s, d, ev.t)
    return s


def _on_state(s: DashState, d: dict[str, Any], t: float) -> None:
    new = str(d.get("state", s.state))
    if new == "running" and s.state == "paused":
        s._alert(t, "info", f"resumed at step {d.get('step', s.step)}")
    if new == "paused":
        s._alert(t, "info", f"paused at step {d.get('step', s.step)}")
    if new == "failed":
        s._alert(t, "error", f"run failed: {d.get('note') or 'see the run log'}")
    s.state = new
    s.note = str(d.get("note") or "")
    if d.get("step") is not None:
        s.step = int(d["step"])
    if d.get("total_steps") is not None:
        s.total_steps = int(d["total_steps"])
    s.t_end = t if new in ("stopped", "finished", "failed") else None


def _on_plan(s: DashState, d: dict[str, Any], t: float) -> None:
    s.plans += 1
    reason = str(d.get("reason") or "start")
    split = ",".join(f"{a}:{b}" for a, b in d.get("ranges") or [])
    on = ", ".join(d.get("boards") or [])
    if reason == "resume":
        s._alert(t, "info", f"resumed from a checkpoint: split {split} on {on}")
    elif s.plans > 1 or reason != "start":
        s._alert(t, "warning" if reason == "board lost" else "info",
                 f"re-planned ({reason}): split {split} on {on}")
    s.plan = dict(d)
    if d.get("total_steps") is not None:
        s.total_steps = int(d["total_steps"])
    live = set(d.get("boards") or [])
    if live and s.boards:     # boards dropped from the plan no longer belong to the pipeline
        s.boards = {k: v for k, v in s.boards.items() if k in live or not v.alive}


def _on_step(s: DashState, d: dict[str, Any], t: float) -> None:
    step = int(d.get("step", s.step + 1))
    loss = _f(d.get("loss"))
    if s.steps and step <= s.steps[-1]:     # a resumed run repeats steps: keep the newest values
        keep = next(i for i, x in enumerate(s.steps) if x >= step)
        for lst in (s.steps, s.losses, s.step_s, s.seq_per_s):
            del lst[keep:]
    s.steps.append(step)
    s.losses.append(loss if loss is not None else math.nan)
    s.step_s.append(_f(d.get("step_s")))
    s.seq_per_s.append(_f(d.get("seq_per_s")))
    s.step = step
    if d.get("lr") is not None:
        s.lr = _f(d["lr"])
    if d.get("total_steps") is not None:
        s.total_steps = int(d["total_steps"])
    if s.state == "waiting":
        s.state = "running"


def _on_eval(s: DashState, d: dict[str, Any], t: float) -> None:
    s.evals = [e for e in s.evals if e["step"] != d.get("step", s.step)]
    s.evals.append({"step": int(d.get("step", s.step)), "loss": _f(d.get("loss")),
                    "accuracy": _f(d.get("accuracy")), "examples": d.get("examples")})
    s.evals.sort(key=lambda e: e["step"])


def _on_board(s: DashState, d: dict[str, Any], t: float) -> None:
    name = str(d.get("name", "?"))
    b = s.boards.get(name) or BoardView(name)
    was_alive, was_use = b.alive, b.use
    for k in ("rss_mib", "peak_rss_mib", "budget_mib", "compute_s", "wait_s"):
        if k in d:
            setattr(b, k, _f(d[k]))
    for k in ("stage", "queue"):
        if d.get(k) is not None:
            setattr(b, k, int(d[k]))
    if "errors" in d:
        b.errors = int(d["errors"] or 0)
    if "alive" in d:
        b.alive = bool(d["alive"])
    if "head_split" in d:
        hs = d["head_split"]
        b.head_split = {str(k): int(v) for k, v in hs.items()} if hs else None
    s.boards[name] = b
    if was_alive and not b.alive:
        where = "" if b.stage is None else f" (stage {b.stage})"
        s._alert(t, "error", f"board {name} lost{where}")
    if not was_alive and b.alive:
        s._alert(t, "info", f"board {name} is back")
    use = b.use
    if use is not None and use > MEMORY_WARN and not (was_use and was_use > MEMORY_WARN):
        s._alert(t, "warning", f"board {name} uses {100 * use:.0f}% of its memory budget "
                               f"({b.budget_mib:.0f} MiB)")


def _on_timeline(s: DashState, d: dict[str, Any], t: float) -> None:
    s.timeline = dict(d)


def _on_checkpoint(s: DashState, d: dict[str, Any], t: float) -> None:
    s.checkpoints.append(dict(d))


def _on_alert(s: DashState, d: dict[str, Any], t: float) -> None:
    s._alert(t, str(d.get("level", "info")), str(d.get("text", "")))


_HANDLERS = {"state": _on_state, "plan": _on_plan, "step": _on_step, "eval": _on_eval,
             "board": _on_board, "timeline": _on_timeline, "checkpoint": _on_checkpoint,
             "alert": _on_alert}
