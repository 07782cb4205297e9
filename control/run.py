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
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from control import checkpoint as ckpt
from control.events import EventLog
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
        self.step = 0
        self.state = "created"
        self.error: BaseException | None = None
        self.recoveries: list[dict[str, Any]] = []
        self._attempts = 0                 # recovery attempts, successful or not
        self.cluster: Any = None           # control.cluster.LocalCluster while running
        self.ranges: list[tuple[int, int]] = []
        self._stop = threading.Event()
        self._unpaused = threading.Event()
        self._unpaused.set()
        self._thread: threading.Thread | None = None
        self._pipe: Any = None             # in-process LocalPipeline for held-out evaluation
        self._bundles: list[Path] = []
        self._job: Any = None              # control.run_loop.Job while running

    def __repr__(self) -> str:
        return (f"Run({str(self.dir)!r}, state={self.state!r}, step={self.step}/"
                f"{self.config.steps}, recoveries={len(self.recoveries)})")

    # ---- control (thread-safe) ------------------------------------------------------------------
    def start(self) -> Run:
        """Train in the calling thread until finished or stopped; returns self."""
        from control.run_loop import train

        self.error = None
        try:
            train(self)
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

    # ---- helpers used by control.run_loop -------------------------------------------------------
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


def threads_per_board(cfg: RunConfig) -> int:
    return cfg.threads or max(1, len(os.sched_getaffinity(0)) // cfg.boards)
