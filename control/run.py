"""An unattended fine-tuning run: run directory, checkpoints, events, recovery from lost boards.

    from control.run import Run, RunConfig
    run = Run(RunConfig(steps=60, checkpoint_every=10), "runs/overnight")
    run.start_background()            # the notebook stays responsive; watch run.events
    run.pause(); run.resume(); run.stop()
    Run.resume("runs/overnight")      # after the controller died: continue from its directory

Run directory (see docs/runs.md)::

    config.json  events.jsonl  metrics.json  report.json  report.html
    checkpoints/step-<N>/       (control/checkpoint.py; the newest 2 are kept)
    bundles/<split>/stage<i>/   compiled stages of every split the run used
    boards/                     the local boards' keys, work directories and logs

[Note: recovery] A sync step either completes on every board or not at all (1F1B with a flush),
so the state after step N is consistent; checkpoints are taken there. When a step fails
(BoardError: a board process died, refused, or did not answer within `timeout_s`), the run finds
the lost boards (dead process, or no HELLO reply within 10 s), removes them, re-plans the model
over the survivors with control.partition.plan (their memory budgets; fewer stages), compiles the
new split (libraries come from the compile cache), LOADs it on the surviving processes in place,
loads the last checkpoint and redoes the steps since. Data order and dropout seeds are pure
functions of (seed, step, micro-batch), so the redone steps compute the same thing.

The training itself is the one loop (control/loop.py) with checkpoints, recovery and live
re-planning switched on; this module owns the run directory around it.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np

from control import checkpoint as ckpt
from control.connect import ClusterConfig, open_cluster
from control.events import EventLog
from control.loop import Loop, LoopConfig, Mode
from control.run_config import RunConfig
from edgert.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["Run", "RunConfig"]


class _Hybrid:
    """`Run.resume(run_dir)` on the class (continue a run directory); `run.resume()` on an
    instance (un-pause)."""

    def __init__(self, on_class: Any, on_instance: Any) -> None:
        self.on_class, self.on_instance = on_class, on_instance
        self.__doc__ = on_instance.__doc__

    def __get__(self, obj: Any, owner: type) -> Any:
        if obj is None:
            return self.on_class.__get__(owner, owner)
        return self.on_instance.__get__(obj, owner)


class Run:
    """A fine-tuning run on local boards with checkpoints, events and automatic recovery.

    Parameters
    ----------
    config : RunConfig, optional
        Defaults to `RunConfig()` (MiniLM-L6 on Rotten Tomatoes, 2 boards).
    run_dir : path
        The run directory. If it already holds a run with the same config, `start` continues it
        from its newest valid checkpoint; a different config raises ConfigError.

    Attributes
    ----------
    events : control.events.EventLog
        Every state, plan, step, eval, board, checkpoint and alert event (also in events.jsonl).
    step : int
        Optimizer steps done.

    Examples
    --------
    >>> cfg = RunConfig(steps=8, batch=2, seq=16, checkpoint_every=2)
    >>> run = Run(cfg, "runs/t")                                    # doctest: +SKIP
    >>> run.start()                                                 # doctest: +SKIP
    >>> run.events.last("step").data["loss"]                        # doctest: +SKIP
    0.69
    """

    def __init__(self, config: RunConfig | None = None, run_dir: str | Path = "runs/run") -> None:
        self.config = config or RunConfig()
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        saved = self.dir / "config.json"
        if saved.is_file():
            old = RunConfig.from_json(saved)
            if old != self.config:
                diff = {k: (v, self.config.to_dict()[k]) for k, v in old.to_dict().items()
                        if self.config.to_dict()[k] != v}
                raise ConfigError(f"{self.dir} holds a run with another config (differs in "
                                  f"{diff}, saved vs given); use another run directory, or "
                                  f"continue it with `edgert resume {self.dir}`")
        else:
            saved.write_text(json.dumps(self.config.to_dict(), indent=1))
        self.events = EventLog(self.dir / "events.jsonl")
        self.state = "created"
        self.error: BaseException | None = None
        self.loop: Loop | None = None      # the training loop, from `start` on
        self.mode: Mode | None = None      # dense, or control.far.FarMode
        self._stop = threading.Event()
        self._unpaused = threading.Event()
        self._unpaused.set()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return (f"Run({str(self.dir)!r}, state={self.state!r}, step={self.step}/"
                f"{self.config.steps}, recoveries={len(self.recoveries)})")

    # ---- what the loop knows ---------------------------------------------------------------------
    @property
    def step(self) -> int:
        """Optimizer steps done."""
        return self.loop.step if self.loop is not None else 0

    @property
    def cluster(self) -> Any:
        """The boards (control.connect.open_cluster) while the run trains, else None."""
        return self.loop.cluster if self.loop is not None else None

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return self.loop.ranges if self.loop is not None else []

    @property
    def bundles(self) -> list[Path]:
        """The deployed stage bundles."""
        return self.loop.bundles if self.loop is not None else []

    @property
    def recoveries(self) -> list[dict[str, Any]]:
        return self.loop.recoveries if self.loop is not None else []

    @property
    def replans(self) -> list[dict[str, Any]]:
        return self.loop.replans if self.loop is not None else []

    # ---- control (thread-safe) ------------------------------------------------------------------
    def start(self) -> Run:
        """Train in the calling thread until finished or stopped; returns self."""
        self.error = None
        try:
            self._train()
        except BaseException as e:
            self.error = e
            raise
        return self

    run = start

    def start_background(self) -> threading.Thread:
        """Train in a daemon thread (a notebook stays responsive); see `wait`, `error`."""
        if self._thread is not None and self._thread.is_alive():
            raise ConfigError(f"{self.dir}: this run is already running")

        def body() -> None:
            try:
                self.start()
            except BaseException as e:  # noqa: BLE001 - kept in self.error for the caller
                log.error("run %s failed: %s", self.dir, e)

        self._thread = threading.Thread(target=body, name=f"run:{self.dir.name}", daemon=True)
        self._thread.start()
        return self._thread

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a background run; True if it has ended. Raises its error, if any."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return False
        if self.error is not None:
            raise self.error
        return True

    def pause(self) -> None:
        """Hold the run at the next step boundary (boards stay loaded)."""
        self._unpaused.clear()

    def _unpause(self) -> None:
        """Continue a paused run."""
        self._unpaused.set()

    def stop(self) -> None:
        """Stop at the next step boundary, after writing a checkpoint; `Run.resume` continues."""
        self._stop.set()
        self._unpaused.set()

    @classmethod
    def _resume_dir(cls, run_dir: str | Path, background: bool = False) -> Run:
        """Continue the run in `run_dir` from its newest valid checkpoint (same data order and
        seeds). Trains in the calling thread unless `background`; returns the Run."""
        saved = Path(run_dir) / "config.json"
        if not saved.is_file():
            raise ConfigError(f"{run_dir} is not a run directory (no config.json); start one with "
                              f"`edgert run [run.toml] --out {run_dir}`")
        run = cls(RunConfig.from_json(saved), run_dir)
        if background:
            run.start_background()
        else:
            run.start()
        return run

    resume = _Hybrid(_resume_dir, _unpause)

    # ---- training -----------------------------------------------------------------------------
    def _train(self) -> None:
        """Run to `config.steps` (or until stopped), recovering from lost boards by itself."""
        from control.run_report import write_report

        cfg, opened = self.config, False
        self._set_state("starting")
        try:
            from control.job import load_model, make_job

            model = load_model(cfg.model or None, num_labels=2, head_seed=cfg.seed)
            job = make_job(model, steps=cfg.steps, batch=cfg.batch,
                           micro_batches=cfg.micro_batches, seq=cfg.seq, lr=cfg.lr,
                           eval_examples=cfg.eval_examples, seed=cfg.seed,
                           warmup_steps=cfg.warmup_steps)
            c = self.latest_checkpoint()
            if c is not None:
                self.alert("info", f"continuing from checkpoint step {c.step} ({c.path})")
            self.mode = _mode(cfg, model, self.dir)
            with open_cluster(_where(cfg, self.dir / "boards"), run_seed=cfg.seed) as cluster:
                opened = True
                self.loop = Loop(job, self.mode, cluster, _loop_config(cfg, self),
                                 bundle_dir=lambda split: self.dir / "bundles" / _dir_name(split),
                                 events=self.events, meta={"config": cfg.to_dict()},
                                 planner=_planner(cfg, model), on_state=self._set_state,
                                 stop=self._stop, unpaused=self._unpaused)
                self.loop.run(self._initial_ranges(model.dims.layers), c)
        except BaseException as e:
            self._set_state("failed", note=f"{type(e).__name__}: {e}")
            raise
        finally:
            if self.loop is not None:
                self.loop.cluster = None
            if opened:
                for d in (self.dir / "boards").glob("board*"):   # uploaded copies; keep the logs
                    if d.is_dir():
                        shutil.rmtree(d, ignore_errors=True)
            try:
                write_report(self)
            except Exception as e:  # noqa: BLE001 - a report must not hide the run's own error
                log.warning("could not write the report of %s: %s", self.dir, e)

    def _initial_ranges(self, layers: int) -> list[tuple[int, int]]:
        """The config's split or stages, else the memory-aware planner over every board."""
        from compiler.model_spec import parse_split

        cfg = self.config
        if cfg.split or cfg.stages:
            return parse_split(cfg.split or None, cfg.stages or None, layers)
        assert self.loop is not None and self.loop.planner is not None
        names = [b.name for b in self.loop.cluster.boards]
        p = self.loop.planner.plan_over(names)
        log.info("plan over %s:\n%s", names, p.explain())
        return p.ranges

    # ---- helpers used by the loop -----------------------------------------------------------
    def _set_state(self, state: str, **kw: Any) -> None:
        self.state = state
        self.events.emit("state", state=state, step=self.step, **kw)

    def alert(self, level: str, text: str) -> None:
        (log.warning if level != "info" else log.info)("%s: %s", self.dir, text)
        self.events.emit("alert", level=level, text=text)

    @property
    def checkpoint_dir(self) -> Path:
        return self.dir / "checkpoints"

    def latest_checkpoint(self) -> ckpt.Checkpoint | None:
        return ckpt.latest(self.checkpoint_dir, warn=lambda t: self.alert("warning", t))

    def final_params(self) -> dict[str, np.ndarray]:
        """The weights of the newest valid checkpoint (fused internal names)."""
        c = self.latest_checkpoint()
        if c is None:
            raise ConfigError(f"{self.dir} has no valid checkpoint yet")
        return c.load()[0]

    def export_hf(self, path: str | Path) -> Path:
        """The newest checkpoint as a Hugging Face BertForSequenceClassification folder."""
        from compiler.export import export_hf
        from compiler.hf import default_model_dir, read_config
        from compiler.model_spec import split_qkv

        model = Path(self.config.model) if self.config.model else default_model_dir()
        return export_hf(path, read_config(model), split_qkv(self.final_params()), model, 2,
                         id2label=["negative", "positive"])


