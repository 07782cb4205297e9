"""Parameter-efficient fine-tuning for the backprop pipeline: which parameters a stage trains.

BitFit (Ben Zaken et al. 2022) trains only the bias terms; LoRA (Hu et al. 2021) trains low-rank
factors A [r, D], B [3D, r] added to each layer's fused QKV projection:

    qkv = x W^T + b + s (x A^T) B^T,    s = alpha / r

(three independent LoRAs on query, key and value, stacked). Both also train the new classification
head (it starts random). Everything else is *frozen* with the stage graph's general mechanism
(compiler/stage.py [Note: frozen params]): frozen tensors are inputs of forward and backward, the
backward returns gradients for the trainable ones only, and AdamW state exists only for those.
`merge_lora` folds W + s B A into the base weight for export (compiler/export.py).

Bottleneck adapters (Houlsby et al. 2019; compiler/adapters.py) add h + up(gelu(down(h))) after each
layer's attention output dense and FFN output dense, and train the adapters, every LayerNorm and the
classifier head (`is_adapter_trainable`).

LoRA backward (dqkv from the attention VJP; x the layer input):

    xs = s x A^T [M, r] (saved)      dB = dqkv^T xs      dxa = s dqkv B      dA = dxa^T x
    dx += dxa A

    >>> from compiler.model_spec import StageSpec
    >>> spec = peft_spec(StageSpec(0, 1, 0, 1, 2, 16), _TINY, "bitfit")
    >>> sorted(n for n in trainable_names(spec, _TINY))[:3]
    ['classifier.bias', 'classifier.weight', 'embeddings.LayerNorm.bias']
"""

from __future__ import annotations

import dataclasses

import numpy as np
from tvm import te, tirx

from compiler.adapters import is_adapter_trainable
from compiler.arch import Arch
from compiler.kernels import gemm
from compiler.kernels.elementwise import resolve_arch, sched_rows
from compiler.model_spec import ModelDims, StageSpec, stage_params
from edgert.errors import ConfigError

METHODS = ("full", "bitfit", "lora", "adapter")


def is_bitfit_trainable(name: str) -> bool:
    """Biases (LayerNorm biases included) and the classifier head."""
    return name.endswith(".bias") or name.startswith("classifier.")


def frozen_names(spec: StageSpec, dims: ModelDims, method: str) -> tuple[str, ...]:
    """Parameter names of `spec` that `method` freezes, in stage_params order."""
    if method not in METHODS:
        raise ConfigError(f"unknown fine-tuning method {method!r}: use one of {list(METHODS)}")
    names = [n for n, _ in stage_params(spec, dims)]
    if method == "full":
        return ()
    if method == "lora":
        return tuple(n for n in names if ".lora_" not in n and not n.startswith("classifier."))
    if method == "adapter":
        return tuple(n for n in names if not is_adapter_trainable(n))
    return tuple(n for n in names if not is_bitfit_trainable(n))


def peft_spec(spec: StageSpec, dims: ModelDims, method: str, *, rank: int = 8,
              alpha: float = 16.0, adapter_size: int = 16) -> StageSpec:
    """`spec` with the method's frozen set added to whatever it froze already (and, for LoRA,
    the rank and alpha; for adapters, their bottleneck size)."""
    if method == "adapter":
        if isinstance(adapter_size, bool) or not isinstance(adapter_size, int) or adapter_size < 1:
            raise ConfigError(f"bottleneck adapters need adapter_size >= 1 (e.g. 16), got "
                              f"{adapter_size!r}")
        spec = dataclasses.replace(spec, adapter_size=adapter_size)   # validated by StageSpec
    if method == "lora":
        if rank < 1 or not alpha > 0:
            raise ConfigError(f"LoRA needs rank >= 1 and alpha > 0, got rank {rank}, alpha {alpha}")
        spec = dataclasses.replace(spec, lora_rank=rank, lora_alpha=float(alpha))
    frozen = set(spec.frozen) | set(frozen_names(spec, dims, method))
    order = [n for n, _ in stage_params(spec, dims) if n in frozen]
    return dataclasses.replace(spec, frozen=tuple(order))


def trainable_names(spec: StageSpec, dims: ModelDims) -> list[str]:
    fz = set(spec.frozen)
    return [n for n, _ in stage_params(spec, dims) if n not in fz]


def lora_scale(spec: StageSpec) -> float:
    return spec.lora_alpha / spec.lora_rank


