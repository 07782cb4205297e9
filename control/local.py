"""K compiled stages chained in one process: the reference runner (and the numerics every
distributed run is checked against).

One training step takes `micro_batches` batches: each goes forward through every stage and back,
gradients are accumulated (scaled by 1/micro_batches, so the step is exactly one large-batch step),
then each stage's AdamW runs in place. Everything numeric happens inside the TVM bundles.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgert.contract import ACTIVATION, adamw_hyper, seed_vec, step_seed
from edgert.errors import ConfigError
from edgert.runtime import TvmStage, to_dev, to_np

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


def _run_splits_unsplit(bundles: list[Path | str], threads: int | None) -> None:
    """Head-split bundles (docs/head_split.md) call the board's attention functions; in this
    process they run unsplit (k = H, the full-head kernel on this process's thread pool) unless
    the caller installed an executor for this shape (edgert.head_split.executor.install). All stages
    of a model share one attention shape, so one executor serves every stage."""
    from edgert.head_split import executor as hsx
    from edgert.artifact import load_manifest

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


class LocalPipeline:
    """Stages from bundle directories, in order, run in this process.

    Examples
    --------
    >>> pipe = LocalPipeline(["build/stage0", "build/stage1"])      # doctest: +SKIP
    >>> loss = pipe.train_step([batch0, batch1], OptimConfig())     # doctest: +SKIP
    """

    def __init__(self, bundles: list[Path | str], threads: int | None = None, run_seed: int = 0):
        if not bundles:
            raise ConfigError("LocalPipeline needs at least one stage bundle")
        _run_splits_unsplit(bundles, threads)
        self.stages = [TvmStage.load(b, threads=threads) for b in bundles]
        for i, st in enumerate(self.stages):
            if st.manifest.index != i or int(st.manifest.stage["num_stages"]) != len(bundles):
                raise ConfigError(f"bundle {bundles[i]} is stage {st.manifest.index} of "
                                  f"{st.manifest.stage['num_stages']}; pass all stages in order")
        self.m = [st.zeros_like_params() for st in self.stages]
        self.v = [st.zeros_like_params() for st in self.stages]
        self.step = 0
        self.run_seed = run_seed

    @property
    def batch_size(self) -> int:
        return int(self.stages[0].manifest.stage["batch"])

    @property
    def seq_len(self) -> int:
        return int(self.stages[0].manifest.stage["seq"])

    def forward_backward(self, batch: dict[str, np.ndarray], seed: np.ndarray, loss_scale: float):
        """One micro-batch through all stages and back: (loss, logits, grads per stage)."""
        h, saved = None, []
        for st in self.stages:
            outs, sv = st.forward(stage_inputs(st, batch, h), seed)
            saved.append(sv)
            h = outs[0]
        loss, logits = float(to_np(outs[0])[0]), to_np(outs[1]).copy()
        dout = np.array([loss_scale], dtype=self.stages[-1].manifest.dtype)
        grads: list[list] = [None] * len(self.stages)  # type: ignore[list-item]
        for i in reversed(range(len(self.stages))):
            dout, grads[i] = self.stages[i].backward(saved[i], dout, seed)
            saved[i] = None
        return loss, logits, grads

    def grads(self, batch: dict[str, np.ndarray]) -> tuple[float, list[dict[str, np.ndarray]]]:
        """Loss and parameter gradients of one batch with dropout off (no update)."""
        loss, _, grads = self.forward_backward(batch, seed_vec(1, False), 1.0)
        named = [{t.name: to_np(g).copy() for t, g in zip(st.manifest.trainable, gs, strict=True)}
                 for st, gs in zip(self.stages, grads, strict=True)]
        return loss, named

    def train_step(self, micro: list[dict[str, np.ndarray]], opt: OptimConfig) -> float:
        """One optimizer step over the given micro-batches; returns their mean loss."""
        self.step += 1
        acc, losses = None, []
        for j, b in enumerate(micro):
            loss, _, g = self.forward_backward(b, seed_vec(step_seed(self.run_seed, self.step, j), True),
                                               1.0 / len(micro))
            losses.append(loss)
            if acc is None:
                acc = g
            else:
                acc = [st.accumulate(a, gi) for st, a, gi in zip(self.stages, acc, g, strict=True)]
        hyper = opt.hyper(self.step)
        for st, g, m, v in zip(self.stages, acc, self.m, self.v, strict=True):
            st.optimizer_step(g, m, v, hyper)
        loss = float(np.mean(losses))
        if not math.isfinite(loss):
            log.warning("step %d: loss is %s", self.step, loss)
        return loss

    def predict(self, batch: dict[str, np.ndarray]) -> tuple[float, np.ndarray]:
        """Loss and logits with dropout off (evaluation)."""
        h = None
        for st in self.stages:
            outs, _ = st.forward(stage_inputs(st, batch, h), seed_vec(1, False))
            h = outs[0]
        return float(to_np(outs[0])[0]), to_np(outs[1]).copy()

    def evaluate(self, batches) -> tuple[float, float]:
        """Mean loss and accuracy over full batches."""
        losses, correct, n = [], 0, 0
        for b in batches:
            loss, logits = self.predict(b)
            losses.append(loss)
            correct += int((logits.argmax(1) == b["labels"]).sum())
            n += len(b["labels"])
        return float(np.mean(losses)), correct / max(1, n)

    def params(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for st in self.stages:
            out.update(st.params_numpy())
        return out

    def optimizer_state(self) -> dict[str, np.ndarray]:
        out = {}
        for st, m, v in zip(self.stages, self.m, self.v, strict=True):
            for t, a, b in zip(st.manifest.trainable, m, v, strict=True):
                out[f"m/{t.name}"] = to_np(a).copy()
                out[f"v/{t.name}"] = to_np(b).copy()
        return out

    def load_state(self, params: dict[str, np.ndarray], opt: dict[str, np.ndarray] | None, step: int):
        for i, st in enumerate(self.stages):
            st.set_params(params)
            if opt:
                tr = st.manifest.trainable   # frozen params have no moments
                self.m[i] = [to_dev(np.array(opt[f"m/{t.name}"], copy=True)) for t in tr]
                self.v[i] = [to_dev(np.array(opt[f"v/{t.name}"], copy=True)) for t in tr]
        self.step = step
