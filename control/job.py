"""The host-side job: load a checkpoint, compile its stages, fine-tune, evaluate, export.

This is what the README's first command runs (`edgert train` with every default), and what the
notebook API builds on.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from compiler.model_spec import ModelDims, fuse_qkv, parse_split, split_qkv, stage_specs
from control.local import LocalPipeline, OptimConfig
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


def load_model(model_dir: str | Path | None = None, num_labels: int = 2, head_seed: int = 0) -> Model:
    """Read a Hugging Face BERT folder (default: the installed all-MiniLM-L6-v2) and add a new head."""
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
    default compiler.kernel_tuning.default_db_path(), if it exists); {} = the kernels' default schedules."""
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
            print(f"  compiling stage {spec.index + 1}/{len(ranges)} (layers {spec.first}..{spec.last - 1}"
                  f", target {target}) ...", end="", flush=True, file=sys.stderr)
        d = Path(out_dir) / f"stage{spec.index}"
        m = build_bundle(d, model.dims, spec, arch, model.weights, model.model_id, model.sha256,
                         configs=configs, head_split=head_split)
        if progress:
            print(f" {m.kernels} kernels, {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        out.append(d)
    return out


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
        return "\n".join([
            f"fine-tuned {self.steps} steps on {self.stages} compiled stage(s) {self.split}, "
            f"{self.micro_batches} x {self.batch} sequences of {self.seq} tokens per step",
            f"  held-out loss     {b.get('loss', float('nan')):.4f} -> {a.get('loss', float('nan')):.4f}",
            f"  held-out accuracy {100 * b.get('accuracy', 0):.1f}% -> {100 * a.get('accuracy', 0):.1f}%"
            f"  ({a.get('examples', 0)} sentences)",
            f"  train loss first/last {self.losses[0]:.4f} / {self.losses[-1]:.4f}" if self.losses else "",
            f"  median step {1000 * med:.0f} ms; compile {self.compile_seconds:.1f}s",
            *(f"  {b['name']}: stage {b['stage']}, peak RSS {b['peak_rss_mib']:.0f} MiB (pid {b['pid']})"
              for b in self.boards),
        ])


def rotten_tomatoes_batches(tokenizer_file: Path, seq: int, batch: int, eval_examples: int, seed: int):
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
    evaluation and the export run in this process, on the weights the boards return.
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
    t0 = time.perf_counter()
    bundles = compile_bundles(model, out_dir / "bundles", stages=stages, split=split, batch=batch,
                              seq=seq, threads=threads, configs=configs, tuning_db=tuning_db,
                              head_split=head_split, target=target)
    compile_s = time.perf_counter() - t0
    pipe = LocalPipeline(bundles, threads=threads, run_seed=seed)
    tok_file = model.path / "tokenizer.json"
    train_enc, train_y, test_batches = rotten_tomatoes_batches(tok_file, seq, batch, eval_examples, seed)
    ranges = parse_split(split, stages, model.dims.layers)
    rep = TrainReport(steps, len(ranges), ranges, batch, micro_batches, seq, compile_seconds=compile_s)
    train_and_evaluate(rep, pipe, bundles, train_enc, train_y, test_batches, lr=lr, seed=seed,
                       threads=threads, boards=boards, registry=registry, board_names=board_names)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(asdict(rep), indent=1))
    if export:
        from compiler.export import export_hf

        export_hf(out_dir / "hf_model", model.config, split_qkv(pipe.params()), model.path, 2,
                  id2label=["negative", "positive"])
    return rep


def train_and_evaluate(rep: TrainReport, pipe: LocalPipeline, bundles: list[Path], train_enc,
                       train_y, test_batches, *, lr: float, seed: int, threads: int | None,
                       boards: bool, label: str = "train", registry: str | Path | None = None,
                       board_names: list[str] | None = None) -> None:
    """Held-out metrics, `rep.steps` optimizer steps of `rep.micro_batches` x `rep.batch`
    sentences, held-out metrics again, all recorded in `rep`. With `boards`, stage i trains on
    local board process i and the trained weights and moments are loaded back into `pipe`
    (which evaluates); otherwise `pipe` trains in this process."""
    from control.data import iterate_batches

    steps, batch = rep.steps, rep.batch
    loss, acc = pipe.evaluate(test_batches)
    rep.before = {"loss": loss, "accuracy": acc, "examples": len(test_batches) * batch}
    opt = OptimConfig(lr=lr, warmup_steps=max(1, steps // 10), total_steps=steps)
    it = iterate_batches(train_enc, train_y, batch, seed, 0)

    def run(trainer) -> None:
        bar = _Progress(steps, label)
        for _ in range(steps):
            micro = [next(it)[1].as_dict() for _ in range(rep.micro_batches)]
            t = time.perf_counter()
            rep.losses.append(trainer.train_step(micro, opt))
            rep.step_seconds.append(time.perf_counter() - t)
            bar.update(f"loss {rep.losses[-1]:.4f}")
        bar.close()

    if boards:
        k = len(bundles)
        with _cluster(k, threads, seed, registry, board_names) as cluster:
            cluster.deploy(bundles, micro_batches=rep.micro_batches)
            run(cluster)
            for i, b in enumerate(cluster.stages):
                st = cluster.stats(i)
                rep.boards.append({"name": b.name, "stage": i, "pid": b.proc.pid,
                                   "endpoint": b.endpoint,
                                   "peak_rss_mib": st["peak_rss"] / 2 ** 20,
                                   "head_split": st.get("head_split")})
            pipe.load_state(cluster.params(), cluster.optimizer_state(), steps)
    else:
        run(pipe)
    loss, acc = pipe.evaluate(test_batches)
    rep.after = {"loss": loss, "accuracy": acc, "examples": len(test_batches) * batch}


def _cluster(k: int, threads: int | None, seed: int, registry: str | Path | None,
             board_names: list[str] | None):
    """K local board processes, or the first K boards of a registry (control/remote.py)."""
    if registry is not None:
        from control.remote import AttachedCluster, read_registry

        names = list(read_registry(registry, board_names))
        if len(names) < k:
            raise ConfigError(f"{k} stages need {k} boards; {registry} lists {names}")
        print(f"  attaching to {k} boards of {registry}: {names[:k]} ...", file=sys.stderr)
        return AttachedCluster(registry, names[:k], run_seed=seed)
    from control.cluster import LocalCluster

    per_board = max(1, (threads or len(os.sched_getaffinity(0))) // k)
    print(f"  starting {k} local boards ({per_board} thread(s) each) ...", file=sys.stderr)
    return LocalCluster(k, threads=per_board, run_seed=seed)


class _Progress:
    """A dependency-free progress bar on stderr (one line, rewritten)."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.n, self.t0 = total, label, 0, time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, note: str = "") -> None:
        self.n += 1
        el = time.perf_counter() - self.t0
        eta = el / self.n * (self.total - self.n)
        w = 24
        fill = int(w * self.n / max(1, self.total))
        line = (f"  {self.label} [{'#' * fill}{'.' * (w - fill)}] {self.n}/{self.total} "
                f"{el:.0f}s<{eta:.0f}s {note}")
        if self.tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        elif self.n == self.total or self.n % max(1, self.total // 10) == 0:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)
