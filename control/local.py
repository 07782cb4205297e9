"""The in-process runner: K compiled stages in this process, run by the boards' own executor.

Each stage gets what a board gets (edgert/board.py): an `edgert.executor.StepRun` over its row of
the schedule (edgert/schedule.py), its AdamW moments and an inbox; the K executors exchange the
same ACT/GRAD/BATCH messages as boards, through an in-process hub (`edgert.transport.InprocHub`)
instead of ZeroMQ. The schedule therefore exists once, and this runner computes what the boards
compute, bit for bit: it is the reference every distributed run is checked against.

One training step takes `micro_batches` batches through sync 1F1B (PipeDream-Flush): gradients are
accumulated with the loss scaled by 1/micro_batches, so the step is exactly one large-batch step,
then every stage's AdamW runs in place. Held-out evaluation runs a forward-only timeline (dropout
off); `forward_backward` / `grads` run one micro-batch without the optimizer (gradient checks).

The optimizer schedule (`OptimConfig`, whose `hyper` is the vector the compiled AdamW reads) and the
dropout seeds (`step_seed`, `seed_vec`, edgert/contract.py) are computed here for the boards too: see
[Note: seeds and hyper-parameters come from the controller] in edgert/executor.py.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgert.contract import ACTIVATION, adamw_hyper, seed_vec, step_seed
from edgert.errors import ConfigError, ScheduleError
from edgert.executor import Inbox, OptimizerState, StepContext, StepPlan, StepRun
from edgert.protocol import Kind, Message
from edgert.runtime import TvmStage, to_dev, to_np
from edgert.schedule import Op, Schedule, add_comms, add_step, one_f_one_b
from edgert.transport import InprocHub, InprocTransport

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class OptimConfig:
    """AdamW with linear warm-up and linear decay (Hugging Face Trainer's default schedule)."""

    lr: float = 1e-4
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 0
    total_steps: int = 0          # 0 = constant learning rate after warm-up

    def __post_init__(self):
        if not self.lr > 0:
            raise ConfigError(f"learning rate must be > 0, got {self.lr}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"betas must be in [0, 1), got {self.beta1}, {self.beta2}")

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step `step` (1-based)."""
        if self.warmup_steps and step <= self.warmup_steps:
            return self.lr * step / self.warmup_steps
        if self.total_steps:
            left = max(0, self.total_steps - step)
            return self.lr * left / max(1, self.total_steps - self.warmup_steps)
        return self.lr

    def hyper(self, step: int, grad_scale: float = 1.0) -> np.ndarray:
        """The vector the compiled AdamW reads (edgert.contract.HYPER)."""
        return adamw_hyper(self.lr_at(step), self.beta1, self.beta2, self.eps, self.weight_decay,
                           step, grad_scale)


EVAL_SEED = seed_vec(1, False)     # dropout off: evaluation, gradient checks


def _run_splits_unsplit(bundles: Sequence[Path | str], threads: int | None) -> None:
    """Head-split bundles (docs/head_split.md) call the board's attention functions; in this
    process they run unsplit (k = H, the full-head kernel on this process's thread pool) unless
    the caller installed an executor for this shape (edgert.head_split.executor.install). All stages
    of a model share one attention shape, so one executor serves every stage."""
    from edgert.artifact import load_manifest
    from edgert.head_split import executor as hsx

    for b in bundles:
        m = load_manifest(Path(b), verify=False)
        if hsx.has_split(m):
            shape, _ = hsx.attn_shape(m)
            ex = hsx.active()
            if ex is None or ex.shape != shape:   # else: one the caller installed (any k)
                hsx.start_for_stage(Path(b), m, hsx.SplitOptions(k=shape.H), board="local",
                                    threads=threads)
            return


def stage_inputs(stage: TvmStage, batch: dict[str, np.ndarray], hidden) -> list:
    """The data inputs a stage's forward takes, from the batch and the previous stage's output."""
    out = []
    for meta in stage.manifest.data_inputs:
        out.append(hidden if meta.name == ACTIVATION
                   else np.ascontiguousarray(batch[meta.name], np.int64))
    return out


def forward_only(s: Schedule) -> Schedule:
    """A schedule's forward half: its F, SEND_F and RECV_F actions in place (evaluation)."""
    keep = (Op.F, Op.SEND_F, Op.RECV_F)
    return {k: [a if a is not None and a.op in keep else None for a in line]
            for k, line in s.items()}


class LocalPipeline:
    """Stages from bundle directories, in order, run in this process by K executors.

    The same interface as a board cluster (control/cluster.py): `deploy`, `train_step`, `params`,
    `optimizer_state`, `load_state`, `step`; plus `predict` / `evaluate` and gradient checks.

    Examples
    --------
    >>> pipe = LocalPipeline(["build/stage0", "build/stage1"])      # doctest: +SKIP
    >>> loss = pipe.train_step([batch0, batch1], OptimConfig())     # doctest: +SKIP
    """

    def __init__(self, bundles: Sequence[Path | str] | None = None, threads: int | None = None,
                 run_seed: int = 0):
        self.threads, self.run_seed = threads, run_seed
        self.stages: list[TvmStage] = []
        self.step = 0
        if bundles is not None:
            self.deploy(bundles)

    # ---- deployment -----------------------------------------------------------------------------
    def deploy(self, bundles: Sequence[Path | str], *, micro_batches: int = 0) -> None:
        """Load the stage bundles (replacing any loaded ones) with fresh AdamW state at step 0.

        `micro_batches` is accepted for the cluster's signature: every `train_step` here runs as
        many micro-batches as it is given."""
        if not bundles:
            raise ConfigError("LocalPipeline needs at least one stage bundle")
        self.stages = []                          # free the previous stages first
        _run_splits_unsplit(bundles, self.threads)
        stages = [TvmStage.load(b, threads=self.threads) for b in bundles]
        for i, st in enumerate(stages):
            if st.manifest.index != i or int(st.manifest.stage["num_stages"]) != len(bundles):
                raise ConfigError(f"bundle {bundles[i]} is stage {st.manifest.index} of "
                                  f"{st.manifest.stage['num_stages']}; pass all stages in order")
        self.stages = stages
        self._opt = [OptimizerState(st) for st in stages]
        hub = InprocHub()
        self._ctl = hub.endpoint("controller")
        self._links: list[InprocTransport] = [hub.endpoint(n) for n in self.stage_names]
        self.step = 0

    @property
    def boards(self) -> list[Any]:
        """No board processes: nothing to probe, pin or ask for STATS."""
        return []

    @property
    def stage_names(self) -> list[str]:
        return [f"stage{i}" for i in range(len(self.stages))]

    @property
    def batch_size(self) -> int:
        return int(self.stages[0].manifest.stage["batch"])

    @property
    def seq_len(self) -> int:
        return int(self.stages[0].manifest.stage["seq"])

    # ---- running a schedule ---------------------------------------------------------------------
    def _run(self, sched: Schedule, step: int, micro: Sequence[dict[str, np.ndarray]],
             seeds: Sequence[np.ndarray], hyper: Sequence[np.ndarray], *, group: int = 0,
             keep_outputs: bool = False) -> list[StepRun]:
        """Every stage's executor over its row of `sched`, driven round-robin until all are done."""
        if not self.stages:
            raise ConfigError("no stages loaded: deploy(bundles) first")
        k, n_mb = len(self.stages), len(micro)
        names = self.stage_names
        for i, st in enumerate(self.stages):       # side inputs, as the controller sends BATCH
            side = [t.name for t in st.manifest.data_inputs if t.name != ACTIVATION]
            for j, b in enumerate(micro):
                arrays = {n: np.ascontiguousarray(b[n], np.int64) for n in side}
                self._ctl.send(names[i], Message.make(Kind.BATCH, "local", 0, step=step, stage=i,
                                                      mb=j, arrays=arrays))
        plan = StepPlan(step, tuple(seeds), tuple(hyper))
        inboxes = [Inbox() for _ in range(k)]
        runs = []
        for i, st in enumerate(self.stages):
            ctx = StepContext(i, k, n_mb, "local", names[i - 1] if i else None,
                              names[i + 1] if i < k - 1 else None, group,
                              keep_outputs=keep_outputs and i == k - 1)
            runs.append(StepRun(sched[i], st, self._opt[i], ctx, plan, self._links[i].send))
        while not all(r.done for r in runs):
            moved = False
            for i, r in enumerate(runs):
                while (got := self._links[i].recv(0)) is not None:
                    inboxes[i].put(got[1])
                    moved = True
                pc = r.pc
                r.advance(inboxes[i])
                moved |= r.pc != pc
            if not moved:
                raise ScheduleError("the in-process pipeline is stuck:\n"
                                    + "\n".join(r.grid() for r in runs if not r.done))
        return runs

    def _one(self, batch: dict[str, np.ndarray], seed: np.ndarray, loss_scale: float,
             backward: bool) -> list[StepRun]:
        """One micro-batch through every stage (and back), no optimizer step."""
        group = round(1.0 / loss_scale)
        if not 1.0 / group == loss_scale:
            raise ConfigError(f"loss_scale must be 1/n for an integer n (the executor scales the "
                              f"loss by 1/micro-batches), got {loss_scale}")
        sched = add_comms(one_f_one_b(len(self.stages), 1))
        return self._run(sched if backward else forward_only(sched), 0, [batch], [seed], [],
                         group=group, keep_outputs=True)

    # ---- training -------------------------------------------------------------------------------
    def train_step(self, micro: list[dict[str, np.ndarray]], opt: OptimConfig) -> float:
        """One optimizer step over the given micro-batches; returns their mean loss."""
        self.step += 1
        sched = add_comms(add_step(one_f_one_b(len(self.stages), len(micro))))
        seeds = [seed_vec(step_seed(self.run_seed, self.step, j), True) for j in range(len(micro))]
        runs = self._run(sched, self.step, micro, seeds, [opt.hyper(self.step)])
        losses = runs[-1].result.losses
        loss = float(np.mean([losses[j] for j in range(len(micro))]))
        if not math.isfinite(loss):
            log.warning("step %d: loss is %s", self.step, loss)
        return loss

    def forward_backward(self, batch: dict[str, np.ndarray], seed: np.ndarray,
                         loss_scale: float) -> tuple[float, np.ndarray, list[list[Any]]]:
        """One micro-batch through all stages and back: (loss, logits, grads per stage)."""
        runs = self._one(batch, seed, loss_scale, backward=True)
        res = runs[-1].result
        return res.losses[0], to_np(res.outputs[0][0]).copy(), [r.grads for r in runs]

    def grads(self, batch: dict[str, np.ndarray]) -> tuple[float, list[dict[str, np.ndarray]]]:
        """Loss and parameter gradients of one batch with dropout off (no update)."""
        loss, _, grads = self.forward_backward(batch, EVAL_SEED, 1.0)
        named = [{t.name: to_np(g).copy() for t, g in zip(st.manifest.trainable, gs, strict=True)}
                 for st, gs in zip(self.stages, grads, strict=True)]
        return loss, named

    # ---- evaluation -----------------------------------------------------------------------------
    def predict(self, batch: dict[str, np.ndarray]) -> tuple[float, np.ndarray]:
        """Loss and logits with dropout off (evaluation)."""
        res = self._one(batch, EVAL_SEED, 1.0, backward=False)[-1].result
        return res.losses[0], to_np(res.outputs[0][0]).copy()

    def evaluate(self, batches) -> tuple[float, float]:
        """Mean loss and accuracy over full batches."""
        losses, correct, n = [], 0, 0
        for b in batches:
            loss, logits = self.predict(b)
            losses.append(loss)
            correct += int((logits.argmax(1) == b["labels"]).sum())
            n += len(b["labels"])
        return float(np.mean(losses)), correct / max(1, n)

    # ---- state ----------------------------------------------------------------------------------
    def params(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for st in self.stages:
            out.update(st.params_numpy())
        return out

    def optimizer_state(self) -> dict[str, np.ndarray]:
        out = {}
        for st, o in zip(self.stages, self._opt, strict=True):
            for t, a, b in zip(st.manifest.trainable, o.m, o.v, strict=True):
                out[f"m/{t.name}"] = to_np(a).copy()
                out[f"v/{t.name}"] = to_np(b).copy()
        return out

    def load_state(self, params: dict[str, np.ndarray], opt: dict[str, np.ndarray] | None,
                   step: int) -> None:
        """Set weights (and AdamW moments) on every stage, resuming at optimizer step `step`.
        See [Note: in-place optimizer] in docs/design.md: the arrays are copied."""
        for st, o in zip(self.stages, self._opt, strict=True):
            st.set_params(params)
            if opt:
                tr = st.manifest.trainable   # frozen params have no moments
                o.m = [to_dev(np.array(opt[f"m/{t.name}"], copy=True)) for t in tr]
                o.v = [to_dev(np.array(opt[f"v/{t.name}"], copy=True)) for t in tr]
            o.steps = step
        self.step = step

    def close(self) -> None:
        """Nothing to stop (the cluster's signature)."""

    def __enter__(self) -> LocalPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
