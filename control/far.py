"""FAR (docs/far.md): prime with every parameter trainable, select learner FFN nodes, recompile
the stages with reconfigured FFNs, carry weights and AdamW state over, and continue.

FAR is a mode of the one loop (control/loop.py), `FarMode`: it compiles dense stages until the
priming steps are done; at that step boundary it pulls weights and moments from the stages (in
this process or on boards), picks the plan, compiles the reconfigured stages, deploys them on the
same boards in place (as a live re-plan does) and sets the state in the FAR layout at the same
step. Frozen parts keep their primed values; their moments are dropped (`load_state` takes moments
of trained tensors only).

    edgert train --far 0.4                          # the README job on 2 boards, FAR at 40%
    edgert train --far 0.4 --in-process             # the same in this process

[Note: FAR in runs] A run with `far_retention > 0` trains everything for
`FarConfig.priming_steps(steps)` steps, then switches. The plan is a pure function of the primed
weights, and those are a pure function of (seed, step) in sync mode, so a run recovered from a
checkpoint taken before the switch redoes the priming and arrives at the same plan; a checkpoint
taken after it carries the plan in meta.json ("far") and stores the FAR layout
(`Checkpoint.load()` returns the dense one, `load(dense=False)` the stored one).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compiler.far import FarPlan, far_spec, learner_count, node_scores, reconfigure, restore, select
from compiler.model_spec import EMBED_PARAMS, parse_split, split_qkv, stage_specs
from control.connect import ClusterConfig
from control.local import LocalPipeline
from control.modes import Compile, Dense
from control.train import train
from edgert.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FarConfig:
    """How FAR selects and freezes FFN nodes."""

    retention: float = 0.4           # learner nodes / all FFN nodes, per layer
    priming_fraction: float = 0.05   # share of the steps trained in full before selection
    selection: str = "l1"            # "l1": top L1 weight change (FAR); "random": the control
    seed: int = 0                    # random selection's seed
    # Learner count rounded to a multiple of this: 48 = our AVX-512 GEMM tile width (3 vectors of
    # 16), so both parts of a 1536-wide FFN (624 + 912) are whole tiles; with 16 (608 + 928) the
    # tile narrows to 2 vectors and the split FFN's forward got 7% slower (docs/far.md).
    align: int = 48
    # Also freeze the embeddings (word, position, token type, their LayerNorm) after priming: the
    # paper's operating point ("60% of the parameters frozen" at retention 0.4 on DistilBERT
    # counts the embeddings as frozen). Skips the embedding backward and the word table's AdamW.
    freeze_embeddings: bool = False

    def __post_init__(self):
        if not 0 < self.retention < 1:
            raise ConfigError(f"--far retention must be in (0, 1), got {self.retention}; "
                              f"e.g. --far 0.4")
        if not 0 < self.priming_fraction < 1:
            raise ConfigError(f"FAR priming_fraction must be in (0, 1), "
                              f"got {self.priming_fraction}")
        if self.selection not in ("l1", "random"):
            raise ConfigError(f"FAR selection must be 'l1' or 'random', got {self.selection!r}")
        if self.align < 1:
            raise ConfigError(f"FAR align must be >= 1, got {self.align}")

    def priming_steps(self, steps: int) -> int:
        return max(1, round(self.priming_fraction * steps))


def plan_from_priming(before: dict[str, np.ndarray], after: dict[str, np.ndarray], layers: int,
                      ffn: int, cfg: FarConfig) -> FarPlan:
    """Rank every layer's FFN nodes by their L1 weight change and pick the learners."""
    r = learner_count(ffn, cfg.retention, cfg.align)
    freeze = tuple(n for n, _ in EMBED_PARAMS) if cfg.freeze_embeddings else ()
    return select(node_scores(before, after, range(layers)), r, cfg.selection, cfg.seed, freeze)


