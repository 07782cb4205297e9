"""FAR on board processes: switch a live cluster (or an unattended run) to FAR bundles in place.

The in-process FAR job is `control.far.finetune_far`; this module is what board clusters add
(docs/far.md, "On boards"):

* `switch_cluster`: at a step boundary, pull weights and AdamW moments from the boards, compile the
  reconfigured stages, LOAD them on the same board processes (as a live re-plan does,
  control/replan.py) and set the state in the FAR layout at the same step. Frozen parts keep their
  primed values; their moments are dropped (`LocalCluster.load_state` sends moments of trained
  tensors only).
* The hooks a `control.run.Run` calls (control/run_loop.py): `maybe_switch` after priming,
  `stage_bundles` (dense or FAR bundles for a split, from the checkpoint being loaded),
  `to_far_layout` and `checkpoint_meta` (the checkpoint records the plan, so a resumed or
  recovered run redeploys the same FAR stages; `Checkpoint.load` returns the dense layout).

[Note: FAR in runs] A run with `far_retention > 0` trains everything for
`FarConfig.priming_steps(steps)` steps, then switches. The plan is a pure function of the primed
weights, and those are a pure function of (seed, step) in sync mode, so a run recovered from a
checkpoint taken before the switch redoes the priming and arrives at the same plan; a checkpoint
taken after it carries the plan in meta.json ("far").
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from compiler.far import FarPlan, reconfigure

if TYPE_CHECKING:
    from control.cluster import LocalCluster
    from control.far import FarConfig
    from control.run import Run
    from control.run_loop import Job

log = logging.getLogger(__name__)


def far_moments(opt: dict[str, np.ndarray], plan: FarPlan) -> dict[str, np.ndarray]:
    """AdamW moments ("m/<name>", "v/<name>") in the FAR layout (frozen parts' moments included;
    loaders keep only those of trained tensors)."""
    return reconfigure(reconfigure(opt, plan, prefix="m/"), plan, prefix="v/")


def switch_cluster(cluster: LocalCluster, model: Any, plan: FarPlan, out_dir: str | Path, *,
                   micro_batches: int, **compile_kw: Any) -> list[Path]:
    """Continue `cluster`'s training in FAR mode on the same board processes; returns the bundles.

    Parameters
    ----------
    cluster : control.cluster.LocalCluster
        A sync deployment at a step boundary (after `train_step`).
    model : control.job.Model
    plan : compiler.far.FarPlan
        From `control.far.plan_from_priming` on the cluster's weights.
    out_dir : path
        Where the FAR bundles are compiled (`out_dir/stage<i>`).
    micro_batches : int
        Micro-batches per optimizer step (the schedule the boards are LOADed with).
    **compile_kw
        As `control.far.compile_far_bundles` (split or stages, batch, seq, configs, freeze ...).

    Examples
    --------
    >>> plan = plan_from_priming(model.weights, cluster.params(), 6, 1536, FarConfig())  # doctest: +SKIP
    >>> switch_cluster(cluster, model, plan, "build/far", micro_batches=2, split="0:3,3:6")  # doctest: +SKIP
    """
    from control.far import compile_far_bundles

    step = cluster.step
    params, opt = cluster.params(), cluster.optimizer_state()
    bundles = compile_far_bundles(model, plan, params, out_dir, **compile_kw)
    cluster.deploy(bundles, micro_batches=micro_batches)
    cluster.load_state(reconfigure(params, plan), far_moments(opt, plan), step)
    return bundles


# ---- the hooks of an unattended run (control/run_loop.py) ---------------------------------------

def run_far_config(run: Run) -> FarConfig | None:
    """The run's FarConfig, or None when the run does not use FAR."""
    from control.far import FarConfig

    cfg = run.config
    if not getattr(cfg, "far_retention", 0):
        return None
    return FarConfig(retention=cfg.far_retention, priming_fraction=cfg.far_priming,
                     selection=cfg.far_selection, seed=cfg.seed,
                     freeze_embeddings=bool(getattr(cfg, "far_freeze_embeddings", False)))


def current_plan(run: Run) -> FarPlan | None:
    return getattr(run, "far_plan", None)


def plan_of(meta: dict[str, Any]) -> FarPlan | None:
    """The FAR plan a checkpoint's meta.json records (None: dense stages)."""
    d = meta.get("far")
    if not d:
        return None
    return FarPlan.from_dict(d)


def checkpoint_meta(run: Run) -> dict[str, Any]:
    """{"far": plan} for a checkpoint taken in FAR mode, else {}."""
    plan = current_plan(run)
    if plan is None:
        return {}
    return {"far": plan.to_dict()}


def to_far_layout(run: Run, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Dense-layout weights (a checkpoint's) in the layout of the deployed stages; idempotent."""
    plan = current_plan(run)
    return params if plan is None else reconfigure(params, plan)


def stage_bundles(run: Run, job: Job, split: str, c: Any, fresh: bool) -> list[Path]:
    """Compile (from the cache when possible) the stages of `split` for what is being loaded.

    Loading checkpoint `c` takes its plan (None before the switch); a fresh start (no checkpoint,
    no live state) is dense; a live migration keeps the run's current plan.
    """
    from control.far import compile_far_bundles
    from control.job import compile_bundles

    if c is not None:
        run.far_plan = plan_of(c.meta)
    elif fresh:
        run.far_plan = None
    plan = current_plan(run)
    name = split.replace(":", "-").replace(",", "_")
    kw = {"split": split, "batch": job.batch, "seq": int(run.config.seq),
          "target": run.config.target}
    if plan is None:
        return compile_bundles(job.model, run.dir / "bundles" / name, progress=False, **kw)
    return compile_far_bundles(job.model, plan, job.model.weights,
                               run.dir / "bundles" / f"far-{name}", **kw)


def maybe_switch(run: Run, job: Job) -> bool:
    """After priming, switch the running cluster to FAR in place (True if it switched now)."""
    from control.far import plan_from_priming
    from control.run_loop import deploy, gather

    far, cfg = run_far_config(run), run.config
    if far is None or current_plan(run) is not None:
        return False
    if run.step < far.priming_steps(cfg.steps) or run.step >= cfg.steps:
        return False
    t0 = time.perf_counter()
    params, opt = gather(run, True)
    dims = job.model.dims
    plan = plan_from_priming(job.model.weights, params, dims.layers, dims.ffn, far)
    plan.save(run.dir / "far_plan.json")
    run.far_plan = plan
    parts = deploy(run, job, run.ranges, "far", None,
                   (reconfigure(params, plan), far_moments(opt, plan), run.step))
    run.alert("info", f"step {run.step}: FAR on, {plan.learners}/{dims.ffn} learner FFN nodes per "
                      f"layer ({far.selection}) in {time.perf_counter() - t0:.1f} s "
                      f"(compile {parts['compile_s']:.1f} s)")
    return True
