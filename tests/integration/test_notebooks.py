"""The notebooks in notebooks/ run headless (nbclient) and show what they claim.

The quickstart trains on real local boards (8 steps of 2 x 2 x 16 tokens; its stage libraries
are the ones tests/integration/test_cluster.py compiles, so the session cache usually has them),
and the dashboard's widget state after the run is checked against the run's own events.jsonl.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[2]
NS = "{http://www.w3.org/2000/svg}"
KERNEL = "edgert-test"


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """A kernelspec for THIS interpreter in a private JUPYTER_PATH (never the user's home): a
    'python3' spec found elsewhere could start another Python without edgert."""
    d = tmp_path_factory.mktemp("jupyter")
    spec = d / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "edgert test kernel", "language": "python"}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(d))
        mp.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
        yield d


def execute(name: str, cwd: Path, timeout: int = 900):
    shutil.copy(ROOT / "notebooks" / name, cwd / name)
    nb = nbformat.read(cwd / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name=KERNEL,
                                     resources={"metadata": {"path": str(cwd)}})
    client.execute()            # raises CellExecutionError with the cell and traceback on failure
    nbformat.write(nb, cwd / name)
    return nb


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
def test_quickstart_notebook_trains_shows_and_exports(kernel_env, tmp_path):
    nb = execute("01_quickstart.ipynb", tmp_path)
    out = texts(nb)
    run_dir = tmp_path / "runs" / "notebook-quickstart"
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["kind"] == "step"]
    evals = [e for e in events if e["kind"] == "eval"]
    assert len(steps) == 8 and [e["step"] for e in evals] == [0, 4, 8]

    # printed: the plan, the pause, the result, the export check
    assert "bottleneck" in out and "board0" in out and "budget MiB" in out
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
    # the static copy of the dashboard is in the notebook too (survives nbconvert)
    assert any("edgert-dashboard" in o.get("data", {}).get("text/html", "")
               for c in nb.cells for o in c.get("outputs", []))


def test_partitioning_notebook_explains_plans(kernel_env, tmp_path):
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
    svgs = [o["data"]["text/html"] for c in nb.cells for o in c.get("outputs", [])
            if "<svg" in o.get("data", {}).get("text/html", "")]
    assert svgs and polyline_lengths(svgs[0])
