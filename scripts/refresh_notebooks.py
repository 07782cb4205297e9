#!/usr/bin/env python3
"""Re-run the notebooks in notebooks/ and save their outputs in place, so that a reader who opens
one on a code host (no kernel) sees the plan, the plots and the dashboard snapshot of a real run.

    .venv/bin/python scripts/refresh_notebooks.py                    # every notebook, as committed
    .venv/bin/python scripts/refresh_notebooks.py 02_partitioning    # one of them

Each notebook runs from a clean copy (outputs and widget state cleared) in a new temporary
directory, so its run directories never land in the repository, with this interpreter and this
checkout as the kernel. The executed notebook (outputs, widget state) then replaces the committed
one; its kernelspec is kept as committed. The committed notebooks run the full jobs (QUICK = False
in their `parameters` cell: the quickstart trains 60 steps, ~5-10 minutes on 2 cores); run this
alone on the machine, since the outputs show step times, and commit the result.

tests/integration/test_notebooks.py runs the same notebooks through `execute` with QUICK = True
injected after the parameters cell, and checks that they run and show what they claim; it never
compares outputs with the saved ones.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
KERNEL = "edgert-refresh"


def clean(nb) -> None:
    """Drop every output, execution count and saved widget state (a fresh, unexecuted copy)."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    nb.metadata.pop("widgets", None)


def inject(nb, code: str) -> None:
    """Insert `code` as a new cell right after the cell tagged "parameters" (papermill's
    convention), so that it overrides the defaults set there."""
    import nbformat

    at = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    if len(at) != 1:
        raise SystemExit(f"the notebook needs exactly one cell tagged 'parameters', has {len(at)}")
    cell = nbformat.v4.new_code_cell(code, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(at[0] + 1, cell)


@contextmanager
def private_kernel(tmp: Path):
    """A kernelspec for this interpreter with this checkout first on PYTHONPATH, found through a
    private JUPYTER_PATH (never the user's ~/.local/share/jupyter)."""
    spec = tmp / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "edgert (this checkout)", "language": "python",
        "env": {"PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "PYDEVD_DISABLE_FILE_VALIDATION": "1"}}))
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(tmp / "jupyter")
    try:
        yield KERNEL
    finally:
        if old is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = old


def execute(src: Path, workdir: Path, params: str | None = None, timeout: int = 1800):
    """Run notebook `src` from a clean copy with `workdir` as its working directory (`params`:
    code injected after the parameters cell). Returns the executed notebook; raises
    nbclient's CellExecutionError (with the cell and its traceback) if a cell fails."""
    import nbclient
    import nbformat

    nb = nbformat.read(src, as_version=4)
    kernelspec = nb.metadata.get("kernelspec")
    clean(nb)
    if params:
        inject(nb, params)
    with private_kernel(workdir) as kernel:
        client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name=kernel,
                                         resources={"metadata": {"path": str(workdir)}})
        client.execute()
    if kernelspec is not None:
        nb.metadata["kernelspec"] = kernelspec
    return nb


def main(argv: list[str] | None = None) -> int:
    import nbformat

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="notebook names (default: all in notebooks/)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    a = ap.parse_args(argv)
    paths = ([NOTEBOOKS / (n if n.endswith(".ipynb") else f"{n}.ipynb") for n in a.names]
             or sorted(NOTEBOOKS.glob("*.ipynb")))
    for p in paths:
        if not p.is_file():
            raise SystemExit(f"{p}: no such notebook; the notebooks are "
                             f"{[q.name for q in sorted(NOTEBOOKS.glob('*.ipynb'))]}")
    for p in paths:
        t0 = time.perf_counter()
        print(f"running {p.relative_to(ROOT)} ...", flush=True)
        with tempfile.TemporaryDirectory(prefix="edgert-notebook-") as tmp:
            nb = execute(p, Path(tmp), timeout=a.timeout)
        nbformat.write(nb, p)
        print(f"  saved with outputs in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
