"""The import graph of edgert/, compiler/ and control/, read from the source (no import executed).

Layers, lowest first: edgert (the board) < compiler < control. A module may import from its own
layer and the ones below, never above: edgert imports nothing from compiler or control, compiler
nothing from control. Every import counts, function-local ones and `importlib.import_module("x")`
/ `__import__("x")` with a literal name included. And no import cycle among the project's modules:
a module that needs another at import time must not be needed by it.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("edgert", "compiler", "control")          # lowest first


@dataclass(frozen=True)
class Import:
    module: str        # the importing module
    target: str        # the project module it needs (a module or a package's __init__)
    line: int
    text: str          # the statement, for the error message


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> source file, for every .py file of the three packages under `root`."""
    return {module_name(p, root): p for pkg in LAYERS for p in sorted((root / pkg).rglob("*.py"))}


def _imported_names(node: ast.AST, module: str, is_pkg: bool) -> list[str]:
    """Dotted names an import statement or import call needs, most specific first."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:                                # relative: resolve against this package
            pkg = module.split(".") if is_pkg else module.split(".")[:-1]
            pkg = pkg[:len(pkg) - node.level + 1]
            base = ".".join([*pkg, base] if base else pkg)
        return [f"{base}.{a.name}" for a in node.names] + [base]
    if (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)):
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
        if name in ("import_module", "__import__"):
            return [node.args[0].value]
    return []


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module `name` refers to: itself, or its longest prefix that is a module
    (`from compiler.build import build_bundle` needs compiler.build)."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in modules:
            return ".".join(parts)
        parts.pop()
    return None


def imports(modules: dict[str, Path]) -> list[Import]:
    out = []
    for mod, path in modules.items():
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text, str(path))):
            names = _imported_names(node, mod, path.name == "__init__.py")
            if isinstance(node, ast.ImportFrom):   # `from pkg import sub` needs pkg.sub
                targets = {t for t in (_resolve(n, modules) for n in names[:-1]) if t}
                if not targets:
                    targets = {t for t in [_resolve(names[-1], modules)] if t}
            else:
                targets = {t for t in (_resolve(n, modules) for n in names) if t}
            for t in sorted(targets - {mod}):
                out.append(Import(mod, t, node.lineno, lines[node.lineno - 1].strip()))
    return out


def layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def upward(found: list[Import]) -> list[str]:
    return [f"{i.module.replace('.', '/')}.py:{i.line}: {i.text}  ({LAYERS[layer(i.module)]} "
            f"must not import {LAYERS[layer(i.target)]})"
            for i in found if layer(i.target) > layer(i.module)]


def cycles(found: list[Import]) -> list[tuple[list[str], list[str]]]:
    """(one concrete cycle, all its modules) per strongly connected component of the module
    graph: each component must be broken apart, the cycle shows one way round it."""
    graph: dict[str, set[str]] = {}
    for i in found:
        graph.setdefault(i.module, set()).add(i.target)
        graph.setdefault(i.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    sccs: list[set[str]] = []

    def visit(v: str) -> None:                        # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = set()
            while True:
                w = stack.pop()
                scc.add(w)
                if w == v:
                    break
            if len(scc) > 1:
                sccs.append(scc)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [(_a_cycle(graph, scc), sorted(scc)) for scc in sccs]


def _a_cycle(graph: dict[str, set[str]], scc: set[str]) -> list[str]:
    """A shortest cycle through the SCC's first module (breadth-first back to it)."""
    start = min(scc)
    prev: dict[str, str] = {}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & scc):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                return [start, *reversed(path[:-1]), start] if v != start else [start, start]
            if w not in prev:
                prev[w] = v
                queue.append(w)
    raise AssertionError(f"no cycle in the component {sorted(scc)}")


# ---- the checks on this repository ---------------------------------------------------------------
def test_no_upward_import():
    bad = upward(imports(project_modules()))
    assert not bad, ("imports against the layers edgert < compiler < control:\n  "
                     + "\n  ".join(bad) + "\nmove what both need down a layer (edgert/contract.py "
                     "holds what the board, compiler and controller share)")


def test_no_import_cycle():
    found = cycles(imports(project_modules()))
    assert not found, ("import cycles:\n  " + "\n  ".join(
        f"{' -> '.join(c)}  (entangled: {', '.join(m)})" for c, m in found)
        + "\nbreak each by moving what both modules need into a third, lower one")


# ---- the checker itself -------------------------------------------------------------------------
def _fake(root: Path, files: dict[str, str]) -> list[Import]:
    for name, text in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return imports(project_modules(root))


def test_checker_finds_function_local_relative_and_importlib_imports(tmp_path):
    found = _fake(tmp_path, {
        "edgert/__init__.py": "",
        "edgert/a.py": "def f():\n    from control.job import x\n",
        "edgert/b.py": "import importlib\nm = importlib.import_module('compiler.k')\n",
        "edgert/c.py": "from . import a\n",
        "compiler/__init__.py": "", "compiler/k.py": "from edgert import c\n",
        "control/__init__.py": "", "control/job.py": "import numpy\n",
    })
    assert {(i.module, i.target) for i in found} == {
        ("edgert.a", "control.job"), ("edgert.b", "compiler.k"), ("edgert.c", "edgert.a"),
        ("compiler.k", "edgert.c")}
    bad = upward(found)
    assert len(bad) == 2 and "edgert/a.py:2: from control.job import x" in bad[0]
    assert "edgert/b.py:2" in bad[1] and "edgert must not import compiler" in bad[1]


def test_checker_reports_a_cycle_as_a_path(tmp_path):
    found = _fake(tmp_path, {
        "compiler/__init__.py": "", "compiler/build.py": "def f():\n    import compiler.head\n",
        "compiler/head.py": "from compiler.cache import x\n",
        "compiler/cache.py": "from compiler import build\n", "compiler/ok.py": "import os\n",
        "edgert/__init__.py": "", "control/__init__.py": "",
    })
    assert cycles(found) == [(["compiler.build", "compiler.head", "compiler.cache",
                               "compiler.build"],
                              ["compiler.build", "compiler.cache", "compiler.head"])]