def plan_of(meta: dict[str, Any]) -> FarPlan | None:
    """The FAR plan a checkpoint's meta.json records (None: dense stages)."""
    d = meta.get("far")
    return FarPlan.from_dict(d) if d else None


def far_moments(opt: dict[str, np.ndarray], plan: FarPlan) -> dict[str, np.ndarray]:
    """AdamW moments ("m/<name>", "v/<name>") in the FAR layout (frozen parts' moments included;
    loaders keep only those of trained tensors)."""
    return reconfigure(reconfigure(opt, plan, prefix="m/"), plan, prefix="v/")


def compile_far_bundles(model, plan: FarPlan, weights: dict[str, np.ndarray],
                        out_dir: str | Path, *,
                        stages: int | None = None, split: str | None = None, batch: int = 8,
                        seq: int = 64, target: str = "host", threads: int | None = None,
                        configs: dict | None = None, freeze: tuple[str, ...] = ()) -> list[Path]:
    """Compile the reconfigured stages, their parameter files holding `weights` (dense layout,
    internal names) in the FAR layout."""
    from compiler.arch import get_arch
    from compiler.build import build_bundle

    arch = get_arch(target, threads)
    if configs is None:   # as compile_bundles: the board's tuning database, if any
        from compiler.kernel_tuning import board_configs

        configs = board_configs(arch, None)
    far_w = reconfigure(weights, plan)
    out = []
    for spec in stage_specs(parse_split(split, stages, model.dims.layers), batch, seq):
        d = Path(out_dir) / f"stage{spec.index}"
        build_bundle(d, model.dims, far_spec(spec, plan, freeze), arch, far_w, model.model_id,
                     model.sha256, configs=configs)
        out.append(d)
    return out


def switch_to_far(pipe: LocalPipeline, model, plan: FarPlan, out_dir: str | Path, **compile_kw
                  ) -> LocalPipeline:
    """A new in-process FAR pipeline continuing `pipe` exactly (which is left as it is): same
    weights (regrouped), the learner parts' AdamW moments, the same step count; frozen parts keep
    their primed values and lose their moments. For side-by-side checks; runs switch in place
    (`FarMode`)."""
    params = pipe.params()
    bundles = compile_far_bundles(model, plan, params, out_dir, **compile_kw)
    far = LocalPipeline(bundles, threads=compile_kw.get("threads"), run_seed=pipe.run_seed)
    far.load_state(reconfigure(params, plan), far_moments(pipe.optimizer_state(), plan), pipe.step)
    return far