def lora_init(dims: ModelDims, spec: StageSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """Initial LoRA factors: A ~ N(0, 1/D) (seeded), B = 0 (the model starts unchanged)."""
    rng = np.random.default_rng([seed, 0x10A])
    out = {}
    for li in range(spec.first, spec.last):
        pre = f"encoder.layer.{li}.attention.self.qkv."
        out[pre + "lora_A"] = (rng.standard_normal((spec.lora_rank, dims.hidden))
                               / np.sqrt(dims.hidden)).astype(np.float32)
        out[pre + "lora_B"] = np.zeros((3 * dims.hidden, spec.lora_rank), np.float32)
    return out


def merge_lora(weights: dict[str, np.ndarray], scale: float) -> dict[str, np.ndarray]:
    """Internal weights with every layer's LoRA folded in: qkv.weight += scale B A (float64 sum,
    rounded once); the lora tensors are dropped."""
    out = {k: v for k, v in weights.items() if ".lora_" not in k}
    for k in weights:
        if k.endswith(".qkv.lora_A"):
            pre = k[: -len("lora_A")]
            a = np.asarray(weights[k], np.float64)
            b = np.asarray(weights[pre + "lora_B"], np.float64)
            w = out[pre + "weight"]
            out[pre + "weight"] = (w.astype(np.float64) + scale * (b @ a)).astype(w.dtype)
    return out


# ---- graph pieces (called from compiler/stage.py) ------------------------------------------------
def build_scale(M: int, N: int, *, s: float, dtype: str = "float32", arch: Arch | None = None,
                config: dict | None = None) -> tirx.PrimFunc:
    """y [M, N] = s * x."""
    arch = resolve_arch(arch)
    x = te.placeholder((M, N), dtype, name="x")
    y = te.compute((M, N), lambda i, j: x[i, j] * tirx.const(s, dtype), name="y")
    f = te.create_prim_func([x, y])
    return sched_rows(f, "y", arch, dtype) if arch.is_cpu else f


def lora_forward(g, x, qkv, P):
    """qkv + s (x A^T) B^T for one layer; returns (new qkv, saved tensors)."""
    E, M, D, r = g.E, g.M, g.d.hidden, g.s.lora_rank
    (xa,) = E(gemm.build_gemm, [x, P["attention.self.qkv.lora_A"]], M, r, D, trans_b=True)
    (xs,) = E(build_scale, [xa], M, r, s=lora_scale(g.s))
    (out,) = E(gemm.build_gemm, [xs, P["attention.self.qkv.lora_B"], qkv], M, 3 * D, r,
               trans_b=True, epilogue="add")
    return out, {"lora_xs": xs}


def lora_backward(g, dqkv, dx, S, P, G):
    """Gradients of A and B; returns dx + the LoRA path's input gradient."""
    E, M, D, r = g.E, g.M, g.d.hidden, g.s.lora_rank
    (G["attention.self.qkv.lora_B"],) = E(gemm.build_gemm, [dqkv, S["lora_xs"]], 3 * D, r, M,
                                          trans_a=True)
    (dxs,) = E(gemm.build_gemm, [dqkv, P["attention.self.qkv.lora_B"]], M, r, 3 * D)
    (dxa,) = E(build_scale, [dxs], M, r, s=lora_scale(g.s))
    (G["attention.self.qkv.lora_A"],) = E(gemm.build_gemm, [dxa, S["x"]], r, D, M, trans_a=True)
    (dx,) = E(gemm.build_gemm, [dxa, P["attention.self.qkv.lora_A"], dx], M, D, r, epilogue="add")
    return dx


_TINY = ModelDims(vocab=10, hidden=8, layers=1, heads=2, ffn=16, max_pos=16, type_vocab=2,
                  eps=1e-12, hidden_dropout=0.1, attn_dropout=0.1, num_labels=2)


# ---- LoRA for LLaMA-style decoders (compiler/decoder_stage.py) ---------------------------------
def decoder_lora_spec(cfg, spec, *, rank: int = 8, alpha: float = 16.0):
    """A `compiler.llama.DecoderSpec` with LoRA factors on every layer's fused QKV and *every*
    base weight frozen (embedding, tied head, norms, projections): only the factors train, so the
    tied embedding/head needs no gradient exchange between the first and last stage."""
    if rank < 1 or not alpha > 0:
        raise ConfigError(f"LoRA needs rank >= 1 and alpha > 0, got rank {rank}, alpha {alpha}")
    spec = dataclasses.replace(spec, lora_rank=rank, lora_alpha=float(alpha), frozen=())
    return dataclasses.replace(spec, frozen=decoder_frozen(cfg, spec))


def decoder_frozen(cfg, spec) -> tuple[str, ...]:
    """Names of the base (non-LoRA) parameters of a decoder stage, in stage_params order."""
    from compiler.llama import stage_params as dec_params

    return tuple(n for n, _ in dec_params(cfg, spec) if ".lora_" not in n)


def decoder_lora_init(cfg, spec, seed: int = 0) -> dict[str, np.ndarray]:
    """Initial factors per layer: A ~ N(0, 1/H) (seeded by layer, so any split draws the same
    values), B = 0 (the model starts unchanged)."""
    from compiler.llama import LORA_A, LORA_B

    H = cfg.hidden_size
    C = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    out = {}
    for li in range(spec.first, spec.last):
        rng = np.random.default_rng([seed, 0x10A, li])
        pre = f"model.layers.{li}."
        out[pre + LORA_A] = (rng.standard_normal((spec.lora_rank, H)) / np.sqrt(H)
                             ).astype(np.float32)
        out[pre + LORA_B] = np.zeros((C, spec.lora_rank), np.float32)
    return out


def merge_decoder_lora(cfg, params: dict[str, np.ndarray], scale: float) -> dict[str, np.ndarray]:
    """Checkpoint-named weights with each layer's LoRA folded into q/k/v_proj (float64 sum)."""
    from compiler.llama import LORA_A, LORA_B

    d = cfg.head_dim
    nq, nkv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    out = {k: v for k, v in params.items() if ".lora_" not in k}
    for k in params:
        if k.endswith(LORA_A):
            pre = k[: -len(LORA_A)]
            delta = scale * (np.asarray(params[pre + LORA_B], np.float64)
                             @ np.asarray(params[k], np.float64))
            for x, rows in (("q", slice(0, nq)), ("k", slice(nq, nq + nkv)),
                            ("v", slice(nq + nkv, None))):
                w = out[pre + f"self_attn.{x}_proj.weight"]
                out[pre + f"self_attn.{x}_proj.weight"] = (w.astype(np.float64) + delta[rows]
                                                           ).astype(w.dtype)
    return out
