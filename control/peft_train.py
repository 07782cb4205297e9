"""`edgert train --peft bitfit|lora|adapter`: the main job with a parameter-efficient trainable set.

The same data, schedule, evaluation, boards and loop as `control.job.finetune` (a `Dense` mode
whose compile function builds PEFT stages); the stages are compiled
with `compiler.peft.peft_spec` (frozen tensors get no gradient and no AdamW state, docs/peft.md),
new LoRA factors / adapters are initialised so that the model starts equal to the pretrained one,
and the export is a Hugging Face folder: LoRA merged into the base weights; adapters in
``adapters.safetensors`` next to ``model.safetensors`` (compiler/adapters.py).

    edgert train --peft adapter --adapter-size 16 --lr 5e-3
    edgert train --peft lora --lora-rank 8 --in-process
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from compiler.model_spec import parse_split
from control.connect import ClusterConfig
from control.job import TrainReport, load_model, train_report
from control.modes import Dense
from edgert.errors import ConfigError

PEFT_METHODS = ("bitfit", "lora", "adapter")


@dataclass(frozen=True, slots=True)
class PeftConfig:
    """Which parameter-efficient method and its size (the other sizes are ignored)."""

    method: str
    lora_rank: int = 8
    lora_alpha: float = 16.0
    adapter_size: int = 16

    def __post_init__(self) -> None:
        if self.method not in PEFT_METHODS:
            raise ConfigError(f"unknown --peft {self.method!r}: use one of {list(PEFT_METHODS)}")
        if self.method == "adapter" and self.adapter_size < 1:
            raise ConfigError(f"--adapter-size must be >= 1 (e.g. 16), got {self.adapter_size}")
        if self.method == "lora" and (self.lora_rank < 1 or not self.lora_alpha > 0):
            raise ConfigError(f"--lora-rank must be >= 1 and --lora-alpha > 0, got "
                              f"{self.lora_rank}, {self.lora_alpha}")

    @property
    def lora_scale(self) -> float | None:
        return self.lora_alpha / self.lora_rank if self.method == "lora" else None


def compile_peft_bundles(model, peft: PeftConfig, out_dir: str | Path, *, stages: int | None = 2,
                         split: str | None = None, batch: int = 8, seq: int = 64, seed: int = 0,
                         threads: int | None = None, configs: dict | None = None,
                         tuning_db: str | Path | None = None
                         ) -> tuple[list[Path], dict[str, np.ndarray]]:
    """PEFT stage bundles under `out_dir`/stage{i}, and the weights they start from (the model's
    plus fresh LoRA factors / adapters, seeded by `seed`)."""
    from compiler.adapters import ADAPTERS_FILE, adapter_init, load_adapters
    from compiler.arch import get_arch
    from compiler.build import build_bundle
    from compiler.model_spec import parse_split, stage_specs
    from compiler.peft import lora_init, peft_spec

    arch = get_arch("host", threads)
    if configs is None:
        from compiler.kernel_tuning import board_configs

        configs = board_configs(arch, tuning_db)
    if seq > model.dims.max_pos:
        raise ConfigError(f"--seq {seq} exceeds the model's {model.dims.max_pos} positions")
    weights = dict(model.weights)
    if peft.method == "adapter" and (Path(model.path) / ADAPTERS_FILE).is_file():
        # continue an exported adapter model (compiler/adapters.py): its adapters, not fresh ones
        fresh, (ad, r) = False, load_adapters(model.path)
        if r != peft.adapter_size:
            raise ConfigError(f"{model.path} holds adapters of size {r}: pass --adapter-size {r} "
                              "to continue training them")
        weights.update(ad)
    else:
        fresh = True
    out = []
    for spec in stage_specs(parse_split(split, stages, model.dims.layers), batch, seq):
        spec = peft_spec(spec, model.dims, peft.method, rank=peft.lora_rank,
                         alpha=peft.lora_alpha, adapter_size=peft.adapter_size)
        if peft.method == "lora":
            weights.update(lora_init(model.dims, spec, seed))
        elif peft.method == "adapter" and fresh:
            weights.update(adapter_init(model.dims, spec, seed))
        t0 = time.perf_counter()
        d = Path(out_dir) / f"stage{spec.index}"
        m = build_bundle(d, model.dims, spec, arch, weights, model.model_id, model.sha256,
                         configs=configs)
        print(f"  compiled stage {spec.index} ({peft.method}, layers {spec.first}.."
              f"{spec.last - 1}): {len(m.trainable)}/{len(m.params)} tensors trained, "
              f"{m.kernels} kernels, {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        out.append(d)
    return out, weights


def finetune_peft(*, peft: PeftConfig, model_dir=None, out_dir: str | Path = "runs/peft",
                  stages: int | None = 2, split: str | None = None, steps: int = 60,
                  batch: int = 8, micro_batches: int = 2, seq: int = 64, lr: float = 2e-4,
                  eval_examples: int = 256, seed: int = 0, threads: int | None = None,
                  export: bool = True, configs: dict | None = None,
                  tuning_db: str | Path | None = None, boards: bool = True,
                  layers: int | None = None) -> TrainReport:
    """`control.job.finetune` with a parameter-efficient trainable set.

    Parameters
    ----------
    peft : PeftConfig
        Method ("bitfit", "lora", "adapter") and its size.
    model_dir, out_dir, stages, split, steps, batch, micro_batches, seq, lr, eval_examples, seed,
    threads, export, configs, tuning_db, boards
        As for `control.job.finetune` (boards: one local `edgert serve` process per stage).
    layers : int, optional
        Keep only the first `layers` encoder layers (quick experiments and tests).

    Returns
    -------
    TrainReport
        Also written to `out_dir`/report.json; the export goes to `out_dir`/hf_model.

    Examples
    --------
    >>> rep = finetune_peft(peft=PeftConfig("adapter", adapter_size=16), lr=5e-3)  # doctest: +SKIP
    >>> print(rep.summary())                                                     # doctest: +SKIP
    """
    out_dir = Path(out_dir)
    model = load_model(model_dir, num_labels=2, head_seed=seed)
    if layers is not None:
        if not 1 <= layers <= model.dims.layers:
            raise ConfigError(f"layers must be in 1..{model.dims.layers}, got {layers}")
        model = dataclasses.replace(
            model, dims=dataclasses.replace(model.dims, layers=layers),
            config=dataclasses.replace(model.config, num_hidden_layers=layers),
            weights={k: v for k, v in model.weights.items()
                     if not k.startswith("encoder.layer.") or int(k.split(".")[2]) < layers})
    ranges = parse_split(split, stages, model.dims.layers)

    def compile_fn(sp: str, out: Path) -> list[Path]:
        return compile_peft_bundles(model, peft, out, stages=None, split=sp, batch=batch, seq=seq,
                                    seed=seed, threads=threads, configs=configs,
                                    tuning_db=tuning_db)[0]

    where = ClusterConfig(boards=len(ranges), in_process=not boards, threads=threads or 0)
    rep, params = train_report(model, Dense(compile_fn), where, ranges, out_dir, steps=steps,
                               batch=batch, micro_batches=micro_batches, seq=seq, lr=lr,
                               eval_examples=eval_examples, seed=seed,
                               label=f"train ({peft.method})")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps({**asdict(rep), "peft": asdict(peft)},
                                                    indent=1))
    if export:
        from compiler.export import export_hf_internal

        export_hf_internal(out_dir / "hf_model", model.config, params, model.path, 2,
                           lora_scale=peft.lora_scale, id2label=["negative", "positive"])
    return rep