class FarMode:
    """FAR as a mode of the one loop (see the module docstring and control/loop.py `Mode`).

    `compile_dense(split, out)` compiles the dense stages (the priming ones); the FAR stages of a
    split go next to them (`out.parent / "far-<name>"`), compiled with `compile_kw` (batch, seq,
    target, threads, configs). `plan_file`: where the chosen plan is saved; `announce`: print the
    switch on stderr too (besides the loop's alert).
    """

    def __init__(self, far: FarConfig, model: Any, steps: int, compile_dense: Compile, *,
                 plan_file: Path | None = None, announce: bool = False,
                 **compile_kw: Any) -> None:
        self.far, self.model, self.steps = far, model, steps
        self._dense = Dense(compile_dense)
        self.plan_file, self.announce, self.compile_kw = plan_file, announce, compile_kw
        self.plan: FarPlan | None = None
        self.switched_at: int | None = None      # the step after which FAR took over
        self._far: tuple[FarPlan, Dense] | None = None   # the FAR stages of the current plan

    def compile(self, split: str, out: Path) -> list[Path]:
        plan = self.plan
        if plan is None:
            return self._dense.compile(split, out)
        if self._far is None or self._far[0] != plan:
            self._far = (plan, Dense(lambda sp, o: compile_far_bundles(
                self.model, plan, self.model.weights, o, split=sp, **self.compile_kw)))
        return self._far[1].compile(split, out.parent / f"far-{out.name}")

    def dense(self, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return params if self.plan is None else restore(params, self.plan)

    def to_deployed(self, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Dense-layout weights in the layout of the deployed stages; idempotent."""
        return params if self.plan is None else reconfigure(params, self.plan)

    def checkpoint_meta(self) -> dict[str, Any]:
        return {} if self.plan is None else {"far": self.plan.to_dict()}

    def restore(self, meta: dict[str, Any] | None) -> None:
        self.plan = None if meta is None else plan_of(meta)

    def at_boundary(self, loop: Any) -> bool:
        """After priming, switch the running stages to FAR in place (True if it switched now)."""
        far, steps = self.far, self.steps
        if self.plan is not None or not far.priming_steps(steps) <= loop.step < steps:
            return False
        t0 = time.perf_counter()
        params, opt = loop.gather(True)
        dims = self.model.dims
        plan = plan_from_priming(self.model.weights, params, dims.layers, dims.ffn, far)
        if self.plan_file is not None:
            plan.save(self.plan_file)
        if self.announce:
            print(f"  FAR: primed {loop.step} steps; {plan.learners}/{dims.ffn} learner FFN "
                  f"nodes per layer ({far.selection}); recompiling ...", file=sys.stderr)
        self.plan, self.switched_at = plan, loop.step
        parts = loop.deploy(loop.ranges, "far", None,
                            (reconfigure(params, plan), far_moments(opt, plan), loop.step))
        loop.alert("info", f"step {loop.step}: FAR on, {plan.learners}/{dims.ffn} learner FFN "
                           f"nodes per layer ({far.selection}) in {time.perf_counter() - t0:.1f} s "
                           f"(compile {parts['compile_s']:.1f} s)")
        return True


# ---- the job without a run directory (`edgert train --far`) --------------------------------------

def train_far(model, far: FarConfig, job: Any, steps: int, out_dir: str | Path, *,
              boards: bool = False, stages: int | None = None, split: str | None = None,
              seq: int = 64, seed: int = 0, threads: int | None = None,
              configs: dict | None = None) -> dict:
    """Prime, select, reconfigure and train `job` (control.job.Job) to `steps` through the one
    loop, in this process or on local boards (`boards`: one `edgert serve` per stage; threads:
    [Note: threads per board] in control/connect.py), evaluating before and after.

    Returns {"pipe": an in-process FAR pipeline holding the final weights and moments, "plan",
    "losses", "step_seconds" ({"priming": [...], "far": [...]}), "boards", "before", "after"}.
    """
    out_dir = Path(out_dir)
    ranges = parse_split(split, stages, model.dims.layers)
    kw = {"batch": job.batch, "seq": seq, "threads": threads, "configs": configs}

    def compile_dense(sp: str, out: Path) -> list[Path]:
        from control.job import compile_bundles

        return compile_bundles(model, out, split=sp, progress=False, **kw)

    mode = FarMode(far, model, steps, compile_dense, plan_file=out_dir / "far_plan.json",
                   announce=True, **kw)
    where = ClusterConfig(boards=len(ranges), in_process=not boards, threads=threads or 0)
    res = train(job, mode, where, ranges, out_dir / "bundles", steps=steps, seed=seed,
                progress=False, keep_optimizer=True)
    if mode.plan is None or mode.switched_at is None:
        raise ConfigError(f"FAR never switched: {steps} steps leave no step after the "
                          f"{far.priming_steps(steps)} priming ones; train more steps")
    pipe = LocalPipeline(mode.compile(",".join(f"{a}:{b}" for a, b in ranges),
                                      out_dir / "bundles"), threads=threads, run_seed=seed)
    pipe.load_state(res.params, res.opt, steps)
    n = mode.switched_at
    return {"pipe": pipe, "plan": mode.plan, "losses": res.losses,
            "step_seconds": {"priming": res.step_seconds[:n], "far": res.step_seconds[n:]},
            "boards": [{k: b[k] for k in ("name", "stage", "pid", "peak_rss_mib")}
                       for b in res.boards],
            "before": res.metrics(0, ("loss", "accuracy")), "after": res.metrics(-1)}


def finetune_far(*, far: FarConfig, model_dir=None, out_dir: str | Path = "runs/far",
                 stages: int | None = 2, split: str | None = None, steps: int = 60, batch: int = 8,
                 micro_batches: int = 2, seq: int = 64, lr: float = 2e-4, eval_examples: int = 256,
                 seed: int = 0, threads: int | None = None, export: bool = True,
                 configs: dict | None = None, boards: bool = False) -> dict:
    """`control.job.finetune` with FAR; returns the report (also report.json).

    Parameters
    ----------
    far : FarConfig
        Retention, priming share and selection rule.
    model_dir, out_dir, stages, split, steps, batch, micro_batches, seq, lr, eval_examples, seed,
    threads, export, configs
        As for `control.job.finetune`.
    boards : bool
        Train on local board processes (one per stage; `edgert train --far R`) instead of in
        this process (`--in-process`). Both compute the same.

    Returns
    -------
    dict
        The run report: held-out loss/accuracy before and after, losses, step times (priming and
        FAR separately), the learner count and the path of the saved plan.

    Examples
    --------
    >>> rep = finetune_far(far=FarConfig(retention=0.4), steps=60)   # doctest: +SKIP
    >>> rep["after"]["accuracy"]                                      # doctest: +SKIP
    0.77
    """
    from control.job import load_model, make_job

    out_dir = Path(out_dir)
    model = load_model(model_dir, num_labels=2, head_seed=seed)
    job = make_job(model, steps=steps, batch=batch, micro_batches=micro_batches, seq=seq, lr=lr,
                   eval_examples=eval_examples, seed=seed)
    r = train_far(model, far, job, steps, out_dir, boards=boards, stages=stages, split=split,
                  seq=seq, seed=seed, threads=threads, configs=configs)
    pipe, plan = r["pipe"], r["plan"]
    rep: dict = {"far": asdict(far), "steps": steps, "batch": batch, "micro_batches": micro_batches,
                 "seq": seq, "before": r["before"], "losses": r["losses"],
                 "step_seconds": r["step_seconds"], "boards": r["boards"], "after": r["after"],
                 "learners": plan.learners, "ffn": model.dims.ffn,
                 "plan": str(out_dir / "far_plan.json")}
    (out_dir / "report.json").write_text(json.dumps(rep, indent=1))
    if export:
        export_far(out_dir / "hf_model", model, pipe.params(), plan)
    return rep


def export_far(path: str | Path, model, params: dict[str, np.ndarray], plan: FarPlan) -> Path:
    """FAR-layout weights as a dense Hugging Face checkpoint folder (the original layout)."""
    from compiler.export import export_hf

    return export_hf(path, model.config, split_qkv(restore(params, plan)), model.path, 2,
                     id2label=["negative", "positive"])


def summary(rep: dict) -> str:
    b, a = rep["before"], rep["after"]
    far_s = rep["step_seconds"]["far"]
    prime_s = rep["step_seconds"]["priming"]
    return "\n".join([
        f"FAR fine-tuned {rep['steps']} steps ({len(prime_s)} priming), "
        f"{rep['learners']}/{rep['ffn']} learner FFN nodes per layer ({rep['far']['selection']})",
        f"  held-out loss     {b['loss']:.4f} -> {a['loss']:.4f}",
        f"  held-out accuracy {100 * b['accuracy']:.1f}% -> {100 * a['accuracy']:.1f}%",
        f"  median step: priming {1000 * float(np.median(prime_s)):.0f} ms, FAR "
        f"{1000 * float(np.median(far_s)) if far_s else float('nan'):.0f} ms",
        *(f"  {b['name']}: stage {b['stage']}, peak RSS {b['peak_rss_mib']:.0f} MiB"
          for b in rep.get("boards", [])),
    ])
