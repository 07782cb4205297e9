"""The notebooks in notebooks/ run headless from a clean copy and show what they claim.

Each notebook is executed by scripts/refresh_notebooks.py's `execute` (the code that refreshes the
saved outputs) with outputs cleared and QUICK = True injected after its parameters cell. Nothing is
compared with the saved outputs (tests/unit/test_notebook_outputs.py checks that they are there).
The quickstart trains on real local boards (8 steps of 2 x 2 x 16 tokens on the split its planner
chooses); the run it starts must use the plan it shows, and the dashboard's widget state after the
run is checked against the run's own events.jsonl.
"""

from __future__ import annotations

import importlib.util
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[2]
NS = "{http://www.w3.org/2000/svg}"


def _refresh_module():
    spec = importlib.util.spec_from_file_location("refresh_notebooks",
                                                  ROOT / "scripts" / "refresh_notebooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def execute(name: str, cwd: Path, timeout: int = 900):
    nb = _refresh_module().execute(ROOT / "notebooks" / name, cwd, params="QUICK = True",
                                   timeout=timeout)
    nbformat.write(nb, cwd / name)          # for a look after a failure
    return nb


def outputs(nb, mime: str) -> list[str]:
    return [o["data"][mime] for c in nb.cells for o in c.get("outputs", [])
            if mime in o.get("data", {})]


def texts(nb) -> str:
    out = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            out.append(o.get("text") or o.get("data", {}).get("text/plain") or "")
    return "\n".join(out)


def widget_values(nb) -> dict[str, str]:
    """The dashboard's panels as stored in the notebook's widget state, by panel name."""
    state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    views = [o["data"]["application/vnd.jupyter.widget-view+json"]["model_id"]
             for c in nb.cells for o in c.get("outputs", [])
             if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]

    def children(mid: str) -> list[str]:
        return [c.removeprefix("IPY_MODEL_") for c in state[mid]["state"].get("children", [])]

    def html(mid: str) -> str:
        return state[mid]["state"].get("value", "")

    dash = [v for v in views if state[v]["model_name"] == "VBoxModel" and children(v)
            and "edgert run" in html(children(v)[0])]
    assert len(dash) == 1, "the quickstart displays one dashboard"
    title, status, row1, row2, row3 = children(dash[0])
    loss, acc = children(row1)
    mem, speed = children(row2)
    timeline, side = children(row3)
    heads, alerts = children(side)
    return {"title": html(title), "status": html(status), "loss": html(loss),
            "accuracy": html(acc), "memory": html(mem), "speed": html(speed),
            "timeline": html(timeline), "heads": html(heads), "alerts": html(alerts)}


def polyline_lengths(svg: str) -> list[int]:
    return [len(p.get("points").split()) for p in ET.fromstring(svg).iter(f"{NS}polyline")]


@pytest.mark.slow
def test_quickstart_notebook_trains_shows_and_exports(tmp_path):
    nb = execute("01_quickstart.ipynb", tmp_path)
    out = texts(nb)
    (run_dir,) = (tmp_path / "runs").glob("notebook-quickstart-*")
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["kind"] == "step"]
    evals = [e for e in events if e["kind"] == "eval"]
    assert len(steps) == 8 and [e["step"] for e in evals] == [0, 4, 8]

    # printed: the plan, the pause, the result, the export check
    assert "bottleneck" in out and "board0" in out and "budget MiB" in out
    assert any("<table" in h for h in outputs(nb, "text/html"))     # the plan as a table
    # the plan shown (plan.explain()'s first line) is the plan the run used
    shown = re.findall(r"^split (\S+) over board0, board1:", out, re.MULTILINE)
    (start,) = [e for e in events if e["kind"] == "plan" and e["reason"] == "start"]
    used = ",".join(f"{a}:{b}" for a, b in start["ranges"])
    assert shown == [used], f"the notebook shows the plan {shown}, the run used {used}"
    assert re.search(r"state: paused at step \d", out)
    assert "RunResult(finished, 8 steps" in out
    diff = float(re.search(r"max \|difference\| = ([0-9.e+-]+)", out).group(1))
    assert diff < 1e-4                                   # HF reload == edgert's own stages
    assert (run_dir / "hf_model" / "config.json").is_file()
    assert "p(positive)=" in out

    # the dashboard's widget state after the run
    w = widget_values(nb)
    assert "FINISHED" in w["status"].upper() and "8/8" in w["status"]
    assert polyline_lengths(w["loss"]) == [8, 3]         # train loss per step, held-out per eval
    assert polyline_lengths(w["accuracy"]) == [3]
    assert polyline_lengths(w["speed"]) == [8]
    last = {e["name"]: e for e in events if e["kind"] == "board"}
    assert set(last) == {"board0", "board1"}
    for name, e in last.items():                        # each board's memory against its budget
        assert e["budget_mib"] == 1024
        shown = f"{e['rss_mib']:.0f} MiB, peak {e['peak_rss_mib']:.0f} / 1024 MiB budget"
        assert shown in w["memory"]
    assert w["memory"].count('stroke-width="2.5"') == 2  # a budget marker per board
    assert "paused at step" in w["alerts"] and "resumed at step" in w["alerts"]
    assert "planned" in w["timeline"] and "not measured" in w["heads"]
    # static copies of the dashboard: HTML (survives nbconvert) and an image (any viewer)
    assert any("edgert-dashboard" in h for h in outputs(nb, "text/html"))
    assert len(outputs(nb, "image/png")) == 1


def test_partitioning_notebook_explains_plans(tmp_path):
    nb = execute("02_partitioning.ipynb", tmp_path, timeout=300)
    out = texts(nb)
    assert "split 0:" in out and "bottleneck: sets the pace" in out
    assert "best order:" in out
    assert "is short by" in out and "Raise those budgets" in out      # PlanError, explained
    sweep = re.findall(r"phone budget\s+(\d+) MiB: (?:bottleneck\s+([0-9.]+) ms|no split fits)",
                       out)
    assert sweep[0][1] == ""                                          # too small: no plan
    ms = [float(b) for _, b in sweep if b]
    assert ms[0] > ms[-1] and ms == sorted(ms, reverse=True)          # memory buys speed
    assert any("<table" in h for h in outputs(nb, "text/html"))     # the plan as a table
    assert len(outputs(nb, "image/png")) == 1                       # the sweep's chart
