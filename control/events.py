"""Run events: the one schema between a training run and whatever watches it (pure, stdlib only).

A run (control/run.py) publishes `Event`s to an `EventLog`; the dashboard (control/dashboard.py),
the CLI's progress line and the run directory's `events.jsonl` all read the same stream. Every
event is a kind plus a flat dict of plain JSON values, so it can be written to disk, sent over a
socket or replayed into a dashboard after the fact.

Kinds and their fields (all optional fields may be absent):

    state       state: "starting"|"running"|"paused"|"stopping"|"stopped"|"finished"|"failed",
                step, note, total_steps (the run's target; the dashboard's ETA uses it)
    plan        ranges: [[lo, hi], ...] layers per stage, boards: [name, ...], mode, micro_batches,
                reason (why this plan: "start" | "board lost" | "re-plan" | "resume"),
                speeds (measured relative speed per board, when re-planned from measurements)
    step        step, loss, step_s, seq_per_s, lr
    eval        step, loss, accuracy, examples
    board       name, stage, rss_mib, peak_rss_mib, budget_mib, compute_s, wait_s, queue,
                errors, alive, head_split ({layer: heads on the board's second backend}, i.e.
                H - k for split point k, from its STATS; None or absent for unsplit bundles;
                docs/head_split.md)
    timeline    step, rows: [{board, stage, mb, op ("F"|"B"|"U"), t0, t1}, ...]  (seconds from
                the step's start; what ran where)
    checkpoint  step, path, seconds
    alert       level: "info"|"warning"|"error", text

Examples
--------
>>> log = EventLog()
>>> seen = []
>>> log.subscribe(seen.append)
>>> _ = log.emit("step", step=1, loss=0.69)
>>> seen[0].kind, seen[0].data["loss"]
('step', 0.69)
>>> [e.data["step"] for e in log.of("step")]
[1]
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KINDS = ("state", "plan", "step", "eval", "board", "timeline", "checkpoint", "alert")


@dataclass(frozen=True)
class Event:
    kind: str
    data: dict[str, Any]
    t: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "t": self.t, **self.data}, default=_plain)

    @staticmethod
    def from_json(line: str) -> Event:
        d = json.loads(line)
        kind, t = d.pop("kind"), d.pop("t", 0.0)
        return Event(kind, d, t)


def _plain(x: Any) -> Any:
    """numpy scalars and arrays, Paths -> JSON values."""
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


class EventLog:
    """Thread-safe, append-only event stream with subscribers and an optional JSONL file.

    Subscribers are called synchronously in the emitting thread; one that raises is dropped
    (a broken dashboard must not stop a training run).
    """

    def __init__(self, path: Path | str | None = None, keep: int = 100_000) -> None:
        self._lock = threading.Lock()
        self._events: list[Event] = []
        self._subs: list[Callable[[Event], None]] = []
        self._keep = keep
        self.path = Path(path) if path is not None else None

    def emit(self, kind: str, **data: Any) -> Event:
        if kind not in KINDS:
            raise ValueError(f"unknown event kind {kind!r}; known: {', '.join(KINDS)}")
        ev = Event(kind, data)
        with self._lock:
            self._events.append(ev)
            if len(self._events) > self._keep:
                del self._events[: len(self._events) - self._keep]
            subs = list(self._subs)
            if self.path is not None:
                with open(self.path, "a") as f:
                    f.write(ev.to_json() + "\n")
        for s in subs:
            try:
                s(ev)
            except Exception:  # noqa: BLE001 - see the class docstring
                with self._lock:
                    if s in self._subs:
                        self._subs.remove(s)
        return ev

    def subscribe(self, fn: Callable[[Event], None], replay: bool = False) -> None:
        """Call `fn(event)` for every future event (and, with `replay`, the past ones first)."""
        with self._lock:
            past = list(self._events) if replay else []
            self._subs.append(fn)
        for ev in past:
            fn(ev)

    def unsubscribe(self, fn: Callable[[Event], None]) -> None:
        with self._lock:
            if fn in self._subs:
                self._subs.remove(fn)

    def events(self) -> list[Event]:
        with self._lock:
            return list(self._events)

    def of(self, kind: str) -> list[Event]:
        return [e for e in self.events() if e.kind == kind]

    def last(self, kind: str) -> Event | None:
        with self._lock:
            for e in reversed(self._events):
                if e.kind == kind:
                    return e
        return None

    @staticmethod
    def read(path: Path | str) -> list[Event]:
        """Events from a run directory's events.jsonl (a torn last line is ignored)."""
        out = []
        for line in Path(path).read_text().splitlines():
            try:
                out.append(Event.from_json(line))
            except (json.JSONDecodeError, KeyError):
                continue
        return out

    @classmethod
    def replay(cls, events: Iterable[Event]) -> EventLog:
        log = cls()
        with log._lock:
            log._events.extend(events)
        return log
