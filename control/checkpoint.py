"""Run checkpoints on the controller's disk: atomic, hash-checked, split-independent.

Layout of one checkpoint (``<run>/checkpoints/step-<N>/``)::

    stage0.safetensors   params of stage 0 (fused names, as the bundles name them) + "m/<name>",
    stage1.safetensors   "v/<name>" AdamW moments of those params
    meta.json            step, data position (epoch, position), run seed, RNG state, plan ranges,
                         boards, and the sha256 + size of every tensor file

[Note: checkpoint atomicity] A checkpoint is written into ``.tmp-step-<N>-<pid>/`` next to the
final name, fsynced, then renamed; a reader never sees a half-written ``step-<N>``. A crash leaves
only a ``.tmp-*`` directory, which the next `write` removes. Tensors are stored by parameter name,
not by stage, so a checkpoint taken with one split loads into any other split of the same model
(that is how a run re-planned over fewer boards continues).

`latest` checks every file's sha256 against meta.json and falls back to the previous checkpoint,
with a warning, when the newest is truncated or corrupt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgert.errors import ConfigError

log = logging.getLogger(__name__)

PREFIX = "step-"
META = "meta.json"


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint on disk."""

    path: Path
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def load(self, dense: bool = True) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(params, AdamW moments as {"m/<name>", "v/<name>"}) merged over every stage file.

        A checkpoint of FAR stages (meta "far": the plan, docs/far.md) stores their layout; with
        `dense` its params come back in the model's dense layout (the moments stay as stored:
        frozen FFN parts have none)."""
        from safetensors.numpy import load_file

        params: dict[str, np.ndarray] = {}
        opt: dict[str, np.ndarray] = {}
        for f in self.meta["files"]:
            for k, v in load_file(str(self.path / f)).items():
                (opt if k.startswith(("m/", "v/")) else params)[k] = v
        if dense and self.meta.get("far"):
            from compiler.far import FarPlan, restore

            params = restore(params, FarPlan.from_dict(self.meta["far"]))
        return params, opt


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write(root: Path | str, step: int, stage_names: list[list[str]], params: dict[str, np.ndarray],
          opt: dict[str, np.ndarray], meta: dict[str, Any], keep: int = 2) -> Checkpoint:
    """Write checkpoint `step` atomically under `root`, then keep only the newest `keep`.

    `stage_names[i]` lists stage i's parameter names; `opt` holds "m/<name>" and "v/<name>".
    See [Note: checkpoint atomicity].
    """
    from safetensors.numpy import save_file

    if keep < 1:
        raise ConfigError(f"keep must be >= 1 checkpoint, got {keep}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"{PREFIX}{step}"
    tmp = root / f".tmp-{PREFIX}{step}-{os.getpid()}"
    tmp.mkdir()
    files: dict[str, dict[str, Any]] = {}
    for i, names in enumerate(stage_names):
        tensors = {n: np.ascontiguousarray(params[n]) for n in names}
        tensors.update({f"{k}/{n}": np.ascontiguousarray(opt[f"{k}/{n}"])
                        for k in ("m", "v") for n in names if f"{k}/{n}" in opt})
        f = tmp / f"stage{i}.safetensors"
        save_file(tensors, str(f))
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
        files[f.name] = {"sha256": _sha256(f), "bytes": f.stat().st_size}
    full = {**meta, "step": step, "files": files, "written": time.time()}
    (tmp / META).write_text(json.dumps(full, indent=1))
    _fsync_dir(tmp)
    if final.exists():                 # a redone step after recovery overwrites its old copy
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync_dir(root)
    for old in list_steps(root)[:-keep]:
        shutil.rmtree(root / f"{PREFIX}{old}", ignore_errors=True)
    return Checkpoint(final, full)


def list_steps(root: Path | str) -> list[int]:
    """Steps of the checkpoint directories under `root`, ascending (unverified)."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = []
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith(PREFIX) and d.name[len(PREFIX):].isdigit():
            steps.append(int(d.name[len(PREFIX):]))
    return sorted(steps)


def verify(path: Path | str) -> Checkpoint:
    """Check meta.json and the sha256 of every file; raise ConfigError saying what is wrong."""
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
        files = meta["files"]
        int(meta["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"checkpoint {path}: {META} is missing or unreadable ({e})") from e
    for name, rec in files.items():
        f = path / name
        if not f.is_file():
            raise ConfigError(f"checkpoint {path}: {name} is missing")
        if f.stat().st_size != rec["bytes"]:
            raise ConfigError(f"checkpoint {path}: {name} has {f.stat().st_size} bytes, "
                              f"{META} says {rec['bytes']} (truncated?)")
        if _sha256(f) != rec["sha256"]:
            raise ConfigError(f"checkpoint {path}: {name} fails its sha256 check (corrupt)")
    return Checkpoint(path, meta)


def latest(root: Path | str, warn: Callable[[str], None] | None = None) -> Checkpoint | None:
    """The newest checkpoint that verifies; older ones are tried, with a warning, if it does not.

    Every skipped checkpoint is logged and, if given, passed to `warn` as one line of text.
    """
    for step in reversed(list_steps(root)):
        try:
            return verify(Path(root) / f"{PREFIX}{step}")
        except ConfigError as e:
            text = f"{e}; falling back to the previous checkpoint"
            log.warning("%s", text)
            if warn is not None:
                warn(text)
    return None
