"""What a stage is: its layer range, the tensors it owns, and the tensors it saves for backward.

Pure data (no TVM): shared by the graph builder (compiler/stage.py), the bundle writer, the runner
and the planners. Parameter names are the Hugging Face checkpoint's (without the "bert." prefix), except
that each layer's query/key/value projections are held fused as one `attention.self.qkv` tensor
([3*hidden, hidden]) so that one matmul computes them; `fuse_qkv`/`split_qkv` convert on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from compiler.quant import check_base_dtype
from edgert.errors import ConfigError


@dataclass(frozen=True, slots=True)
class ModelDims:
    """The shape facts of a BERT encoder that the compiled kernels depend on."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    ffn: int
    max_pos: int
    type_vocab: int
    eps: float
    hidden_dropout: float
    attn_dropout: float
    num_labels: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @classmethod
    def from_config(cls, cfg, num_labels: int) -> ModelDims:
        return cls(
            vocab=cfg.vocab_size, hidden=cfg.hidden_size, layers=cfg.num_hidden_layers,
            heads=cfg.num_attention_heads, ffn=cfg.intermediate_size,
            max_pos=cfg.max_position_embeddings, type_vocab=cfg.type_vocab_size,
            eps=cfg.layer_norm_eps, hidden_dropout=cfg.hidden_dropout_prob,
            attn_dropout=cfg.attention_probs_dropout_prob, num_labels=num_labels,
        )


@dataclass(frozen=True, slots=True)
class StageSpec:
    """One pipeline stage: encoder layers [first, last), plus embeddings (first stage) and the
    pooler/classifier/loss head (last stage), for a fixed micro-batch shape."""

    index: int
    num_stages: int
    first: int
    last: int
    batch: int
    seq: int
    dropout: bool = True
    # Parameters that are stage inputs but are not trained: no gradient, no AdamW state (see
    # [Note: frozen params] in compiler/stage.py). Full internal names, e.g. FAR's frozen FFN parts.
    frozen: tuple[str, ...] = ()
    # FAR (docs/far.md): > 0 splits every layer's FFN into `ffn_learners` leading (learner) nodes
    # and the rest (frozen); the parameters are then named by FAR_SPLIT instead of the dense ones.
    ffn_learners: int = 0
    # LoRA (compiler/peft.py): rank r > 0 adds, per layer, A [r, hidden] and B [3*hidden, r] on the
    # fused QKV projection: qkv = x W^T + b + (lora_alpha / r) (x A^T) B^T.
    lora_rank: int = 0
    lora_alpha: float = 0.0
    # Bottleneck adapters (Houlsby et al. 2019; compiler/peft.py): size r > 0 adds, per layer, one
    # adapter h + up(gelu(down(h))) after the attention output dense and one after the FFN output
    # dense (both after their dropout, before the residual add + LayerNorm); ADAPTER_PARAMS.
    adapter_size: int = 0
    # Storage of the frozen weights (compiler/quant.py, docs/quant.md): "f32", or GGUF blocks
    # "q8_0" / "q4_1" consumed by the quantized kernels; trainable tensors stay float32.
    base_dtype: str = "f32"

    def __post_init__(self) -> None:
        check_base_dtype(self.base_dtype)
        if self.adapter_size < 0:
            raise ConfigError(f"adapter_size must be >= 1 (or 0 for no adapters), got "
                              f"{self.adapter_size}; e.g. --adapter-size 16")
        if self.adapter_size and (self.lora_rank or self.ffn_learners):
            other = "LoRA" if self.lora_rank else "FAR (ffn_learners)"
            raise ConfigError(f"bottleneck adapters cannot be combined with {other} in one stage: "
                              "choose one parameter-efficient method (--peft adapter|lora|bitfit)")

    @property
    def has_embeddings(self) -> bool:
        return self.index == 0

    @property
    def has_head(self) -> bool:
        return self.index == self.num_stages - 1


