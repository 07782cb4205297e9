"""The committed notebooks carry the outputs of a real run, so that a reader who opens them on a
code host (no kernel) sees the plan table, the plots and the dashboard snapshot. They are refreshed by
scripts/refresh_notebooks.py; tests/integration/test_notebooks.py checks that they run.

Pure: reads the .ipynb files as JSON (no kernel, no nbformat)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
NAMES = ["01_quickstart.ipynb", "02_partitioning.ipynb"]


def _load(name: str) -> dict:
    return json.loads((NOTEBOOKS / name).read_text())


def _data(nb: dict, mime: str) -> list[str]:
    out = []
    for c in nb["cells"]:
        for o in c.get("outputs", []):
            v = o.get("data", {}).get(mime)
            if v is not None:
                out.append("".join(v) if isinstance(v, list) else v)
    return out


def test_the_notebooks_are_the_ones_listed():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_saved_as_executed_in_order_without_errors(name):
    nb = _load(name)
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    counts = [c["execution_count"] for c in code]
    assert None not in counts, f"{name}: cells without outputs; run scripts/refresh_notebooks.py"
    assert counts == list(range(1, len(code) + 1)), f"{name}: not run top to bottom: {counts}"
    errors = [o for c in code for o in c["outputs"] if o["output_type"] == "error"]
    assert not errors, f"{name}: saved with an error output"
    params = [c for c in code if "parameters" in c["metadata"].get("tags", [])]
    assert len(params) == 1 and "QUICK = False" in "".join(params[0]["source"]), \
        f"{name}: the saved outputs must come from the full job (QUICK = False)"
    assert not any("injected-parameters" in c["metadata"].get("tags", []) for c in code)
    assert nb["metadata"]["kernelspec"]["name"] == "python3"


def test_quickstart_shows_plan_plots_and_dashboard():
    nb = _load("01_quickstart.ipynb")
    html = _data(nb, "text/html")
    assert any("<table" in h and "bottleneck" in h for h in html), "the plan table"
    assert any("edgert-dashboard" in h and "<svg" in h for h in html), "the dashboard snapshot"
    assert len(_data(nb, "image/png")) == 1, "the curves as an image"
    state = nb["metadata"]["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    assert any(m["model_name"] == "VBoxModel" for m in state.values()), "the live dashboard"
    text = "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []))
    assert "training on the plan's split" in text and "max |difference|" in text


def test_partitioning_shows_plan_and_chart():
    nb = _load("02_partitioning.ipynb")
    assert any("<table" in h for h in _data(nb, "text/html")), "the plan table"
    assert len(_data(nb, "image/png")) == 1, "the memory-vs-speed chart"
