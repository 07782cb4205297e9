"""LLaMA-style decoders (SmolLM2, LLaMA): config, parameter names/shapes, and HF folder loading.

Parameters use the Hugging Face ``LlamaForCausalLM`` names (``model.embed_tokens.weight``,
``model.layers.{i}.self_attn.q_proj.weight``, ..., ``model.norm.weight``, ``lm_head.weight`` when
the head is not tied), so a checkpoint folder written by ``save_pretrained`` loads directly and what
we write back loads in ``transformers``. Linear weights are [out, in] (``y = x @ W.T``). The Q/K
rows are in Hugging Face's rotary layout (rotate-half pairs ``(j, j + head_dim/2)``); a GGUF file
stores them permuted for llama.cpp's interleaved layout and `compiler.gguf` undoes that.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compiler.quant import QTensor, cat_rows, check_base_dtype
from edgert.contract import ACTIVATION
from edgert.errors import ModelError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
SUPPORTED_ACTIVATIONS = ("silu",)


@dataclass(frozen=True, slots=True)
class LlamaConfig:
    """Hyper-parameters of a LLaMA-style decoder (the subset of HF's ``LlamaConfig`` edgert uses).

    Examples
    --------
    >>> cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
    ...                   num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3)
    >>> cfg.head_dim, cfg.group
    (64, 3)
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads"):
            v = getattr(self, k)
            if not isinstance(v, int) or v <= 0:
                raise ModelError(f"LLaMA config: {k} must be a positive integer, found {v!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ModelError(
                f"LLaMA config: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}; fix config.json."
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelError(
                f"LLaMA config: num_attention_heads {self.num_attention_heads} is not a multiple "
                f"of "
                f"num_key_value_heads {self.num_key_value_heads} (grouped-query attention needs "
                "whole groups); fix config.json."
            )
        if self.head_dim % 2:
            raise ModelError(f"LLaMA config: head_dim {self.head_dim} must be even for rotary")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads

    @property
    def group(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    def to_hf_json(self) -> dict[str, Any]:
        """The ``config.json`` object ``transformers.LlamaConfig`` reads."""
        d = asdict(self)
        d.update(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
                 head_dim=self.head_dim, attention_bias=False, mlp_bias=False)
        return d

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], source: str = CONFIG_FILE) -> LlamaConfig:
        """Build and check a config from a parsed HF ``config.json`` (model_type ``llama``)."""
        if not isinstance(raw, Mapping):
            raise ModelError(f"{source}: expected a JSON object, found {type(raw).__name__}")
        if raw.get("model_type") != "llama":
            raise ModelError(
                f"{source}: model_type {raw.get('model_type')!r} is not a LLaMA-style decoder; "
                "the decoder path loads model_type 'llama' folders (SmolLM2, LLaMA) or GGUF files."
            )
        if raw.get("hidden_act", "silu") not in SUPPORTED_ACTIVATIONS:
            raise ModelError(f"{source}: hidden_act {raw.get('hidden_act')!r} is not supported "
                             f"(only {SUPPORTED_ACTIVATIONS})")
        for k in ("attention_bias", "mlp_bias"):
            if raw.get(k):
                raise ModelError(f"{source}: {k}=true is not supported (LLaMA has no biases)")
        rope = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
        if isinstance(rope, Mapping) and rope.get("rope_type", rope.get("type", "default")) not in (
            "default", None
        ):
            raise ModelError(f"{source}: rope scaling {rope!r} is not supported (plain RoPE only)")
        theta = raw.get("rope_theta", rope.get("rope_theta", 10000.0) if isinstance(rope, Mapping)
                        else 10000.0)
        heads = raw.get("num_attention_heads")
        hd = raw.get("head_dim")
        if hd is not None and heads and hd * heads != raw.get("hidden_size"):
            raise ModelError(f"{source}: head_dim {hd} x heads {heads} != hidden_size; unsupported")
        try:
            return cls(
                vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
                intermediate_size=raw["intermediate_size"],
                num_hidden_layers=raw["num_hidden_layers"], num_attention_heads=heads,
                num_key_value_heads=raw.get("num_key_value_heads", heads),
                rope_theta=float(theta), rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
                max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
                bos_token_id=raw.get("bos_token_id"), eos_token_id=_first(raw.get("eos_token_id")),
                pad_token_id=raw.get("pad_token_id"),
            )
        except KeyError as e:
            raise ModelError(f"{source}: missing key {e}; re-export the checkpoint") from e


def _first(v: Any) -> Any:
    return v[0] if isinstance(v, list) and v else v


