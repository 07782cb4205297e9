"""FAR run mode: prime with every parameter trainable, select learner FFN nodes, recompile the
stages with reconfigured FFNs, carry weights and AdamW state over, and continue (docs/far.md).

    edgert train --far 0.4                          # the README job on 2 boards, FAR at 40%
    edgert train --far 0.4 --in-process             # the same in this process
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from compiler.far import FarPlan, far_spec, learner_count, node_scores, reconfigure, restore, select
from compiler.model_spec import EMBED_PARAMS, parse_split, split_qkv, stage_specs
from control.local import LocalPipeline, OptimConfig
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
        build_bundle(d, model.dims, far_spec(spec, plan, freeze), arch, far_w, model.model_id, model.sha256,
                     configs=configs)
        out.append(d)
    return out


def switch_to_far(pipe: LocalPipeline, model, plan: FarPlan, out_dir: str | Path, **compile_kw
                  ) -> LocalPipeline:
    """A FAR pipeline continuing `pipe` exactly: same weights (regrouped), the learner parts' AdamW
    moments, the same step count; frozen parts keep their primed values and lose their moments."""
    params = pipe.params()
    bundles = compile_far_bundles(model, plan, params, out_dir, **compile_kw)
    far = LocalPipeline(bundles, threads=compile_kw.get("threads"), run_seed=pipe.run_seed)
    opt = pipe.optimizer_state()
    opt = reconfigure(reconfigure(opt, plan, prefix="m/"), plan, prefix="v/")
    far.load_state(reconfigure(params, plan), opt, pipe.step)
    return far


def train_far(model, far: FarConfig, micro: Callable[[int], list[dict[str, np.ndarray]]],
              steps: int, opt: OptimConfig, out_dir: str | Path, *, boards: bool = False,
              stages: int | None = None, split: str | None = None, batch: int = 8,
              micro_batches: int = 2, seq: int = 64, seed: int = 0, threads: int | None = None,
              configs: dict | None = None) -> dict:
    """Prime, select, reconfigure and train to `steps`, in this process or on local boards.

    `micro(step)` gives the micro-batches of optimizer step `step` (1-based). With `boards`, one
    `edgert serve` process per stage trains, and the switch redeploys FAR bundles on the same
    processes (`control.far_run.switch_cluster`). Returns {"pipe": an in-process FAR pipeline
    holding the final weights and moments, "plan", "losses", "step_seconds", "boards"}.
    """
    from control.job import compile_bundles

    out_dir = Path(out_dir)
    ck = {"stages": stages, "split": split, "batch": batch, "seq": seq, "threads": threads}
    bundles = compile_bundles(model, out_dir / "bundles", configs=configs, progress=False, **ck)
    res: dict = {"losses": [], "step_seconds": {"priming": [], "far": []}, "boards": []}
    n_prime = far.priming_steps(steps)

    def run(tr, first: int, last: int, key: str) -> None:
        for s in range(first, last + 1):
            mb = micro(s)
            t = time.perf_counter()
            res["losses"].append(tr.train_step(mb, opt))
            res["step_seconds"][key].append(time.perf_counter() - t)

    def select_plan(tr) -> FarPlan:
        plan = plan_from_priming(model.weights, tr.params(), model.dims.layers, model.dims.ffn,
                                 far)
        plan.save(out_dir / "far_plan.json")
        print(f"  FAR: primed {n_prime} steps; {plan.learners}/{model.dims.ffn} learner FFN "
              f"nodes per layer ({far.selection}); recompiling ...", file=sys.stderr)
        return plan

    if not boards:
        pipe = LocalPipeline(bundles, threads=threads, run_seed=seed)
        run(pipe, 1, n_prime, "priming")
        plan = select_plan(pipe)
        pipe = switch_to_far(pipe, model, plan, out_dir / "far_bundles", configs=configs, **ck)
        run(pipe, n_prime + 1, steps, "far")
        return {**res, "pipe": pipe, "plan": plan}
    from control.cluster import LocalCluster
    from control.far_run import switch_cluster

    per_board = max(1, (threads or len(os.sched_getaffinity(0))) // len(bundles))
    with LocalCluster(len(bundles), threads=per_board, run_seed=seed) as cluster:
        cluster.deploy(bundles, micro_batches=micro_batches)
        run(cluster, 1, n_prime, "priming")
        plan = select_plan(cluster)
        far_bundles = switch_cluster(cluster, model, plan, out_dir / "far_bundles",
                                     micro_batches=micro_batches, configs=configs, **ck)
        run(cluster, n_prime + 1, steps, "far")
        res["boards"] = [{"name": b.name, "stage": i, "pid": b.proc.pid,
                          "peak_rss_mib": cluster.stats(i)["peak_rss"] / 2 ** 20}
                         for i, b in enumerate(cluster.stages)]
        pipe = LocalPipeline(far_bundles, threads=threads, run_seed=seed)
        pipe.load_state(cluster.params(), cluster.optimizer_state(), cluster.step)
    return {**res, "pipe": pipe, "plan": plan}


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
    from control.data import iterate_batches
    from control.job import load_model, rotten_tomatoes_batches

    out_dir = Path(out_dir)
    model = load_model(model_dir, num_labels=2, head_seed=seed)
    train_enc, train_y, test = rotten_tomatoes_batches(model.path / "tokenizer.json", seq, batch,
                                                       eval_examples, seed)
    opt = OptimConfig(lr=lr, warmup_steps=max(1, steps // 10), total_steps=steps)
    it = iterate_batches(train_enc, train_y, batch, seed, 0)

    def micro(_step: int) -> list[dict[str, np.ndarray]]:     # steps come in order
        return [next(it)[1].as_dict() for _ in range(micro_batches)]

    before = LocalPipeline(compile_bundles_for(model, out_dir, stages, split, batch, seq, threads,
                                               configs), threads=threads, run_seed=seed)
    loss, acc = before.evaluate(test)
    del before
    r = train_far(model, far, micro, steps, opt, out_dir, boards=boards, stages=stages,
                  split=split, batch=batch, micro_batches=micro_batches, seq=seq, seed=seed,
                  threads=threads, configs=configs)
    pipe, plan = r["pipe"], r["plan"]
    rep: dict = {"far": asdict(far), "steps": steps, "batch": batch, "micro_batches": micro_batches,
                 "seq": seq, "before": {"loss": loss, "accuracy": acc}, "losses": r["losses"],
                 "step_seconds": r["step_seconds"], "boards": r["boards"]}
    loss, acc = pipe.evaluate(test)
    rep["after"] = {"loss": loss, "accuracy": acc, "examples": len(test) * batch}
    rep.update(learners=plan.learners, ffn=model.dims.ffn, plan=str(out_dir / "far_plan.json"))
    (out_dir / "report.json").write_text(json.dumps(rep, indent=1))
    if export:
        export_far(out_dir / "hf_model", model, pipe.params(), plan)
    return rep


def compile_bundles_for(model, out_dir: Path, stages, split, batch, seq, threads, configs
                        ) -> list[Path]:
    """The dense bundles `train_far` compiles first (cached): for the evaluation before."""
    from control.job import compile_bundles

    return compile_bundles(model, out_dir / "bundles", stages=stages, split=split, batch=batch,
                           seq=seq, threads=threads, configs=configs, progress=False)


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
