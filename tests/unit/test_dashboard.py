"""The dashboard's reducer (control/dashboard_state.py) and pure panels (control/dashboard.py)."""

from __future__ import annotations

import math
import re
import threading
import xml.etree.ElementTree as ET

import pytest

from control.dashboard import Dashboard, panels
from control.dashboard_state import DashState, reduce
from control.events import Event, EventLog

NS = "{http://www.w3.org/2000/svg}"
T0 = 1.7e9


def fake_run(n: int = 20, boards=(("board0", 480.0, 600.0), ("board1", 231.0, 400.0)),
             lose_at: int | None = None, timeline: bool = True) -> list[Event]:
    """A plausible event stream: plan, steps (1 s each), evals every 5, board telemetry."""
    ev = [Event("state", {"state": "starting", "step": 0, "total_steps": n}, T0),
          Event("plan", {"ranges": [[0, 3], [3, 6]], "boards": [b[0] for b in boards],
                         "mode": "sync", "micro_batches": 2, "reason": "start"}, T0 + 1),
          Event("state", {"state": "running", "step": 0, "total_steps": n}, T0 + 10)]
    t = T0 + 10
    for s in range(1, n + 1):
        t += 1.0
        ev.append(Event("step", {"step": s, "loss": 0.7 - 0.01 * s, "step_s": 1.0,
                                 "seq_per_s": 16.0, "lr": 2e-4}, t))
        for i, (name, rss, budget) in enumerate(boards):
            alive = not (lose_at is not None and i == 1 and s >= lose_at)
            ev.append(Event("board", {"name": name, "stage": i, "rss_mib": rss,
                                      "peak_rss_mib": rss + 10, "budget_mib": budget,
                                      "alive": alive,
                                      "head_split": {"0": 4, "1": 3} if i == 0 else None}, t))
        if s % 5 == 0:
            ev.append(Event("eval", {"step": s, "loss": 0.7 - 0.01 * s, "accuracy": 0.5 + s / 100,
                                     "examples": 64}, t))
            if timeline:
                ev.append(Event("timeline", {"step": s, "rows": [
                    {"board": "board0", "stage": 0, "mb": 0, "op": "F", "t0": 0.0, "t1": 0.1},
                    {"board": "board1", "stage": 1, "mb": 0, "op": "F", "t0": 0.1, "t1": 0.2},
                    {"board": "board1", "stage": 1, "mb": 0, "op": "B", "t0": 0.2, "t1": 0.4},
                    {"board": "board0", "stage": 0, "mb": 0, "op": "B", "t0": 0.4, "t1": 0.6},
                    {"board": "board0", "stage": 0, "mb": None, "op": "U", "t0": 0.6,
                     "t1": 0.7}]}, t))
    ev.append(Event("state", {"state": "finished", "step": n, "total_steps": n}, t + 1))
    return ev


def test_fold_counts_steps_evals_and_timing():
    s = DashState.from_events(fake_run(20))
    assert s.state == "finished" and s.step == 20 and s.total_steps == 20
    assert s.steps == list(range(1, 21))
    assert s.losses == pytest.approx([0.7 - 0.01 * k for k in range(1, 21)])
    assert [e["step"] for e in s.evals] == [5, 10, 15, 20]
    assert s.evals[-1]["accuracy"] == pytest.approx(0.7)
    assert s.elapsed_s() == pytest.approx(31.0)       # first event T0 -> finished at T0 + 31
    assert s.throughput() == 16.0 and s.mean_step_s() == 1.0
    assert list(s.boards) == ["board0", "board1"]
    assert s.boards["board0"].use == pytest.approx(490 / 600)
    assert s.alerts == []                              # nothing unusual happened


def test_eta_from_recent_step_times():
    s = DashState.from_events(fake_run(20)[:40])
    assert s.running and s.total_steps == 20
    assert s.eta_s() == pytest.approx((20 - s.step) * 1.0)


def test_resumed_run_replaces_repeated_steps():
    ev = fake_run(10)
    s = DashState.from_events(ev)
    reduce(s, Event("state", {"state": "running", "step": 6, "note": "resumed"}, T0 + 100))
    for k in (7, 8):
        reduce(s, Event("step", {"step": k, "loss": 0.1, "step_s": 2.0}, T0 + 100 + k))
    assert s.steps == [1, 2, 3, 4, 5, 6, 7, 8] and s.losses[-2:] == [0.1, 0.1]
    assert len(s.step_s) == len(s.seq_per_s) == len(s.steps)


def test_alerts_board_lost_replanned_paused_resumed_memory():
    ev = fake_run(10, lose_at=6)
    ev.insert(-1, Event("plan", {"ranges": [[0, 6]], "boards": ["board0"], "mode": "sync",
                                 "micro_batches": 2, "reason": "board lost"}, T0 + 30))
    ev.insert(-1, Event("state", {"state": "paused", "step": 10}, T0 + 31))
    ev.insert(-1, Event("state", {"state": "running", "step": 10}, T0 + 32))
    ev.insert(-1, Event("board", {"name": "board0", "rss_mib": 580.0, "budget_mib": 600.0},
                        T0 + 33))
    ev.insert(-1, Event("alert", {"level": "warning", "text": "link slow"}, T0 + 34))
    s = DashState.from_events(ev)
    texts = [a.text for a in s.alerts]
    assert texts[0] == "board board1 lost (stage 1)"
    assert texts.count("board board1 lost (stage 1)") == 1     # not repeated every step
    assert any(t.startswith("re-planned (board lost): split 0:6 on board0") for t in texts)
    assert "paused at step 10" in texts and "resumed at step 10" in texts
    assert any("board0 uses 97% of its memory budget" in t for t in texts)
    assert texts[-1] == "link slow"
    assert [a.level for a in s.alerts][0] == "error"
    assert not s.boards["board1"].alive               # a lost board stays visible
    html = panels(s)["alerts"]
    assert "board board1 lost" in html and "re-planned" in html


