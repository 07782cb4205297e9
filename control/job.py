"""The BERT text-classification job: the checkpoint, its compiled stages, the Rotten Tomatoes data
order and evaluation (`Job`), and `finetune` (`edgert train`: the job without a run directory).

An unattended run with checkpoints (control/run.py, the README's first command) trains the same
`Job` through the same loop (control/loop.py).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from compiler.model_spec import ModelDims, fuse_qkv, parse_split, split_qkv, stage_specs
from control.connect import ClusterConfig
from control.local import LocalPipeline, OptimConfig
from control.modes import Dense
from control.train import train
from edgert.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class Model:
    """A checkpoint prepared for compilation: dims, internal (fused) weights, provenance."""

    config: object           # compiler.hf.BertConfig
    dims: ModelDims
    weights: dict[str, np.ndarray]
    model_id: str
    sha256: str
    path: Path

    def hf_weights(self) -> dict[str, np.ndarray]:
        return split_qkv(self.weights)


def load_model(model_dir: str | Path | None = None, num_labels: int = 2,
               head_seed: int = 0) -> Model:
    """Read a Hugging Face BERT folder (default: the installed all-MiniLM-L6-v2), add a new head."""
    from compiler.hf import default_model_dir, init_head, load_bert

    path = Path(model_dir) if model_dir else default_model_dir()
    ck = load_bert(path)
    w = dict(ck.weights)
    if "classifier.weight" not in w or w["classifier.weight"].shape[0] != num_labels:
        w.update(init_head(ck.config, num_labels, head_seed, weights=w))
    dims = ModelDims.from_config(ck.config, num_labels)
    return Model(ck.config, dims, fuse_qkv(w, dims.layers), path.name, ck.sha256, path)


def compile_bundles(model: Model, out_dir: str | Path, *, stages: int | None = None,
                    split: str | None = None, batch: int = 8, seq: int = 128, target: str = "host",
                    dropout: bool = True, threads: int | None = None,
                    configs: dict | None = None, progress: bool = True,
                    tuning_db: str | Path | None = None, head_split: bool = False) -> list[Path]:
    """Compile the model into K stage bundles under `out_dir`/stage{i}; returns their paths.

    `head_split`: each layer's attention runs split over the board's two backends, at the split
    the board tunes when it loads the stage (docs/head_split.md).

    `configs`: kernel configs by workload key; None = the board's tuning database (`tuning_db`, by
    default compiler.kernel_tuning.default_db_path(), if it exists); {} = the kernels' default
    schedules."""
    from compiler.arch import get_arch
    from compiler.build import build_bundle

    arch = get_arch(target, threads)
    if configs is None:
        from compiler.kernel_tuning import board_configs

        configs = board_configs(arch, tuning_db)
        if progress and configs:
            print(f"  using {len(configs)} tuned kernel configs ({tuning_db or 'board database'})",
                  file=sys.stderr)
    ranges = parse_split(split, stages, model.dims.layers)
    if seq > model.dims.max_pos:
        raise ConfigError(f"--seq {seq} exceeds the model's {model.dims.max_pos} positions")
    out = []
    for spec in stage_specs(ranges, batch, seq, dropout):
        t0 = time.perf_counter()
        if progress:
            print(f"  compiling stage {spec.index + 1}/{len(ranges)} (layers {spec.first}.."
                  f"{spec.last - 1}, target {target}) ...", end="", flush=True, file=sys.stderr)
        d = Path(out_dir) / f"stage{spec.index}"
        m = build_bundle(d, model.dims, spec, arch, model.weights, model.model_id, model.sha256,
                         configs=configs, head_split=head_split)
        if progress:
            print(f" {m.kernels} kernels, {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        out.append(d)
    return out


@dataclass
class Job:
    """What one BERT classification job is, prepared once: model, data order, optimizer.

    The data order and the dropout seeds are pure functions of (seed, step, micro-batch), so a
    resumed or recovered run computes what the uninterrupted one does (control/run.py)."""

    model: Model
    train_enc: dict[str, np.ndarray]
    train_y: np.ndarray
    test_batches: list[dict[str, np.ndarray]]
    opt: OptimConfig
    batch: int
    micro_batches: int
    seed: int

    @property
    def per_epoch(self) -> int:
        return len(self.train_y) // self.batch

    def position(self, step: int) -> dict[str, int]:
        """Where the data order stands after `step` optimizer steps."""
        done = step * self.micro_batches
        epoch, pos = divmod(done, self.per_epoch)
        return {"epoch": epoch, "position": pos, "batches_done": done}

    def micro(self, step: int) -> list[dict[str, np.ndarray]]:
        """The micro-batches of optimizer step `step` (1-based): a pure function of the step."""
        from control.data import iterate_batches

        out = []
        for j in range(self.micro_batches):
            epoch, pos = divmod((step - 1) * self.micro_batches + j, self.per_epoch)
            _, b = next(iterate_batches(self.train_enc, self.train_y, self.batch, self.seed,
                                        epoch, pos))
            out.append(b.as_dict())
        return out

    def evaluate(self, pipe: LocalPipeline) -> dict[str, float]:
        """Held-out loss and accuracy (dropout off)."""
        loss, acc = pipe.evaluate(self.test_batches)
        return {"loss": loss, "accuracy": acc, "examples": len(self.test_batches) * self.batch}


def make_job(model: Model, *, steps: int, batch: int, micro_batches: int, seq: int, lr: float,
             eval_examples: int, seed: int, warmup_steps: int | None = None) -> Job:
    """The Rotten Tomatoes job for `model` (warm-up: `warmup_steps`, default steps // 10)."""
    enc, y, test = rotten_tomatoes_batches(model.path / "tokenizer.json", seq, batch,
                                           eval_examples, seed)
    warm = max(1, steps // 10) if warmup_steps is None else warmup_steps
    opt = OptimConfig(lr=lr, warmup_steps=warm, total_steps=steps)
    return Job(model, enc, np.asarray(y), test, opt, batch, micro_batches, seed)


@dataclass
class TrainReport:
    steps: int
    stages: int
    split: list[tuple[int, int]]
    batch: int
    micro_batches: int
    seq: int
    losses: list[float] = field(default_factory=list)
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    step_seconds: list[float] = field(default_factory=list)
    compile_seconds: float = 0.0
    boards: list[dict] = field(default_factory=list)   # per board: name, stage, peak RSS (MiB)

    def summary(self) -> str:
        b, a = self.before, self.after
        med = float(np.median(self.step_seconds)) if self.step_seconds else float("nan")
        nan = float("nan")
        return "\n".join([
            f"fine-tuned {self.steps} steps on {self.stages} compiled stage(s) {self.split}, "
            f"{self.micro_batches} x {self.batch} sequences of {self.seq} tokens per step",
            f"  held-out loss     {b.get('loss', nan):.4f} -> {a.get('loss', nan):.4f}",
            f"  held-out accuracy {100 * b.get('accuracy', 0):.1f}% -> "
            f"{100 * a.get('accuracy', 0):.1f}%  ({a.get('examples', 0)} sentences)",
            f"  train loss first/last {self.losses[0]:.4f} / {self.losses[-1]:.4f}"
            if self.losses else "",
            f"  median step {1000 * med:.0f} ms; compile {self.compile_seconds:.1f}s",
            *(f"  {b['name']}: stage {b['stage']}, peak RSS {b['peak_rss_mib']:.0f} MiB "
              f"(pid {b['pid']})" for b in self.boards),
        ])


def rotten_tomatoes_batches(tokenizer_file: Path, seq: int, batch: int, eval_examples: int,
                            seed: int):
    """Tokenised train/test splits of the Rotten Tomatoes sentence-polarity set."""
    from control.data import Tokenizer, load_rotten_tomatoes, split

    texts, labels = load_rotten_tomatoes()
    tr_x, tr_y, te_x, te_y = split(texts, labels, 0.2, seed)
    tok = Tokenizer(tokenizer_file)
    n_eval = (min(eval_examples, len(te_x)) // batch) * batch
    # A seeded random subset: the file is ordered by label, so its head is not a fair sample.
    pick = np.sort(np.random.default_rng([seed, 1]).permutation(len(te_x))[:n_eval])
    test = tok.encode([te_x[i] for i in pick], seq)
    te_y = np.asarray(te_y)[pick]
    test_batches = [
        {**{k: v[i:i + batch] for k, v in test.items()}, "labels": te_y[i:i + batch]}
        for i in range(0, n_eval, batch)]
    return tok.encode(tr_x, seq), tr_y, test_batches


def finetune(*, model_dir=None, out_dir: str | Path = "runs/quickstart", stages: int | None = 2,
             split: str | None = None, steps: int = 60, batch: int = 8, micro_batches: int = 2,
             seq: int = 64, lr: float = 2e-4, eval_examples: int = 256, seed: int = 0,
             threads: int | None = None, export: bool = True, configs: dict | None = None,
             tuning_db: str | Path | None = None, boards: bool = True,
             head_split: bool = False, registry: str | Path | None = None,
             board_names: list[str] | None = None, target: str = "host") -> TrainReport:
    """The main job: fine-tune a BERT checkpoint on Rotten Tomatoes through K compiled stages.

    `registry`: train on running board daemons listed in a board registry (`KEYS/boards.json`,
    written by boards/provision.sh) instead of local processes: the first K of `board_names`
    (default: the registry's order) take the K stages (control/remote.py). `target`: what the
    stages are compiled for (e.g. "arm64" for provisioned ARM boards; docs/targets.md).

    `head_split`: every attention layer runs split over each board's two backends at the split the
    board tunes when it loads its stage (docs/head_split.md); the choice is in `rep.boards`.

    With `boards` (the default) every stage runs on its own local board process (edgert serve, CURVE
    ZeroMQ on 127.0.0.1) in 1F1B pipeline order; otherwise all stages run in this process. Held-out
    evaluation and the export run in this process, on the weights the boards return. `threads`:
    see [Note: threads per board] in control/connect.py.
    """
    if head_split and not boards:
        raise ConfigError("head split runs on board processes (each splits its attention over "
                          "its own backends); drop --in-process or --head-split")
    if registry is not None and not boards:
        raise ConfigError("--registry names boards to train on: drop --in-process")
    if registry is not None:                      # fail on a bad registry before compiling
        from control.remote import read_registry

        read_registry(registry, board_names)
    out_dir = Path(out_dir)
    model = load_model(model_dir, num_labels=2, head_seed=seed)
    ranges = parse_split(split, stages, model.dims.layers)

    def compile_fn(sp: str, out: Path) -> list[Path]:
        return compile_bundles(model, out, split=sp, batch=batch, seq=seq, threads=threads,
                               configs=configs, tuning_db=tuning_db, head_split=head_split,
                               target=target)

    mode = Dense(compile_fn)
    where = ClusterConfig(boards=len(ranges), in_process=not boards,
                          registry=str(registry or ""), board_names=tuple(board_names or ()),
                          threads=threads or 0)
    rep, params = train_report(model, mode, where, ranges, out_dir, steps=steps, batch=batch,
                               micro_batches=micro_batches, seq=seq, lr=lr,
                               eval_examples=eval_examples, seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(asdict(rep), indent=1))
    if export:
        from compiler.export import export_hf

        export_hf(out_dir / "hf_model", model.config, split_qkv(params), model.path, 2,
                  id2label=["negative", "positive"])
    return rep


def train_report(model: Model, mode: Dense, where: ClusterConfig,
                 ranges: list[tuple[int, int]], out_dir: Path, *, steps: int, batch: int,
                 micro_batches: int, seq: int, lr: float, eval_examples: int, seed: int,
                 label: str = "train") -> tuple[TrainReport, dict[str, np.ndarray]]:
    """Compile, train and evaluate `model` in `mode` (`edgert train`, plain or PEFT): the report
    and the final weights."""
    t0 = time.perf_counter()
    split = ",".join(f"{a}:{b}" for a, b in ranges)
    mode.compile(split, out_dir / "bundles")
    rep = TrainReport(steps, len(ranges), ranges, batch, micro_batches, seq,
                      compile_seconds=time.perf_counter() - t0)
    job = make_job(model, steps=steps, batch=batch, micro_batches=micro_batches, seq=seq, lr=lr,
                   eval_examples=eval_examples, seed=seed)
    out = train(job, mode, where, ranges, out_dir / "bundles", steps=steps, seed=seed,
                label=label)
    rep.losses, rep.step_seconds, rep.boards = out.losses, out.step_seconds, out.boards
    rep.before, rep.after = out.metrics(0), out.metrics(-1)
    return rep, out.params
