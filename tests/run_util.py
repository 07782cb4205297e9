"""Shared by the equality tests of training runs (faults, live re-plan, remote boards, the cluster,
the emulated board): an uninterrupted reference, and one comparison of whole training states.

`uninterrupted_state(cfg, ...)` trains cfg.steps steps of the run's job in one process
(LocalPipeline on cfg.split), taking the data in the order a run takes it (step s uses the
micro-batches at positions M(s-1) .. M s - 1 of iterate_batches' epoch-0 order), so an interrupted,
recovered or re-planned run must end in its state. It also returns the state one step earlier:
`assert_same_state(final, before_last)` must fail, which shows that the last step is visible to
the comparison (see [Note: the last step must count] below).

[Note: the last step must count]
OptimConfig's default schedule (linear warm-up, then linear decay to 0 at `total_steps`) gives the
last step a learning rate of exactly 0, so a run that skips or botches its last step ends with the
same weights. Equality tests therefore (a) train with a schedule whose every step has lr > 0 (runs:
`warmup = steps`, a warm-up over the whole run; OptimConfig users: `total_steps` past the last
step), and (b) compare the AdamW moments and the optimizer step counter as well as the weights.

A `TrainState` comparison is exact by default: every run compared here computes the same float32
operations in the same order as its reference (the kernels of a layer do not depend on the stage
boundary nor on the thread count: measured bit-identical for K = 1, 2, 3, the split 0:1,1:6,
recovered and re-planned runs, and boards on attached daemons). Where that does not hold (another
CPU architecture), the caller passes `rtol`, and each tensor must satisfy
||x - x_ref|| <= rtol * ||x_ref|| + rtol * 1e-3 * max_t ||x_ref,t||, per kind (weights, m, v). The
second term covers tensors whose true gradient is exactly zero (the key-projection biases), whose
moments are pure rounding noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class TrainState:
    """Weights, AdamW moments ({"m/<name>", "v/<name>"}) and optimizer steps taken."""

    params: dict[str, np.ndarray]
    opt: dict[str, np.ndarray]
    step: int

    @classmethod
    def of(cls, trainer) -> TrainState:
        """From a LocalPipeline or a LocalCluster (both count optimizer steps in `.step`)."""
        return cls(trainer.params(), trainer.optimizer_state(), int(trainer.step))

    @classmethod
    def of_checkpoint(cls, ck) -> TrainState:
        params, opt = ck.load()
        return cls(params, opt, ck.step)


def uninterrupted_state(cfg, minilm_dir: Path, build_dir: Path) -> tuple[TrainState, TrainState]:
    """(final state, state after cfg.steps - 1 steps) of cfg's job run in this process."""
    from control.data import iterate_batches
    from control.job import compile_bundles, load_model, rotten_tomatoes_batches
    from control.local import LocalPipeline, OptimConfig

    model = load_model(minilm_dir, num_labels=2, head_seed=cfg.seed)
    bundles = compile_bundles(model, build_dir, split=cfg.split, batch=cfg.batch, seq=cfg.seq,
                              progress=False)
    enc, y, _ = rotten_tomatoes_batches(minilm_dir / "tokenizer.json", cfg.seq, cfg.batch, 8,
                                        cfg.seed)
    order = iterate_batches(enc, y, cfg.batch, cfg.seed, 0)
    pipe = LocalPipeline(bundles, run_seed=cfg.seed)
    opt = OptimConfig(lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps)
    assert all(opt.lr_at(s) > 0 for s in range(1, cfg.steps + 1)), \
        "an equality test needs lr > 0 at every step: see [Note: the last step must count]"
    before_last = None
    for s in range(cfg.steps):
        if s == cfg.steps - 1:
            before_last = TrainState.of(pipe)
        pipe.train_step([next(order)[1].as_dict() for _ in range(cfg.micro_batches)], opt)
    return TrainState.of(pipe), before_last


def state_differences(got: TrainState, want: TrainState) -> dict[str, float]:
    """Worst per-tensor ||x - x_ref|| / ||x_ref|| over weights, m and v (for the printout)."""
    out = {}
    for kind, g, w in (("weights", got.params, want.params), ("m", *_moments(got, want, "m/")),
                       ("v", *_moments(got, want, "v/"))):
        out[kind] = max((float(np.linalg.norm(g[n] - x) / (np.linalg.norm(x) or 1.0))
                         for n, x in w.items() if n in g), default=0.0)
    return out


def _moments(got: TrainState, want: TrainState, prefix: str):
    return ({k: v for k, v in got.opt.items() if k.startswith(prefix)},
            {k: v for k, v in want.opt.items() if k.startswith(prefix)})


def assert_same_state(got: TrainState, want: TrainState, rtol: float = 0.0) -> None:
    """Same optimizer step, same tensor names, and each tensor equal (rtol 0) or within the
    per-tensor bound of the module docstring; prints the worst differences."""
    assert got.step == want.step, f"optimizer step {got.step}, want {want.step}"
    assert got.params.keys() == want.params.keys()
    assert got.opt.keys() == want.opt.keys()
    print("state vs reference: worst per-tensor relative difference " + ", ".join(
        f"{k} {v:.1e}" for k, v in state_differences(got, want).items()))
    for kind, g, w in (("weight", got.params, want.params), ("m", *_moments(got, want, "m/")),
                       ("v", *_moments(got, want, "v/"))):
        if rtol == 0:
            bad = [n for n in w if not np.array_equal(g[n], w[n])]
            assert not bad, f"{len(bad)} {kind} tensors differ from the reference, e.g. {bad[:3]}"
            continue
        top = max(float(np.linalg.norm(x)) for x in w.values())
        for n, x in w.items():
            err, ref = float(np.linalg.norm(g[n] - x)), float(np.linalg.norm(x))
            assert err <= rtol * ref + rtol * 1e-3 * top, \
                f"{kind} {n}: ||difference|| {err:.3e} vs ||reference|| {ref:.3e}"