def test_replay_from_events_jsonl_equals_live_fold(tmp_path):
    log = EventLog(tmp_path / "events.jsonl")
    for e in fake_run(8):
        log.emit(e.kind, **e.data)
    live = DashState.from_events(log.events())
    replayed = DashState.from_events(EventLog.read(tmp_path / "events.jsonl"))
    assert replayed.steps == live.steps and replayed.losses == live.losses
    assert replayed.evals == live.evals and replayed.state == "finished"


def points(svg: str) -> list[int]:
    root = ET.fromstring(svg)
    return [len(p.get("points").split()) for p in root.iter(f"{NS}polyline")]


def test_panels_show_what_happened():
    p = panels(DashState.from_events(fake_run(20)))
    assert "FINISHED" in p["status"].upper() and "20/20" in p["status"]
    assert "held-out accuracy <b>70.0%</b>" in p["status"] and "16.0 seq/s" in p["status"]
    assert "split 0:3,3:6" in p["status"]
    assert points(p["loss"]) == [20, 4]                   # train per step, held-out per eval
    assert points(p["accuracy"]) == [4]
    assert points(p["speed"]) == [20]
    mem = p["memory"]
    for name, rss, budget in (("board0", 480, 600), ("board1", 231, 400)):
        assert f"{name} (stage" in mem and f"/ {budget} MiB budget" in mem and f"{rss} MiB" in mem
    assert mem.count('stroke-width="2.5"') == 2           # one budget marker per board
    assert "#d62728" not in mem                          # nobody is over 90%
    tl = ET.fromstring(p["timeline"])
    assert len([r for r in tl.iter(f"{NS}rect") if r.get("rx") == "2"]) == 5
    assert "measured" in p["timeline"]
    assert "L0: 4, L1: 3" in p["heads"] and "not measured" in p["heads"]


def test_timeline_falls_back_to_the_planned_schedule():
    p = panels(DashState.from_events(fake_run(3, timeline=False)))
    tl = ET.fromstring(p["timeline"])
    boxes = [r for r in tl.iter(f"{NS}rect") if r.get("rx") == "2"]
    assert len(boxes) == 2 * 2 * 2                       # K=2 stages x M=2 x (F, B)
    assert "planned" in p["timeline"] and "not measured" in p["timeline"]


def test_memory_over_ninety_percent_is_red():
    s = DashState.from_events(fake_run(2, boards=(("b0", 560.0, 600.0),)))
    assert "#d62728" in panels(s)["memory"]


def test_empty_state_renders():
    p = panels(DashState())
    assert "WAITING" in p["status"].upper() and "no data yet" in p["loss"]
    assert "no plan yet" in p["timeline"] and "none" in p["alerts"]


def test_dashboard_follows_a_live_log_from_another_thread():
    log = EventLog()
    evs = fake_run(30)
    for e in evs[:5]:                 # a dashboard opened mid-run replays the past
        log.emit(e.kind, **e.data)
    dash = Dashboard(log, fps=5.0)
    vals = dash.widget_values()
    assert set(vals) == {"status", "loss", "accuracy", "memory", "speed", "timeline", "heads",
                         "alerts"}

    def produce():
        for e in evs[5:]:
            log.emit(e.kind, **e.data)

    th = threading.Thread(target=produce)
    th.start()
    th.join()
    assert dash.state.step == 30 and dash.state.state == "finished"
    if dash._timer is not None:                       # the pending redraw fires by itself
        dash._timer.join(2.0)
    assert dash.redraws <= 3                          # ~130 events, throttled to a few draws
    vals = dash.widget_values()
    assert points(vals["loss"]) == [30, 6] and "30/30" in vals["status"]
    html = dash.snapshot_html()
    assert html.startswith("<!doctype html>") and "board1" in html
    assert re.search(r"Dashboard\(finished, step 30/30, 2 boards", repr(dash))
    dash.close()
    log.emit("step", step=31, loss=0.1)
    assert dash.state.step == 30                      # closed: no longer following
    assert not math.isnan(dash.state.losses[-1])


def test_long_texts_are_cut_with_the_whole_text_in_a_tooltip():
    long = "board0 refused request 7: " + "x" * 400
    s = DashState.from_events(fake_run(3, lose_at=2)
                              + [Event("alert", {"level": "error", "text": long}, T0 + 99)])
    html = panels(s)["alerts"]
    assert f'title="{long}"' in html and "x" * 300 not in html.replace(long, "")
    mem = panels(s)["memory"]
    assert "board1 (stage 1) LOST" in mem and 'fill="#999"' in mem     # a lost board is greyed