# ---- a run config, as the loop's parts -----------------------------------------------------------

def _where(cfg: RunConfig, workdir: Path) -> ClusterConfig:
    """The run's boards: local processes, or the first `boards` of a registry."""
    return ClusterConfig(boards=cfg.boards, registry=cfg.registry,
                         board_names=tuple(n for n in cfg.board_names.split(",") if n),
                         threads=cfg.threads, budget_mib=cfg.budget_mib,
                         timeout_s=cfg.timeout_s, workdir=workdir)


def _loop_config(cfg: RunConfig, run: Run) -> LoopConfig:
    return LoopConfig(steps=cfg.steps, checkpoint_dir=run.checkpoint_dir,
                      checkpoint_every=cfg.checkpoint_every, keep_checkpoints=cfg.keep_checkpoints,
                      eval_every=cfg.eval_every, board_every=cfg.board_every,
                      max_recoveries=cfg.max_recoveries, budget_mib=cfg.budget_mib,
                      run_seed=cfg.seed, where=str(run.dir))


def _mode(cfg: RunConfig, model: Any, run_dir: Path) -> Mode:
    """Dense stages, or FAR ([Note: FAR in runs] in control/far.py; imported only then)."""
    from control.job import compile_bundles
    from control.modes import Dense

    kw = {"batch": cfg.batch, "seq": cfg.seq, "target": cfg.target}

    def compile_dense(split: str, out: Path) -> list[Path]:
        return compile_bundles(model, out, progress=False, split=split, **kw)

    if not cfg.far_retention:
        return Dense(compile_dense)
    from control.far import FarConfig, FarMode

    far = FarConfig(retention=cfg.far_retention, priming_fraction=cfg.far_priming,
                    selection=cfg.far_selection, seed=cfg.seed,
                    freeze_embeddings=cfg.far_freeze_embeddings)
    return FarMode(far, model, cfg.steps, compile_dense, plan_file=run_dir / "far_plan.json",
                   **kw)


def _planner(cfg: RunConfig, model: Any) -> Any:
    """The memory-aware planner with the run's budget and drift watch (control/replan.py)."""
    from control.partition import bert_costs
    from control.replan import Drift, Planner

    return Planner(bert_costs(model.dims, cfg.batch, cfg.seq), cfg.budget_bytes,
                   cfg.micro_batches, Drift(cfg.replan_drift, cfg.replan_patience))


def _dir_name(split: str) -> str:
    return split.replace(":", "-").replace(",", "_")