def param_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of ``LlamaForCausalLM`` by HF name, in model order."""
    H, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_key_value_heads * cfg.head_dim
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (H, H),
            p + "self_attn.k_proj.weight": (kv, H),
            p + "self_attn.v_proj.weight": (kv, H),
            p + "self_attn.o_proj.weight": (H, H),
            p + "post_attention_layernorm.weight": (H,),
            p + "mlp.gate_proj.weight": (I, H),
            p + "mlp.up_proj.weight": (I, H),
            p + "mlp.down_proj.weight": (H, I),
        })
    out["model.norm.weight"] = (H,)
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (V, H)
    return out


@dataclass(frozen=True)
class LlamaCheckpoint:
    """A loaded decoder: config, float32 weights by HF name, and the folder it came from."""

    config: LlamaConfig
    params: dict[str, np.ndarray]
    path: Path

    @property
    def tokenizer_file(self) -> Path:
        """``tokenizer.json`` next to the weights (load with ``tokenizers.Tokenizer.from_file``)."""
        return self.path / TOKENIZER_FILE

    def num_params(self) -> int:
        return sum(int(v.size) for v in self.params.values())


def check_params(cfg: LlamaConfig, params: Mapping[str, np.ndarray], source: str) -> None:
    """Raise `ModelError` naming the first missing, unexpected or mis-shaped tensor."""
    want = param_shapes(cfg)
    missing = [k for k in want if k not in params]
    if missing:
        raise ModelError(f"{source}: {len(missing)} tensor(s) missing, e.g. {missing[0]!r}; "
                         "the file is not a complete LLaMA checkpoint for its config.")
    extra = [k for k in params if k not in want and not k.endswith("rotary_emb.inv_freq")]
    if extra:
        raise ModelError(f"{source}: unexpected tensor {extra[0]!r} (architecture mismatch: "
                         "edgert loads plain LlamaForCausalLM checkpoints)")
    for k, shape in want.items():
        if tuple(params[k].shape) != shape:
            raise ModelError(f"{source}: tensor {k!r} has shape {tuple(params[k].shape)}, the "
                             f"config implies {shape}; config.json and the weights disagree.")


def load_llama(path: str | Path) -> LlamaCheckpoint:
    """Load a Hugging Face LLaMA-style folder (``config.json`` + ``model.safetensors``) as float32.

    Parameters
    ----------
    path : str or Path
        A folder written by ``LlamaForCausalLM.save_pretrained`` (float32, float16 or bfloat16),
        or one written by `compiler.gguf.load_gguf`'s cache.

    Returns
    -------
    LlamaCheckpoint

    Raises
    ------
    ModelError
        If the folder, config or weights are missing, corrupt, or not a plain LLaMA decoder.

    Examples
    --------
    >>> from compiler.gguf import load_gguf, default_gguf_file
    >>> ck = load_gguf(default_gguf_file())          # doctest: +SKIP
    >>> ck2 = load_llama(ck.path)                    # the cache is an HF folder  # doctest: +SKIP
    """
    from compiler.hf import _read_tensors

    folder = Path(path)
    cfg_path, w_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise ModelError(f"{p}: missing; a LLaMA checkpoint folder needs {CONFIG_FILE} and "
                             f"{WEIGHTS_FILE} (save_pretrained writes both), or pass a .gguf file "
                             "to compiler.gguf.load_gguf.")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{cfg_path}: not valid JSON ({e}); re-export the checkpoint.") from e
    cfg = LlamaConfig.from_json(raw, source=str(cfg_path))
    tensors = _read_tensors(w_path)
    params = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()
              if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_word_embeddings:
        params.pop("lm_head.weight", None)   # some exporters write the tied copy too
    check_params(cfg, params, str(w_path))
    return LlamaCheckpoint(cfg, params, folder)


# ---- pipeline stages ---------------------------------------------------------------------------
# Compiled stages hold QKV and gate/up fused (one GEMM each); the host fuses/splits names so users
# only see checkpoint names. A tied LM head that lands on another stage than the embedding is
# held as a copy named ``lm_head.weight`` there (see docs/decoder.md, tied weights).
QKV = "self_attn.qkv_proj.weight"
GATE_UP = "mlp.gate_up_proj.weight"
LORA_A = "self_attn.qkv_proj.lora_A"   # [r, H]   LoRA on the fused QKV (docs/decoder.md)
LORA_B = "self_attn.qkv_proj.lora_B"   # [C, r]


@dataclass(frozen=True, slots=True)
class DecoderSpec:
    """One pipeline stage of a decoder: layers [first, last), batch x seq tokens."""

    first: int
    last: int
    num_layers: int
    batch: int
    seq: int
    index: int = 0                     # position in the pipeline (bundle manifests need it)
    num_stages: int = 1
    frozen: tuple[str, ...] = ()       # inputs only: no gradient, no AdamW state
    lora_rank: int = 0                 # > 0: LoRA factors on every layer's fused QKV
    lora_alpha: float = 16.0
    base_dtype: str = "f32"            # frozen weights as GGUF blocks: "q8_0" / "q4_1" (quant.py)

    def __post_init__(self) -> None:
        check_base_dtype(self.base_dtype)
        if not 0 <= self.first < self.last <= self.num_layers:
            raise ModelError(f"decoder stage layers [{self.first}, {self.last}) are not inside "
                             f"0..{self.num_layers}; use a split like 0:10,10:20,20:30")
        if self.batch < 1 or self.seq < 2:
            raise ModelError(f"batch {self.batch} / seq {self.seq}: need batch >= 1, seq >= 2")
        if not 0 <= self.index < self.num_stages or self.lora_rank < 0:
            raise ModelError(f"stage index {self.index} of {self.num_stages} / LoRA rank "
                             f"{self.lora_rank}: need 0 <= index < num_stages and rank >= 0")

    @property
    def has_embeddings(self) -> bool:
        return self.first == 0

    @property
    def has_head(self) -> bool:
        return self.last == self.num_layers


def stage_params(cfg: LlamaConfig, spec: DecoderSpec) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of a stage's parameters in the order of its entry points."""
    H, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    C = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    out: list[tuple[str, tuple[int, ...]]] = []
    if spec.has_embeddings:
        out.append(("model.embed_tokens.weight", (V, H)))
    for i in range(spec.first, spec.last):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (H,)), (p + QKV, (C, H))]
        if spec.lora_rank:
            out += [(p + LORA_A, (spec.lora_rank, H)), (p + LORA_B, (C, spec.lora_rank))]
        out += [(p + "self_attn.o_proj.weight", (H, H)),
                (p + "post_attention_layernorm.weight", (H,)), (p + GATE_UP, (2 * I, H)),
                (p + "mlp.down_proj.weight", (H, I))]
    if spec.has_head:
        out.append(("model.norm.weight", (H,)))
        if not (cfg.tie_word_embeddings and spec.has_embeddings):
            out.append(("lm_head.weight", (V, H)))
    return out