def parse_split(text: str | None, stages: int | None, layers: int) -> list[tuple[int, int]]:
    """Layer ranges from `--split 0:2,2:4,4:6` or an even `--stages K`.

    >>> parse_split(None, 3, 6)
    [(0, 2), (2, 4), (4, 6)]
    """
    if text:
        try:
            ranges = [tuple(int(v) for v in part.split(":")) for part in text.split(",")]
        except ValueError:
            raise ConfigError(f"bad --split {text!r}: write layer ranges like 0:2,2:4,4:6") from None
        if any(len(r) != 2 for r in ranges):
            raise ConfigError(f"bad --split {text!r}: each range is start:stop, e.g. 0:2,2:6")
        pos = 0
        for a, b in ranges:
            if a != pos or b <= a:
                raise ConfigError(
                    f"bad --split {text!r}: ranges must be contiguous, non-empty and start at 0 "
                    f"(expected a range starting at {pos})")
            pos = b
        if pos != layers:
            raise ConfigError(f"bad --split {text!r}: covers layers 0..{pos}, the model has {layers}")
        return [(int(a), int(b)) for a, b in ranges]
    k = stages or 1
    if not 1 <= k <= layers:
        raise ConfigError(f"--stages must be between 1 and {layers} (the model's layer count), got {k}")
    # Equal layer counts; any remainder goes to the later stages, because the first stage also
    # holds the embeddings (on MiniLM the word embeddings alone are half the model's weights).
    base, extra = divmod(layers, k)
    sizes = [base + (1 if i >= k - extra else 0) for i in range(k)]
    bounds = [sum(sizes[:i]) for i in range(k + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def stage_specs(ranges, batch: int, seq: int, dropout: bool = True) -> list[StageSpec]:
    k = len(ranges)
    return [StageSpec(i, k, a, b, batch, seq, dropout) for i, (a, b) in enumerate(ranges)]


LAYER_PARAMS = (
    # (internal name suffix, shape as a function of dims)
    ("attention.self.qkv.weight", lambda d: (3 * d.hidden, d.hidden)),
    ("attention.self.qkv.bias", lambda d: (3 * d.hidden,)),
    ("attention.output.dense.weight", lambda d: (d.hidden, d.hidden)),
    ("attention.output.dense.bias", lambda d: (d.hidden,)),
    ("attention.output.LayerNorm.weight", lambda d: (d.hidden,)),
    ("attention.output.LayerNorm.bias", lambda d: (d.hidden,)),
    ("intermediate.dense.weight", lambda d: (d.ffn, d.hidden)),
    ("intermediate.dense.bias", lambda d: (d.ffn,)),
    ("output.dense.weight", lambda d: (d.hidden, d.ffn)),
    ("output.dense.bias", lambda d: (d.hidden,)),
    ("output.LayerNorm.weight", lambda d: (d.hidden,)),
    ("output.LayerNorm.bias", lambda d: (d.hidden,)),
)
EMBED_PARAMS = (
    ("embeddings.word_embeddings.weight", lambda d: (d.vocab, d.hidden)),
    ("embeddings.position_embeddings.weight", lambda d: (d.max_pos, d.hidden)),
    ("embeddings.token_type_embeddings.weight", lambda d: (d.type_vocab, d.hidden)),
    ("embeddings.LayerNorm.weight", lambda d: (d.hidden,)),
    ("embeddings.LayerNorm.bias", lambda d: (d.hidden,)),
)
HEAD_PARAMS = (
    ("pooler.dense.weight", lambda d: (d.hidden, d.hidden)),
    ("pooler.dense.bias", lambda d: (d.hidden,)),
    ("classifier.weight", lambda d: (d.num_labels, d.hidden)),
    ("classifier.bias", lambda d: (d.num_labels,)),
)


# FAR: a dense FFN tensor -> its (learner, frozen) parts; node n of the FFN is row n of the
# intermediate weight and bias and column n of the output weight.
FAR_SPLIT = {
    "intermediate.dense.weight": ("intermediate.learner.weight", "intermediate.frozen.weight"),
    "intermediate.dense.bias": ("intermediate.learner.bias", "intermediate.frozen.bias"),
    "output.dense.weight": ("output.learner.weight", "output.frozen.weight"),
}


def _far_layer(n: str, shape: tuple[int, ...], r: int, dims: ModelDims):
    """A layer parameter as FAR holds it: the dense tensor split along its FFN-node axis."""
    if n not in FAR_SPLIT:
        return [(n, shape)]
    if not 0 < r < dims.ffn:
        raise ConfigError(f"ffn_learners must be in 1..{dims.ffn - 1} (the FFN width), got {r}")
    axis = 1 if n.startswith("output.") else 0
    parts = []
    for name, k in zip(FAR_SPLIT[n], (r, dims.ffn - r), strict=True):
        parts.append((name, tuple(k if i == axis else s for i, s in enumerate(shape))))
    return parts


LORA_PARAMS = (
    ("attention.self.qkv.lora_A", lambda d, r: (r, d.hidden)),
    ("attention.self.qkv.lora_B", lambda d, r: (3 * d.hidden, r)),
)


# Bottleneck adapters: `<site>.adapter.{down,up}.{weight,bias}` with site "attention.output" (after
# the attention output dense) or "output" (after the FFN output dense); [out, in] layout as HF.
ADAPTER_SITES = ("attention.output", "output")
ADAPTER_PARAMS = (
    ("adapter.down.weight", lambda d, r: (r, d.hidden)),
    ("adapter.down.bias", lambda d, r: (r,)),
    ("adapter.up.weight", lambda d, r: (d.hidden, r)),
    ("adapter.up.bias", lambda d, r: (d.hidden,)),
)


def stage_params(spec: StageSpec, dims: ModelDims) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter a stage owns (trained or frozen), in the order its
    functions take them."""
    out: list[tuple[str, tuple[int, ...]]] = []
    if spec.has_embeddings:
        out += [(n, f(dims)) for n, f in EMBED_PARAMS]
    for li in range(spec.first, spec.last):
        for n, f in LAYER_PARAMS:
            parts = _far_layer(n, f(dims), spec.ffn_learners, dims) if spec.ffn_learners else \
                [(n, f(dims))]
            out += [(f"encoder.layer.{li}.{pn}", ps) for pn, ps in parts]
        if spec.lora_rank:   # LoRA factors of the fused QKV (compiler/peft.py)
            out += [(f"encoder.layer.{li}.{ln}", lf(dims, spec.lora_rank))
                    for ln, lf in LORA_PARAMS]
        if spec.adapter_size:   # bottleneck adapters (compiler/peft.py)
            out += [(f"encoder.layer.{li}.{site}.{an}", af(dims, spec.adapter_size))
                    for site in ADAPTER_SITES for an, af in ADAPTER_PARAMS]
    if spec.has_head:
        out += [(n, f(dims)) for n, f in HEAD_PARAMS]
    return out


def trainable_params(spec: StageSpec, dims: ModelDims) -> list[tuple[str, tuple[int, ...]]]:
    """The parameters a stage trains (stage_params minus `spec.frozen`), in the order its
    backward returns gradients and its optimizer takes them."""
    params = stage_params(spec, dims)
    unknown = set(spec.frozen) - {n for n, _ in params}
    if unknown:
        raise ConfigError(f"stage {spec.index} freezes parameters it does not own: "
                          f"{sorted(unknown)[:4]}; name them as compiler.model_spec.stage_params does")
    return [(n, s) for n, s in params if n not in set(spec.frozen)]


_QKV = ("query", "key", "value")


def fuse_qkv(weights: dict[str, np.ndarray], layers: int) -> dict[str, np.ndarray]:
    """Checkpoint names -> internal names (query/key/value stacked into qkv). Other tensors pass."""
    out = dict(weights)
    for li in range(layers):
        pre = f"encoder.layer.{li}.attention.self."
        for kind in ("weight", "bias"):
            parts = [out.pop(f"{pre}{q}.{kind}") for q in _QKV]
            out[f"{pre}qkv.{kind}"] = np.ascontiguousarray(np.concatenate(parts, axis=0))
    return out


def split_qkv(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Internal names -> checkpoint names (the inverse of fuse_qkv); works on gradients too."""
    out = {}
    for name, t in tensors.items():
        if ".attention.self.qkv." in name and name.rsplit(".", 1)[1] in ("weight", "bias"):
            pre, kind = name.split(".attention.self.qkv.")
            for q, part in zip(_QKV, np.split(t, 3, axis=0), strict=True):
                out[f"{pre}.attention.self.{q}.{kind}"] = np.ascontiguousarray(part)
        else:
            out[name] = t
    return out
