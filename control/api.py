"""The notebook-facing API: connect to boards, plan, train in the background, watch, export.

A thin layer over control.partition (the planner), control.run (runs with checkpoints, events and
recovery) and control.dashboard (the live view). Every call also works from a script.

Examples
--------
>>> from control.api import connect                                     # doctest: +SKIP
>>> session = connect(boards=2)                                         # doctest: +SKIP
>>> plan = session.plan(batch=4, seq=32)                                # doctest: +SKIP
>>> run = session.train(steps=20, batch=4, seq=32, split=plan.to_split(),  # doctest: +SKIP
...                     run_dir="runs/nb")                                # doctest: +SKIP
>>> run.dashboard()                                                     # doctest: +SKIP
>>> run.pause(); run.resume()                                           # doctest: +SKIP
>>> result = run.result()          # waits for the end                  # doctest: +SKIP
>>> run.export_hf("runs/nb/hf_model")                                   # doctest: +SKIP
"""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from control.dashboard import Dashboard
from control.dashboard_state import DashState
from control.events import EventLog
from control.partition import MIB, BoardSpec, PartitionPlan, bert_costs, plan
from control.run_config import RunConfig
from edgert.errors import ConfigError

__all__ = ["RunHandle", "RunResult", "Session", "connect"]

LABELS = ("negative", "positive")     # Rotten Tomatoes sentence polarity


def _model_dir(model: str | Path | None) -> Path:
    from compiler.hf import default_model_dir

    return Path(model) if model else default_model_dir()


def _budget(p: BoardSpec) -> str:
    return "unlimited" if p.budget_bytes is None else f"{p.budget_bytes / MIB:.0f} MiB"


@dataclass
class Session:
    """Boards to train on: `n_boards` local board processes, described by `profiles` for planning.

    Create it with `connect`. Local boards are started per run (`train`) and stopped when it ends.
    """

    profiles: tuple[BoardSpec, ...]
    model: str = ""

    @property
    def n_boards(self) -> int:
        return len(self.profiles)

    @property
    def budget_mib(self) -> float:
        """The per-board budget runs enforce: RunConfig has one budget for all boards, so the
        smallest of the profiles' budgets (0 = unlimited)."""
        return min((p.budget_bytes for p in self.profiles if p.budget_bytes), default=0) / MIB

    def dims(self) -> Any:
        """The model's shapes (compiler.model_spec.ModelDims) from its config.json."""
        from compiler.hf import read_config
        from compiler.model_spec import ModelDims

        return ModelDims.from_config(read_config(_model_dir(self.model)), len(LABELS))

    def plan(self, batch: int = 8, seq: int = 64, micro_batches: int = 2, *,
             search_order: bool = False, **kw: Any) -> PartitionPlan:
        """Split the model's layers over the boards (memory-aware, bottleneck-minimising).

        Parameters
        ----------
        batch, seq : int
            Micro-batch shape (sequences x tokens).
        micro_batches : int
            Micro-batches per optimizer step (how many activations 1F1B keeps in flight).
        search_order : bool
            Also try every order of the boards in the pipeline.
        **kw
            Passed to control.partition.plan (e.g. `links=Links(bandwidth=...)`).

        Returns
        -------
        PartitionPlan
            `.explain()` shows per stage layers, time, memory against budget and why;
            `.to_split()` is the split to train with.

        Raises
        ------
        control.partition.PlanError
            If no split fits the budgets (the message says which board is short, and by how much).

        Examples
        --------
        >>> s = connect(profiles=[BoardSpec("big", 900 << 20), BoardSpec("small", 300 << 20)])
        >>> p = s.plan(batch=8, seq=64)
        >>> p.boards, p.feasible
        (['big', 'small'], True)
        """
        costs = bert_costs(self.dims(), batch, seq)
        return plan(costs, list(self.profiles), micro_batches, search_order=search_order, **kw)

    def config(self, config: RunConfig | None = None, **overrides: Any) -> RunConfig:
        """A RunConfig for these boards: `config` (or the defaults) with `overrides` applied."""
        base = config or RunConfig(boards=self.n_boards, budget_mib=self.budget_mib,
                                   model=self.model)
        unknown = sorted(set(overrides) - set(base.to_dict()))
        if unknown:
            raise ConfigError(f"train(): unknown settings {unknown}; known: "
                              f"{sorted(base.to_dict())}")
        return base.replace(**overrides)

    def train(self, config: RunConfig | None = None, *, run_dir: str | Path | None = None,
              background: bool = True, **overrides: Any) -> RunHandle:
        """Fine-tune on the boards; returns at once (background) with a handle to watch it.

        Parameters
        ----------
        config : RunConfig, optional
            Every setting of the run; default: `RunConfig()` for this session's boards.
        run_dir : path, optional
            Run directory (config, events.jsonl, checkpoints, report); default
            `runs/<time stamp>`. An existing run directory with the same config is continued.
        background : bool
            Train in a background thread (the notebook stays responsive). False: return when done.
        **overrides
            RunConfig fields, e.g. `steps=20, batch=4, seq=32, split="0:3,3:6"`.

        Returns
        -------
        RunHandle

        Examples
        --------
        >>> run = connect(boards=2).train(steps=10, batch=4, seq=32)   # doctest: +SKIP
        >>> run.dashboard()                                             # doctest: +SKIP
        """
        from control.run import Run

        cfg = self.config(config, **overrides)
        run_dir = Path(run_dir) if run_dir else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
        handle = RunHandle(Run(cfg, run_dir))
        if background:
            handle.run.start_background()
        else:
            handle.run.start()
        return handle

    def __repr__(self) -> str:
        b = ", ".join(f"{p.name} ({_budget(p)})" for p in self.profiles)
        model = self.model or "all-MiniLM-L6-v2"
        return f"Session({self.n_boards} local boards: {b}; model {model})"

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{html.escape(p.name)}</td><td>{_budget(p)}</td><td>{p.gflops:.0f}</td></tr>"
            for p in self.profiles)
        return (f"<div><b>edgert session</b>: {self.n_boards} local boards, model "
                f"{html.escape(self.model or 'all-MiniLM-L6-v2')}<table><tr><th>board</th>"
                f"<th>memory budget</th><th>GFLOP/s (modelled)</th></tr>{rows}</table></div>")


