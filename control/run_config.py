"""RunConfig: every setting of an unattended run, from a TOML file or defaults (pure, stdlib only).

A run.toml holds flat keys, any subset of the fields below; the rest keep their defaults::

    boards = 2              # local board processes
    budget_mib = 0          # memory budget per board (0 = unlimited)
    split = "0:3,3:6"       # or stages = 2; neither: the planner chooses over all boards
    steps = 60
    batch = 8               # micro-batch size (compiled shape)
    micro_batches = 2
    seq = 64
    checkpoint_every = 10

    [far]                   # optional: FAR fine-tuning of the FFNs (docs/far.md)
    retention = 0.4         # -> far_retention (0 = off); priming -> far_priming, selection -> ...
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from edgert.errors import ConfigError


@dataclass(frozen=True)
class RunConfig:
    """Settings of a fine-tuning run (`control.run.Run`); every field has a default.

    Parameters
    ----------
    model : str
        Hugging Face BERT folder; "" = the installed all-MiniLM-L6-v2.
    boards : int
        Local board processes (`edgert serve`), one stage each at most.
    budget_mib : float
        Memory budget of every board in MiB (0 = unlimited); the planner and the boards enforce it.
    stages, split : int, str
        Pipeline stages: an explicit layer split ("0:2,2:6"), K even stages, or (both unset) the
        memory-aware planner over all boards.
    steps, batch, micro_batches, seq, lr, warmup, seed : training (warmup -1 = steps // 10)
    eval_every, eval_examples : held-out evaluation every N steps (0: at the start and end only)
    checkpoint_every, keep_checkpoints : consistent checkpoints every N steps; how many to keep
    mode : "sync" (1F1B with a flush; the only mode a run can checkpoint consistently)
    threads : TVM threads per board (0 = cores // boards, at least 1)
    timeout_s : a board that does not answer a request within this many seconds is lost
    max_recoveries : give up after this many board losses
    board_every : board telemetry events every N steps
    export_hf : at the end, write the fine-tuned model as a Hugging Face folder (DIR/hf_model)
    replan_drift, replan_patience : re-plan live when a board runs this many times slower (or
        faster) than planned, relative to the others, for this many consecutive steps (0 = off;
        see [Note: speed drift] in control/replan.py)
    far_retention, far_priming, far_selection : FAR (docs/far.md): after `far_priming` of the
        steps, train only this share of each FFN's nodes ("l1": those that moved most; "random");
        0 = off. In run.toml also as a `[far]` table with keys retention, priming, selection.
    far_freeze_embeddings : FAR also freezes the embeddings after priming (`[far]`
        freeze_embeddings = true; FarConfig.freeze_embeddings).
    registry, board_names : run on the running board daemons of this registry (KEYS/boards.json,
        written by boards/provision.sh --start), the first `boards` of `board_names` ("rk0,pi0";
        default: registry order), instead of local processes (docs/boards.md)
    target : what the stages are compiled for ("host", "arm64", ...; docs/targets.md)

    Examples
    --------
    >>> cfg = RunConfig(steps=8, batch=2, seq=16, checkpoint_every=2)
    >>> cfg.warmup_steps
    1
    >>> RunConfig.from_dict(cfg.to_dict()) == cfg
    True
    """

    model: str = ""
    boards: int = 2
    budget_mib: float = 0.0
    stages: int = 0
    split: str = ""
    steps: int = 60
    batch: int = 8
    micro_batches: int = 2
    seq: int = 64
    lr: float = 2e-4
    warmup: int = -1
    seed: int = 0
    eval_every: int = 0
    eval_examples: int = 256
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    mode: str = "sync"
    threads: int = 0
    timeout_s: float = 120.0
    max_recoveries: int = 3
    board_every: int = 2
    export_hf: bool = True
    replan_drift: float = 0.0
    replan_patience: int = 3
    far_retention: float = 0.0
    far_priming: float = 0.05
    far_selection: str = "l1"
    far_freeze_embeddings: bool = False
    registry: str = ""
    board_names: str = ""
    target: str = "host"

    def __post_init__(self) -> None:
        positive = ("boards", "steps", "batch", "micro_batches", "seq", "checkpoint_every",
                    "keep_checkpoints", "board_every", "eval_examples")
        for name in positive:
            v = getattr(self, name)
            if type(v) is not int or v < 1:
                raise ConfigError(f"run config: {name} must be an integer >= 1, got {v!r}")
        for name in ("stages", "seed", "eval_every", "threads", "max_recoveries"):
            v = getattr(self, name)
            if type(v) is not int or v < 0:
                raise ConfigError(f"run config: {name} must be an integer >= 0, got {v!r}")
        if type(self.warmup) is not int or self.warmup < -1:
            raise ConfigError(f"run config: warmup must be an integer >= 0 (or -1 for steps // 10)"
                              f", got {self.warmup!r}")
        for name in ("lr", "timeout_s"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or isinstance(v, bool) or not v > 0:
                raise ConfigError(f"run config: {name} must be a number > 0, got {v!r}")
        if not isinstance(self.budget_mib, int | float) or self.budget_mib < 0:
            raise ConfigError(f"run config: budget_mib must be >= 0 (0 = unlimited), "
                              f"got {self.budget_mib!r}")
        if not isinstance(self.replan_drift, int | float) or not (
                self.replan_drift == 0 or self.replan_drift > 1):
            raise ConfigError(f"run config: replan_drift must be 0 (off) or a factor > 1 such as "
                              f"1.5, got {self.replan_drift!r}")
        if type(self.replan_patience) is not int or self.replan_patience < 1:
            raise ConfigError(f"run config: replan_patience must be an integer >= 1, got "
                              f"{self.replan_patience!r}")
        if not isinstance(self.far_retention, int | float) or not 0 <= self.far_retention < 1:
            raise ConfigError(f"run config: far retention must be in (0, 1) (learner FFN nodes / "
                              f"all), or 0 for off; got {self.far_retention!r}, e.g. 0.4")
        if not isinstance(self.far_priming, int | float) or not 0 < self.far_priming < 1:
            raise ConfigError(f"run config: far priming must be a share of the steps in (0, 1), "
                              f"got {self.far_priming!r}, e.g. 0.05")
        if self.far_selection not in ("l1", "random"):
            raise ConfigError(f"run config: far selection must be 'l1' or 'random', got "
                              f"{self.far_selection!r}")
        for name in ("registry", "board_names", "target"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"run config: {name} must be a string, got "
                                  f"{getattr(self, name)!r}")
        if self.board_names and not self.registry:
            raise ConfigError("run config: board_names picks boards of a registry: set registry "
                              "= \"KEYS/boards.json\" too")
        if not isinstance(self.far_freeze_embeddings, bool):
            raise ConfigError(f"run config: far freeze_embeddings must be true or false, got "
                              f"{self.far_freeze_embeddings!r}")
        if self.mode != "sync":
            raise ConfigError(f"run config: mode {self.mode!r} is not supported by runs; use "
                              f"'sync' (async 2BW has no consistent step boundary to checkpoint)")
        if self.stages and self.split:
            raise ConfigError("run config: give either stages or split, not both")
        if self.stages > self.boards:
            raise ConfigError(f"run config: {self.stages} stages need at least {self.stages} "
                              f"boards; raise boards or lower stages")
        if self.split and len(self.split.split(",")) > self.boards:
            raise ConfigError(f"run config: split {self.split!r} has more stages than the "
                              f"{self.boards} boards; raise boards")

    @property
    def warmup_steps(self) -> int:
        return max(1, self.steps // 10) if self.warmup < 0 else self.warmup

    @property
    def budget_bytes(self) -> int | None:
        return int(self.budget_mib * (1 << 20)) if self.budget_mib else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "run config") -> RunConfig:
        known = {f.name for f in fields(cls)}
        d = _flatten_far(d, where)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown keys {unknown}; known keys: {sorted(known)}")
        kw = dict(d)
        for f in fields(cls):      # TOML integers are fine where floats are expected
            if f.name in kw and f.type == "float" and type(kw[f.name]) is int:
                kw[f.name] = float(kw[f.name])
        return cls(**kw)

    @classmethod
    def from_toml(cls, path: str | Path) -> RunConfig:
        """Read a run.toml (flat keys; see the module docstring)."""
        path = Path(path)
        try:
            d = tomllib.loads(path.read_text())
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the run config ({e})") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e}); write flat `key = value` lines "
                              f"such as `steps = 60`") from e
        return cls.from_dict(d, where=str(path))

    @classmethod
    def from_json(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: cannot read the run's config ({e})") from e
        return cls.from_dict(d, where=str(path))

    def replace(self, **kw: Any) -> RunConfig:
        return dataclasses.replace(self, **kw)


def _flatten_far(d: dict[str, Any], where: str) -> dict[str, Any]:
    """A run.toml `[far]` table -> the flat far_* keys."""
    if "far" not in d:
        return d
    far = d["far"]
    if not isinstance(far, dict):
        raise ConfigError(f"{where}: far must be a table such as `[far]` then `retention = 0.4`, "
                          f"got {far!r}")
    bad = sorted(set(far) - {"retention", "priming", "selection", "freeze_embeddings"})
    if bad:
        raise ConfigError(f"{where}: unknown keys {bad} in [far]; known: freeze_embeddings, "
                          f"priming, retention, selection")
    out = {k: v for k, v in d.items() if k != "far"}
    out.update({f"far_{k}": v for k, v in far.items()})
    return out
