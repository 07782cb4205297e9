"""Shared by the run tests (faults, live re-plan): the uninterrupted reference and its comparison.

`uninterrupted_params(cfg, ...)` trains cfg.steps steps of the run's job in one process
(LocalPipeline on cfg.split), taking the data in the order a run takes it (step s uses the
micro-batches at positions M(s-1) .. M s - 1 of iterate_batches' epoch-0 order), so an interrupted,
recovered or re-planned run must end with its weights. `assert_same_weights` compares per tensor at
rtol 1e-5, atol 1e-6 x max|w| (see the tolerance notes of the tests that use it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def uninterrupted_params(cfg, minilm_dir: Path, build_dir: Path) -> dict[str, np.ndarray]:
    """Final weights of cfg's job run without interruption in this process."""
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
    for _ in range(cfg.steps):
        pipe.train_step([next(order)[1].as_dict() for _ in range(cfg.micro_batches)], opt)
    return pipe.params()


def assert_same_weights(got: dict, want: dict) -> None:
    """Same tensor names; each within rtol 1e-5, atol 1e-6 x max|w|; prints the worst."""
    assert got.keys() == want.keys()
    worst = 0.0
    for name, w in want.items():
        np.testing.assert_allclose(got[name], w, rtol=1e-5, atol=1e-6 * np.abs(w).max(),
                                   err_msg=name)
        worst = max(worst, float(np.abs(got[name] - w).max() / (np.abs(w).max() or 1)))
    print(f"final weights: worst |difference| / max|w| = {worst:.1e}")
