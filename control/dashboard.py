"""A live ipywidgets dashboard of a training run, fed by its EventLog (control/events.py).

Panels (each an inline SVG or HTML fragment rendered from a `DashState`, dashboard_state.py):
status line, loss curve (train per step + held-out), held-out accuracy, memory per board against its
budget, step time and throughput, the pipeline timeline (measured `timeline` events, else the plan's
1F1B schedule), head splits per board, and alerts. The `panels(state)` functions are pure, so
`snapshot_html()` works without a kernel and tests can assert on what a person would see.

Examples
--------
>>> from control.events import EventLog
>>> log = EventLog()
>>> dash = Dashboard(log)            # in a notebook cell: `dash` (or display(dash.widget))
>>> _ = log.emit("step", step=1, loss=0.69, step_s=0.4, seq_per_s=40.0)
>>> dash.refresh()                   # redraws happen by themselves, at most `fps` times a second
>>> "0.69" in dash.panel("status")
True
>>> html = dash.snapshot_html()      # a standalone page, e.g. for a report
>>> dash.close()
"""

from __future__ import annotations

import html
import threading
import time
from typing import Any

from control.dashboard_state import MEMORY_WARN, DashState, reduce
from control.events import Event, EventLog
from control.svg import PALETTE, RED, Bar, Series, Span, hbar_chart, lane_chart, line_chart

PANELS = ("status", "loss", "accuracy", "memory", "speed", "timeline", "heads", "alerts")
OP_COLORS = {"F": PALETTE[0], "B": PALETTE[1], "U": PALETTE[2]}
OP_NAMES = {"F": "forward", "B": "backward", "U": "update"}
W = 470     # px per chart; two charts per row


def _short(text: str, n: int = 160) -> str:
    """Escaped text cut to n characters; the whole text is in the tooltip."""
    if len(text) <= n:
        return html.escape(text)
    return (f'<span title="{html.escape(text, quote=True)}">{html.escape(text[:n].rstrip())}'
            f"…</span>")