def connect(boards: int = 2, *, budget_mib: float = 0.0,
            profiles: Sequence[BoardSpec] | None = None, model: str | Path = "") -> Session:
    """Describe the boards to train on.

    Parameters
    ----------
    boards : int
        Local board processes (`edgert serve` on 127.0.0.1, CURVE ZeroMQ), started per run.
    budget_mib : float
        Memory budget of each local board in MiB (0 = unlimited); boards refuse a stage over it.
    profiles : list of control.partition.BoardSpec, optional
        Instead of `boards`: one profile per board (name, memory budget, speed) for the planner.
        Runs start one local process per profile. Remote boards by address are not supported yet.
    model : path, optional
        A Hugging Face BERT folder; default: the installed all-MiniLM-L6-v2.

    Returns
    -------
    Session

    Raises
    ------
    ConfigError
        For a board count below 1 or a negative budget.

    Examples
    --------
    >>> connect(boards=2, budget_mib=600)
    Session(2 local boards: board0 (600 MiB), board1 (600 MiB); model all-MiniLM-L6-v2)
    >>> phone, pi = BoardSpec("phone", 512 << 20, gflops=20.0), BoardSpec("pi", 2 << 30)
    >>> connect(profiles=[phone, pi]).n_boards
    2
    """
    if profiles is not None:
        profiles = tuple(profiles)
        if not profiles or not all(isinstance(p, BoardSpec) for p in profiles):
            raise ConfigError("connect(profiles=...): give a non-empty list of "
                              "control.partition.BoardSpec, e.g. [BoardSpec('phone', 512 << 20)]")
        return Session(profiles, str(model or ""))
    if type(boards) is not int or boards < 1:
        raise ConfigError(f"connect(boards={boards!r}): need an integer >= 1 (local board "
                          f"processes)")
    if budget_mib < 0:
        raise ConfigError(f"connect(budget_mib={budget_mib}): must be >= 0 (0 = unlimited)")
    budget = int(budget_mib * MIB) if budget_mib else None
    return Session(tuple(BoardSpec(f"board{i}", budget) for i in range(boards)), str(model or ""))


@dataclass
class RunResult:
    """What a finished (or stopped) run achieved, read from its events."""

    run_dir: Path
    state: str
    steps: int
    losses: list[float]
    evals: list[dict[str, Any]]
    boards: dict[str, dict[str, Any]] = field(default_factory=dict)
    alerts: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    @classmethod
    def from_state(cls, run_dir: Path, s: DashState) -> RunResult:
        boards = {n: {"stage": b.stage, "peak_rss_mib": b.peak_rss_mib, "budget_mib": b.budget_mib,
                      "alive": b.alive} for n, b in s.boards.items()}
        return cls(Path(run_dir), s.state, s.step, list(s.losses), list(s.evals), boards,
                   [a.text for a in s.alerts], s.elapsed_s())

    @property
    def accuracy(self) -> tuple[float | None, float | None]:
        """Held-out accuracy at the first and the last evaluation."""
        acc = [e["accuracy"] for e in self.evals if e.get("accuracy") is not None]
        return (acc[0], acc[-1]) if acc else (None, None)

    def __repr__(self) -> str:
        a0, a1 = self.accuracy
        acc = "" if a0 is None else f", held-out accuracy {100 * a0:.1f}% -> {100 * a1:.1f}%"
        loss = f", train loss {self.losses[0]:.4f} -> {self.losses[-1]:.4f}" if self.losses else ""
        return (f"RunResult({self.state}, {self.steps} steps in {self.elapsed_s:.0f}s{loss}{acc}, "
                f"{len(self.boards)} boards, {len(self.alerts)} alerts)")

    def _repr_html_(self) -> str:
        def peak(b: dict[str, Any]) -> str:
            return "-" if b["peak_rss_mib"] is None else f"{b['peak_rss_mib']:.0f}"

        rows = "".join(
            f"<tr><td>{html.escape(n)}</td><td>{b['stage']}</td><td>{peak(b)}</td>"
            f"<td>{b['budget_mib'] or 'unlimited'}</td></tr>" for n, b in self.boards.items())
        return (f"<div><b>{html.escape(repr(self))}</b><table><tr><th>board</th><th>stage</th>"
                f"<th>peak RSS MiB</th><th>budget MiB</th></tr>{rows}</table>"
                f"<small>run directory {html.escape(str(self.run_dir))}</small></div>")


