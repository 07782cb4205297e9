"""A dependency-free progress bar on stderr, and the event subscriber that drives it."""

from __future__ import annotations

import sys
import time

from control.events import Event


class Progress:
    """One line on stderr, rewritten in a terminal (every tenth of the way otherwise)."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.n, self.t0 = total, label, 0, time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, note: str = "") -> None:
        self.n += 1
        el = time.perf_counter() - self.t0
        eta = el / self.n * (self.total - self.n)
        w = 24
        fill = int(w * self.n / max(1, self.total))
        line = (f"  {self.label} [{'#' * fill}{'.' * (w - fill)}] {self.n}/{self.total} "
                f"{el:.0f}s<{eta:.0f}s {note}")
        if self.tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        elif self.n == self.total or self.n % max(1, self.total // 10) == 0:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)


class StepBar:
    """Subscribe to a loop's events: the bar starts when training does and shows each step's
    loss; it closes when the loop finishes or stops."""

    def __init__(self, total: int, label: str = "train") -> None:
        self.total, self.label = total, label
        self.bar: Progress | None = None

    def __call__(self, ev: Event) -> None:
        d = ev.data
        if ev.kind == "state" and d.get("state") == "running" and self.bar is None:
            self.bar = Progress(self.total, self.label)
        elif ev.kind == "step" and self.bar is not None:
            self.bar.n = int(d["step"]) - 1
            self.bar.update(f"loss {d['loss']:.4f}")
        elif ev.kind == "state" and d.get("state") in ("finished", "stopped", "failed"):
            if self.bar is not None:
                self.bar.close()
