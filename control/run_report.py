"""A run directory's metrics.json, report.json and report.html, derived from its events.jsonl only.

Everything here is a pure function of the event stream (control/events.py), so a report can be
rebuilt at any time (`write_report` on a finished or stopped run) and its
numbers always match the events: a step redone after a recovery counts once, with its last value.

Examples
--------
>>> from control.events import Event
>>> evs = [Event("step", {"step": 1, "loss": 0.7}), Event("step", {"step": 2, "loss": 0.6}),
...        Event("step", {"step": 2, "loss": 0.65})]
>>> [(s["step"], s["loss"]) for s in metrics(evs)["steps"]]
[(1, 0.7), (2, 0.65)]
"""

from __future__ import annotations

import html
import json
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from control.events import Event, EventLog


def _last_by_step(events: Iterable[Event], kind: str) -> list[dict[str, Any]]:
    by: dict[int, dict[str, Any]] = {}
    for e in events:
        if e.kind == kind and isinstance(e.data.get("step"), int):
            by[e.data["step"]] = {**e.data, "t": e.t}
    return [by[k] for k in sorted(by)]


def metrics(events: list[Event]) -> dict[str, Any]:
    """Per-step training metrics, evaluations, checkpoints, plans, alerts and board peaks."""
    steps = _last_by_step(events, "step")
    boards: dict[str, dict[str, Any]] = {}
    for e in events:
        if e.kind == "board" and e.data.get("name"):
            b = boards.setdefault(e.data["name"], {"name": e.data["name"], "peak_rss_mib": 0.0})
            b["alive"] = bool(e.data.get("alive", True))
            for k in ("stage", "budget_mib", "rss_mib"):
                if e.data.get(k) is not None or k == "stage":
                    b[k] = e.data.get(k)
            b["peak_rss_mib"] = max(b["peak_rss_mib"], e.data.get("peak_rss_mib") or 0.0)
    times = [s["step_s"] for s in steps if isinstance(s.get("step_s"), int | float)]
    states = [e.data for e in events if e.kind == "state"]
    return {
        "steps": [{k: s.get(k) for k in ("step", "loss", "step_s", "lr", "seq_per_s")}
                  for s in steps],
        "evals": [{k: s.get(k) for k in ("step", "loss", "accuracy", "examples")}
                  for s in _last_by_step(events, "eval")],
        "checkpoints": [{k: e.data.get(k) for k in ("step", "path", "seconds")}
                        for e in events if e.kind == "checkpoint"],
        "plans": [dict(e.data) for e in events if e.kind == "plan"],
        "alerts": [{"t": e.t, **e.data} for e in events if e.kind == "alert"],
        "boards": sorted(boards.values(), key=lambda b: b["name"]),
        "median_step_s": statistics.median(times) if times else None,
        "last_state": states[-1] if states else None,
    }


def write_report(run: Any) -> dict[str, Any]:
    """Write metrics.json, report.json and report.html into the run directory; returns metrics."""
    d = Path(run.dir)
    m = metrics(EventLog.read(d / "events.jsonl"))
    (d / "metrics.json").write_text(json.dumps(m, indent=1))
    ev = m["evals"]
    rep = {"run_dir": str(d), "config": run.config.to_dict(), "state": run.state,
           "step": run.step, "steps": run.config.steps, "recoveries": run.recoveries,
           "first_eval": ev[0] if ev else None, "final_eval": ev[-1] if ev else None,
           "train_loss_first_last": [m["steps"][0]["loss"], m["steps"][-1]["loss"]]
           if m["steps"] else None,
           "median_step_s": m["median_step_s"], "plans": m["plans"], "boards": m["boards"]}
    (d / "report.json").write_text(json.dumps(rep, indent=1))
    (d / "report.html").write_text(render_html(m, title=f"edgert run {d.name}", rep=rep))
    return m


def charts(m: dict[str, Any]) -> list[str]:
    """Inline SVG charts: training loss, held-out metrics, step time, board memory."""
    from control.svg import Bar, Series, hbar_chart, line_chart

    st, ev = m["steps"], m["evals"]
    xs = [s["step"] for s in st]
    out = [
        line_chart([Series("train loss", xs, [s["loss"] for s in st])],
                   title="training loss", xlabel="step", ylabel="loss"),
        line_chart([Series("held-out accuracy", [e["step"] for e in ev],
                           [e["accuracy"] for e in ev], markers=True),
                    Series("held-out loss", [e["step"] for e in ev], [e["loss"] for e in ev],
                           markers=True, dashed=True)],
                   title="held-out evaluation", xlabel="step"),
        line_chart([Series("step time (s)", xs, [s["step_s"] for s in st])],
                   title="step time", xlabel="step", ylabel="s", y_min=0.0),
        hbar_chart([Bar(b["name"], b.get("rss_mib") or 0.0, b["peak_rss_mib"],
                        b.get("budget_mib"), "" if b.get("alive", True) else "lost")
                    for b in m["boards"]], title="board memory (RSS, peak, budget)",
                   xlabel="MiB", unit="MiB"),
    ]
    return out


def render_html(m: dict[str, Any], title: str, rep: dict[str, Any] | None = None) -> str:
    """One self-contained HTML page (no scripts, no external files)."""
    e = html.escape
    rows = "".join(f"<tr><td>{e(str(a.get('level')))}</td><td>{e(str(a.get('text')))}</td></tr>"
                   for a in m["alerts"])
    plans = "".join(f"<tr><td>{e(str(p.get('reason')))}</td><td>{e(str(p.get('ranges')))}</td>"
                    f"<td>{e(str(p.get('boards')))}</td></tr>" for p in m["plans"])
    summary = ""
    if rep is not None:
        fe = rep.get("final_eval") or {}
        summary = (f"<p>state <b>{e(str(rep['state']))}</b>, step {rep['step']} of "
                   f"{rep['steps']}; final held-out accuracy "
                   f"{100 * (fe.get('accuracy') or 0):.1f}% ({fe.get('examples', 0)} sentences); "
                   f"median step {1000 * (rep['median_step_s'] or 0):.0f} ms; "
                   f"{len(rep['recoveries'])} recoveries in the last session</p>")
    figs = "".join(f"<div class='fig'>{svg}</div>" for svg in charts(m))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>"
            "<style>body{font-family:system-ui,sans-serif;margin:1.5em}.fig{display:inline-block;"
            "margin:.5em}td,th{padding:2px 8px;text-align:left}</style></head><body>"
            f"<h1>{e(title)}</h1>{summary}{figs}"
            f"<h2>plans</h2><table><tr><th>why</th><th>layers per stage</th><th>boards</th></tr>"
            f"{plans}</table><h2>alerts</h2><table><tr><th>level</th><th>text</th></tr>{rows}"
            "</table></body></html>")