class RunHandle:
    """A run in progress (or done): watch it, steer it, collect its result.

    Attributes
    ----------
    run : control.run.Run
    events : control.events.EventLog
        Every event the run emits (also in `run_dir`/events.jsonl).
    """

    def __init__(self, run: Any) -> None:
        self.run = run
        self.events: EventLog = run.events
        self.run_dir = Path(run.dir)
        self.config: RunConfig = run.config
        self._dash: Dashboard | None = None

    def dashboard(self, fps: float = 3.0) -> Dashboard:
        """The live dashboard of this run (one per handle; display it in a notebook cell)."""
        if self._dash is None:
            self._dash = Dashboard(self.events, fps=fps, title=f"edgert run {self.run_dir}",
                                   total_steps=self.config.steps)
        return self._dash

    def pause(self) -> None:
        """Hold at the next step boundary (boards stay loaded)."""
        self.run.pause()

    def resume(self) -> None:
        """Continue after `pause`."""
        self.run.resume()

    def stop(self) -> None:
        """Stop at the next step boundary after a checkpoint; `Run.resume(run_dir)` continues."""
        self.run.stop()

    @property
    def done(self) -> bool:
        t = getattr(self.run, "_thread", None)
        return t is None or not t.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the run ends (True) or `timeout` s pass (False); raises the run's error."""
        return bool(self.run.wait(timeout))

    def result(self, timeout: float | None = None) -> RunResult:
        """Wait for the end of the run and summarise it.

        Raises
        ------
        TimeoutError
            If the run is still going after `timeout` seconds.
        """
        if not self.wait(timeout):
            raise TimeoutError(f"run {self.run_dir} still running after {timeout} s; call "
                               f"result() again, or stop() it")
        if self._dash is not None:
            self._dash.refresh()
        return RunResult.from_state(self.run_dir, DashState.from_events(self.events.events()))

    def classify(self, texts: Sequence[str]) -> Any:
        """Class probabilities [len(texts), 2] from the run's newest checkpoint, computed by the
        run's compiled stages in this process (dropout off); columns follow `LABELS`.

        Examples
        --------
        >>> run.classify(["a gripping, beautifully acted film"]).round(2)   # doctest: +SKIP
        array([[0.08, 0.92]])
        """
        import numpy as np

        from control.data import Tokenizer
        from control.local import LocalPipeline

        if isinstance(texts, str) or not texts:
            raise ConfigError("classify(texts): give a non-empty list of sentences")
        bundles = list(self.run.bundles)
        if not bundles or self.run.mode is None:
            raise ConfigError(f"run {self.run_dir} has no compiled stages yet; wait for it to "
                              f"start (or finish) before classify()")
        pipe = LocalPipeline(bundles, run_seed=self.config.seed)
        # The checkpoint loads in the dense layout; FAR stages hold their reconfigured one.
        pipe.load_state(self.run.mode.to_deployed(self.run.final_params()), None, 0)
        tok = Tokenizer(_model_dir(self.config.model) / "tokenizer.json")
        B, T = pipe.batch_size, pipe.seq_len
        padded = list(texts) + [texts[-1]] * (-len(texts) % B)     # the compiled batch is B
        out = []
        for i in range(0, len(padded), B):
            enc = tok.encode(padded[i:i + B], T)
            _, logits = pipe.predict({**enc, "labels": np.zeros(B, np.int64)})
            out.append(logits)
        z = np.concatenate(out)[:len(texts)].astype(np.float64)
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    def export_hf(self, path: str | Path) -> Path:
        """Write the run's newest checkpoint as a Hugging Face BertForSequenceClassification folder.

        Examples
        --------
        >>> out = run.export_hf("runs/nb/hf_model")                    # doctest: +SKIP
        >>> from transformers import BertForSequenceClassification      # doctest: +SKIP
        >>> BertForSequenceClassification.from_pretrained(out)          # doctest: +SKIP
        """
        return self.run.export_hf(path)

    def __repr__(self) -> str:
        s = DashState.from_events(self.events.events())
        return (f"RunHandle({str(self.run_dir)!r}, {s.state}, step {s.step}/{self.config.steps}"
                + (f", loss {s.losses[-1]:.4f}" if s.losses else "") + ")")

    def _repr_html_(self) -> str:
        return f"<pre>{html.escape(repr(self))}</pre>"