def _dur(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


_STATE_COLORS = {"running": "#2ca02c", "paused": "#ff7f0e", "failed": RED, "finished": "#1f77b4",
                 "stopped": "#666", "stopping": "#666", "starting": "#9467bd", "waiting": "#999"}


def status_html(s: DashState, now: float | None = None) -> str:
    """One line: state, step/total, elapsed, ETA, latest losses, plan."""
    color = _STATE_COLORS.get(s.state, "#333")
    total = f"/{s.total_steps}" if s.total_steps else ""
    bits = [f"step <b>{s.step}{total}</b>", f"elapsed {_dur(s.elapsed_s(now))}"]
    if s.running or s.state == "paused":
        bits.append(f"ETA {_dur(s.eta_s(now))}")
    if s.losses:
        bits.append(f"train loss <b>{s.losses[-1]:.4f}</b>")
    if s.evals:
        e = s.evals[-1]
        acc = "-" if e["accuracy"] is None else f"{100 * e['accuracy']:.1f}%"
        bits.append(f"held-out accuracy <b>{acc}</b> (step {e['step']})")
    thr = s.throughput()
    if thr is not None:
        bits.append(f"{thr:.1f} seq/s")
    if s.plan:
        split = ",".join(f"{a}:{b}" for a, b in s.plan.get("ranges") or [])
        bits.append(f"split {split} ({s.plan.get('mode', 'sync')}, "
                    f"{s.plan.get('micro_batches', '?')} micro-batches)")
    if s.checkpoints:
        bits.append(f"checkpoint @ step {s.checkpoints[-1].get('step')}")
    note = f' <span style="color:#666">({_short(s.note)})</span>' if s.note else ""
    return (f'<div style="font:14px system-ui,sans-serif;padding:6px 8px;background:#f6f6f6;'
            f'border-left:6px solid {color}"><b style="color:{color};text-transform:uppercase">'
            f"{html.escape(s.state)}</b>{note} &nbsp;·&nbsp; " + " &nbsp;·&nbsp; ".join(bits)
            + "</div>")


def loss_svg(s: DashState) -> str:
    series = [Series("train", s.steps, s.losses)]
    if s.evals:
        series.append(Series("held-out", [e["step"] for e in s.evals],
                             [e["loss"] for e in s.evals], markers=True, dashed=True))
    return line_chart(series, title="Loss", xlabel="step", ylabel="cross-entropy", width=W)


def accuracy_svg(s: DashState) -> str:
    ev = [e for e in s.evals if e["accuracy"] is not None]
    return line_chart([Series("held-out", [e["step"] for e in ev],
                              [100 * e["accuracy"] for e in ev], color=PALETTE[2], markers=True)],
                      title="Held-out accuracy", xlabel="step", ylabel="%", width=W,
                      empty="no evaluation yet")


def memory_svg(s: DashState) -> str:
    bars = []
    for b in s.boards.values():
        if b.rss_mib is None and b.peak_rss_mib is None:
            continue
        label = b.name + ("" if b.stage is None else f" (stage {b.stage})")
        label += "" if b.alive else " LOST"
        peak = b.peak_rss_mib
        use = b.use
        note = (f"{b.rss_mib or 0:.0f} MiB, peak {peak or 0:.0f}"
                + (f" / {b.budget_mib:.0f} MiB budget ({100 * use:.0f}%)" if use is not None
                   else " MiB (no budget)"))
        bars.append(Bar(label, b.rss_mib or 0.0, peak, b.budget_mib, note,
                        color=None if b.alive else "#999"))
    return hbar_chart(bars, title="Memory per board: RSS (dark), peak (light), budget (|)",
                      xlabel="MiB", width=W, warn_at=MEMORY_WARN, empty="no board telemetry yet")


def speed_svg(s: DashState) -> str:
    ms = [None if x is None else 1e3 * x for x in s.step_s]
    thr = s.throughput()
    title = "Step time" + (f" (median throughput {thr:.1f} seq/s)" if thr is not None else "")
    return line_chart([Series("step time", s.steps, ms, color=PALETTE[3])], title=title,
                      xlabel="step", ylabel="ms", width=W, y_min=0.0)


def _plan_spans(plan: dict[str, Any]) -> tuple[list[Span], list[str], str]:
    from edgert.schedule import Op, one_f_one_b

    k, m = len(plan.get("ranges") or []), int(plan.get("micro_batches") or 1)
    names = list(plan.get("boards") or [f"stage {i}" for i in range(k)])
    if k == 0:
        return [], [], ""
    spans = []
    for st, line in one_f_one_b(k, m).items():
        for slot, a in enumerate(line):
            if a is not None and a.op in (Op.F, Op.B):
                spans.append(Span(st, slot, slot + 1, f"{a.op.value}{a.mb}",
                                  OP_COLORS[a.op.value], f"stage {st}: {a}"))
    return spans, names, f"slot of the planned 1F1B schedule ({m} micro-batches; not measured)"


def timeline_svg(s: DashState) -> str:
    """Measured rows of the latest `timeline` event, else the plan's schedule grid."""
    if s.timeline and s.timeline.get("rows"):
        rows = s.timeline["rows"]
        lanes: list[str] = []
        for r in sorted(rows, key=lambda r: (r.get("stage", 0), str(r.get("board")))):
            if str(r.get("board")) not in lanes:
                lanes.append(str(r.get("board")))
        spans = [Span(lanes.index(str(r.get("board"))), 1e3 * float(r["t0"]),
                      1e3 * float(r["t1"]), f"{r.get('op', '?')}{r.get('mb', '')}",
                      OP_COLORS.get(str(r.get("op")), "#999"),
                      f"{r.get('board')} stage {r.get('stage')}: {r.get('op')} micro-batch "
                      f"{r.get('mb')}, {1e3 * (float(r['t1']) - float(r['t0'])):.1f} ms")
                 for r in rows]
        xlabel = f"ms since the start of step {s.timeline.get('step', '?')} (measured)"
        title = f"Pipeline timeline, step {s.timeline.get('step', '?')}"
    elif s.plan:
        spans, lanes, xlabel = _plan_spans(s.plan)
        title = "Pipeline schedule (planned)"
    else:
        spans, lanes, xlabel, title = [], [], "", "Pipeline timeline"
    used = [o for o in ("F", "B", "U") if any(sp.color == OP_COLORS[o] for sp in spans)]
    return lane_chart(spans, lanes, title=title, xlabel=xlabel, width=W,
                      legend=[(OP_NAMES[o], OP_COLORS[o]) for o in used],
                      empty="no plan yet")


_TABLE = ('style="border-collapse:collapse;font:12px system-ui,sans-serif;width:100%"')
_CELL = 'style="border-bottom:1px solid #eee;padding:3px 6px;text-align:left"'


def heads_html(s: DashState) -> str:
    """Per board: attention heads per layer moved to its second processor."""
    rows = []
    for b in s.boards.values():
        if b.head_split:
            hs = ", ".join(f"L{k}: {v}" for k, v in sorted(b.head_split.items(),
                                                            key=lambda kv: int(kv[0])
                                                            if kv[0].isdigit() else 0))
        else:
            hs = '<span style="color:#999">not measured</span>'
        rows.append(f"<tr><td {_CELL}>{html.escape(b.name)}</td><td {_CELL}>{hs}</td></tr>")
    body = "".join(rows) or f'<tr><td {_CELL} style="color:#999">no board telemetry yet</td></tr>'
    return (f'<div style="font:600 13px system-ui,sans-serif;margin:4px 0">Head splits '
            f'<span style="font-weight:400;color:#666">(heads per layer on the second '
            f"processor)</span></div><table {_TABLE}>{body}</table>")


_LEVEL = {"error": (RED, "✖"), "warning": ("#d08000", "▲"), "info": ("#1f77b4", "●")}


def alerts_html(s: DashState, last: int = 12) -> str:
    items = []
    for a in reversed(s.alerts[-last:]):
        color, mark = _LEVEL.get(a.level, ("#333", "•"))
        when = time.strftime("%H:%M:%S", time.localtime(a.t))
        items.append(f'<li style="color:{color};margin:2px 0">{mark} <span style="color:#666">'
                     f"{when}, step {a.step}</span> {_short(a.text)}</li>")
    body = "".join(items) or '<li style="color:#999">none</li>'
    return ('<div style="font:600 13px system-ui,sans-serif;margin:8px 0 4px">Alerts</div>'
            f'<ul style="list-style:none;padding-left:4px;margin:0;font:12px system-ui,'
            f'sans-serif;max-height:240px;overflow-y:auto">{body}</ul>')


def panels(s: DashState, now: float | None = None) -> dict[str, str]:
    """Every panel's HTML/SVG for state `s` (pure)."""
    return {"status": status_html(s, now), "loss": loss_svg(s), "accuracy": accuracy_svg(s),
            "memory": memory_svg(s), "speed": speed_svg(s), "timeline": timeline_svg(s),
            "heads": heads_html(s), "alerts": alerts_html(s)}


def page_html(p: dict[str, str], title: str = "edgert run") -> str:
    """Panels laid out in a two-column grid, as a self-contained fragment."""
    cell = '<div style="min-width:0">{}</div>'
    grid = "".join(cell.format(p[k]) for k in ("loss", "accuracy", "memory", "speed", "timeline"))
    grid += cell.format(p["heads"] + p["alerts"])
    return (f'<div class="edgert-dashboard" style="max-width:{2 * W + 24}px">'
            f'<div style="font:600 16px system-ui,sans-serif;margin:4px 0">{html.escape(title)}'
            f"</div>{p['status']}<div style=\"display:grid;grid-template-columns:{W}px {W}px;"
            f'gap:12px;margin-top:8px">{grid}</div></div>')


class Dashboard:
    """Live view of a run: subscribe to its EventLog; redraw at most `fps` times a second.

    Parameters
    ----------
    events : EventLog
        The run's log (`run.events`, `handle.events`, or `EventLog.replay(EventLog.read(path))`).
    fps : float
        Redraw rate limit; events are folded immediately, drawing is deferred and batched.
    title : str
        Heading of the dashboard.
    total_steps : int, optional
        Steps the run will take, for the ETA, until an event says otherwise.

    Thread-safe: events arrive on the run's thread; the state is folded under a lock and the
    widgets are updated inside `hold_sync()` from a short-lived timer thread.
    """

    def __init__(self, events: EventLog, fps: float = 3.0, title: str = "edgert run",
                 total_steps: int | None = None) -> None:
        self.events = events
        self.title = title
        self.interval = 1.0 / fps
        self.state = DashState(total_steps=total_steps)
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._last_draw = 0.0
        self.redraws = 0
        self._widget: Any = None
        self._html: dict[str, Any] = {}
        events.subscribe(self._on_event, replay=True)

    # ---- events -> state ------------------------------------------------------------------

    def _on_event(self, ev: Event) -> None:
        with self._lock:
            reduce(self.state, ev)
            if self._timer is None:
                delay = max(0.0, self._last_draw + self.interval - time.monotonic())
                self._timer = threading.Timer(delay, self.refresh)
                self._timer.daemon = True
                self._timer.start()

    def refresh(self) -> None:
        """Redraw now (the timer calls this; call it yourself after the run for a final draw)."""
        with self._lock:
            self._timer = None
            self._last_draw = time.monotonic()
            p = panels(self.state, now=time.time())
            self.redraws += 1
        if self._widget is not None:
            with self._widget.hold_sync():
                for k, w in self._html.items():
                    if w.value != p[k]:
                        w.value = p[k]
        self._panels = p

    def close(self) -> None:
        """Stop following the log (the widgets keep their last picture)."""
        self.events.unsubscribe(self._on_event)
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    # ---- views ----------------------------------------------------------------------------

    def panel(self, name: str) -> str:
        """The current HTML/SVG of one panel (one of PANELS)."""
        with self._lock:
            return panels(self.state, now=time.time())[name]

    @property
    def widget(self) -> Any:
        """The ipywidgets VBox (built on first use; display it once, in the main thread)."""
        if self._widget is None:
            import ipywidgets as widgets

            p = panels(self.state, now=time.time())
            self._html = {k: widgets.HTML(value=p[k]) for k in PANELS}
            lay = widgets.Layout(width=f"{W + 10}px")
            for k in PANELS[1:]:
                self._html[k].layout = lay
            h = self._html
            self._widget = widgets.VBox([
                widgets.HTML(f"<b style='font-size:15px'>{html.escape(self.title)}</b>"),
                h["status"],
                widgets.HBox([h["loss"], h["accuracy"]]),
                widgets.HBox([h["memory"], h["speed"]]),
                widgets.HBox([h["timeline"], widgets.VBox([h["heads"], h["alerts"]],
                                                          layout=lay)]),
            ])
        return self._widget

    def widget_values(self) -> dict[str, str]:
        """What each displayed widget holds now (for tests and reports)."""
        _ = self.widget
        return {k: w.value for k, w in self._html.items()}

    def snapshot_html(self) -> str:
        """The current state as a standalone HTML page."""
        with self._lock:
            body = page_html(panels(self.state, now=time.time()), self.title)
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>"
                f"{html.escape(self.title)}</title></head><body style='margin:12px'>{body}"
                f"</body></html>")

    def _repr_html_(self) -> str:
        with self._lock:
            return page_html(panels(self.state, now=time.time()), self.title)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def __repr__(self) -> str:
        s = self.state
        return (f"Dashboard({s.state}, step {s.step}/{s.total_steps or '?'}, "
                f"{len(s.boards)} boards, {len(s.alerts)} alerts)")
