"""A job without a run directory (`edgert train`, `edgert lm`): open the boards, step the one loop
(control/loop.py) with a progress bar on stderr, and keep what the job's report needs.

No checkpoints, so no recovery: a lost board ends the job with its error. For checkpoints,
recovery and resume, the same loop runs inside a run directory (control/run.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from control.connect import ClusterConfig, open_cluster
from control.events import EventLog
from control.loop import Job, Loop, LoopConfig, Mode, stage_boards
from control.progress import StepBar


@dataclass
class Outcome:
    """What a job's loop did: per-step losses and seconds, evaluations, boards, final weights."""

    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)   # {step, loss, ...}, first = before
    boards: list[dict[str, Any]] = field(default_factory=list)  # control.loop.stage_boards
    params: dict[str, np.ndarray] = field(default_factory=dict)  # final, deployed layout
    opt: dict[str, np.ndarray] = field(default_factory=dict)     # AdamW moments (keep_optimizer)
    events: EventLog = field(default_factory=EventLog)

    def metrics(self, i: int, keys: tuple[str, ...] = ("loss", "accuracy", "examples")
                ) -> dict[str, Any]:
        """Evaluation `i` (0: before training, -1: after) without its step."""
        return {k: self.evals[i][k] for k in keys if k in self.evals[i]}


def train(job: Job, mode: Mode, where: ClusterConfig, ranges: list[tuple[int, int]],
          bundle_dir: Path, *, steps: int, seed: int, label: str = "train",
          progress: bool = True, keep_optimizer: bool = False) -> Outcome:
    """Step `job` for `steps` steps on the boards of `where` (one stage per range), evaluating
    before and after; the bundles of the dense layout go to `bundle_dir`. The final weights (and
    with `keep_optimizer` the AdamW moments) come back in the deployed layout.

    Examples
    --------
    >>> where = ClusterConfig(boards=2)                                      # doctest: +SKIP
    >>> out = train(job, Dense(compile_fn), where, [(0, 3), (3, 6)],         # doctest: +SKIP
    ...             Path("runs/x/bundles"), steps=60, seed=0)
    >>> out.losses[-1], out.metrics(-1)["accuracy"]                          # doctest: +SKIP
    """
    events = EventLog()
    if progress:
        events.subscribe(StepBar(steps, label))
    res = Outcome(events=events)
    with open_cluster(where, run_seed=seed, announce=progress) as cluster:
        loop = Loop(job, mode, cluster, LoopConfig(steps=steps, run_seed=seed),
                    bundle_dir=lambda split: bundle_dir, events=events)
        try:
            loop.run(ranges)
        except BaseException:
            loop.set_state("failed")
            raise
        res.boards = stage_boards(cluster)
        res.params, res.opt = loop.gather(keep_optimizer)
    res.losses = [float(e.data["loss"]) for e in events.of("step")]
    res.step_seconds = [float(e.data["step_s"]) for e in events.of("step")]
    res.evals = [dict(e.data) for e in events.of("eval")]
    return res