def stage_arrays(cfg: LlamaConfig, spec: DecoderSpec, params: Mapping[str, np.ndarray]
                 ) -> list[np.ndarray]:
    """The stage's parameter arrays (fused, float32) from checkpoint-named `params`. Weights
    given as GGUF blocks (`compiler.quant.QTensor`, e.g. from `compiler.gguf.load_gguf_blocks`)
    stay blocks (fused exactly, row-wise); `compiler.build.write_bundle` stores them as the
    stage's `base_dtype` asks."""
    out = []
    for name, _ in stage_params(cfg, spec):
        if name.endswith(QKV):
            p = name[: -len(QKV)] + "self_attn."
            a = cat_rows([params[p + f"{x}_proj.weight"] for x in "qkv"])
        elif name.endswith(GATE_UP):
            p = name[: -len(GATE_UP)] + "mlp."
            a = cat_rows([params[p + "gate_proj.weight"], params[p + "up_proj.weight"]])
        elif name == "lm_head.weight" and cfg.tie_word_embeddings:
            a = params["model.embed_tokens.weight"]
        else:
            a = params[name]
        out.append(a if isinstance(a, QTensor) else np.ascontiguousarray(a, dtype=np.float32))
    return out


def split_grads(cfg: LlamaConfig, spec: DecoderSpec, grads: list[np.ndarray]
                ) -> dict[str, np.ndarray]:
    """Stage gradients (fused, in `stage_params` order) under checkpoint names.

    A tied head's copy comes back as ``lm_head.weight``; the caller adds it to the embedding's.
    """
    H, d = cfg.hidden_size, cfg.head_dim
    nq, nkv, I = cfg.num_attention_heads * d, cfg.num_key_value_heads * d, cfg.intermediate_size
    out: dict[str, np.ndarray] = {}
    for (name, _), g in zip(stage_params(cfg, spec), grads, strict=True):
        if name.endswith(QKV):
            p = name[: -len(QKV)] + "self_attn."
            out[p + "q_proj.weight"], out[p + "k_proj.weight"], out[p + "v_proj.weight"] = (
                g[:nq], g[nq:nq + nkv], g[nq + nkv:])
        elif name.endswith(GATE_UP):
            p = name[: -len(GATE_UP)] + "mlp."
            out[p + "gate_proj.weight"], out[p + "up_proj.weight"] = g[:I], g[I:]
        else:
            out[name] = g
    del H
    return out


def stage_io(cfg: LlamaConfig, spec: DecoderSpec, dtype: str = "float32"):
    """(data inputs, leading outputs) of a decoder stage as (name, shape, dtype) triples, in the
    order of ``stage_forward`` (the bundle manifest records them; compiler/build.py)."""
    B, T, H = spec.batch, spec.seq, cfg.hidden_size
    data = [("input_ids", (B, T), "int64") if spec.has_embeddings
            else (ACTIVATION, (B * T, H), dtype), ("attention_mask", (B, T), "int64")]
    if spec.has_head:
        data.append(("labels", (B, T), "int64"))
    outs = ([("loss", (1,), dtype), ("logits", (B * T, cfg.vocab_size), dtype)] if spec.has_head
            else [(ACTIVATION, (B * T, H), dtype)])
    return data, outs
