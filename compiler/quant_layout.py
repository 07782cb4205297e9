"""Which tensors of a stage are stored as GGUF blocks, and the bundle parameter file that holds
them (compiler/quant.py has the block formats).

[Note: what is quantized] `stage_formats(spec, dims)`: with ``spec.base_dtype`` "q8_0" or "q4_1",
every *frozen* weight that a quantized kernel consumes is stored quantized: the dense projections
in the base format, the (tied) token-embedding table and LM head in Q8_0 (llama.cpp's usual choice
for embeddings in 4-bit files: SmolLM2-135M-Instruct.Q4_1.gguf has Q8_0 token_embd; a gather has
no dot product to average rounding errors over). Norms, biases, trainable tensors, gradients and
AdamW state stay float32. A weight whose row length is not a multiple of 32 stays float32.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from compiler.llama import LlamaConfig
from compiler.llama import stage_params as dec_params
from compiler.model_spec import stage_params
from compiler.quant import EMBED_FORMAT, QK, check_base_dtype, stored_shape, to_stored
from edgert.errors import ModelError

# ---- which tensors a stage stores quantized ------------------------------------------------------
_BERT_DENSE = ("attention.self.qkv.weight", "attention.output.dense.weight",
               "intermediate.dense.weight", "output.dense.weight", "pooler.dense.weight")
_BERT_EMBED = ("embeddings.word_embeddings.weight",)
_LLAMA_DENSE = ("self_attn.qkv_proj.weight", "self_attn.o_proj.weight", "mlp.gate_up_proj.weight",
                "mlp.down_proj.weight")
_LLAMA_EMBED = ("model.embed_tokens.weight", "lm_head.weight")


def _params_of(spec, dims) -> list[tuple[str, tuple[int, ...]]]:
    if isinstance(dims, LlamaConfig):
        return dec_params(dims, spec)
    return stage_params(spec, dims)


def stage_formats(spec, dims) -> dict[str, str]:
    """Parameter name -> block format for the tensors `spec` stores quantized (see
    [Note: what is quantized]); empty for ``base_dtype == "f32"``."""
    base = check_base_dtype(getattr(spec, "base_dtype", "f32"))
    if base == "f32":
        return {}
    dense, embed = ((_LLAMA_DENSE, _LLAMA_EMBED) if isinstance(dims, LlamaConfig)
                    else (_BERT_DENSE, _BERT_EMBED))
    frozen = set(spec.frozen)
    out = {}
    for name, shape in _params_of(spec, dims):
        if name not in frozen or len(shape) != 2 or shape[1] % QK:
            continue
        if name.endswith(dense):
            out[name] = base
        elif name in embed:
            out[name] = EMBED_FORMAT
    return out


def stored_params(spec, dims) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, stored shape, dtype) of every parameter of a stage, in stage_params order."""
    fmts = stage_formats(spec, dims)
    return [(n, stored_shape(s, fmts[n]), "uint8") if n in fmts else (n, s, "float32")
            for n, s in _params_of(spec, dims)]


def with_base_dtype(spec, base_dtype: str):
    """`spec` (a StageSpec or DecoderSpec) with its frozen weights stored in `base_dtype`."""
    return dataclasses.replace(spec, base_dtype=check_base_dtype(base_dtype))


def bundle_params(spec, dims, names, params, dtype: str):
    """The parameter file of a stage bundle: (arrays by name, (name, shape, dtype) metas, report).

    `names` are the stage's (name, logical shape) pairs; `params` maps names to float arrays,
    QTensors or stored uint8 blocks. Tensors `stage_formats` names become blocks (the report gives
    each one's format, logical shape and relative quantization error: 0.0 for blocks kept as they
    came, None when only bare blocks were given); all others are `dtype` arrays as before."""
    fmts = stage_formats(spec, dims)
    arrays, metas, report = {}, [], {}
    for n, shape in names:
        fmt = fmts.get(n)
        a, err = to_stored(n, params[n], shape, fmt)
        if fmt is None:
            if tuple(np.shape(a)) != tuple(shape):
                raise ModelError(f"parameter {n} has shape {np.shape(a)}, the stage expects "
                                 f"{tuple(shape)}")
            a = np.ascontiguousarray(a, dtype=dtype)
            metas.append((n, tuple(shape), dtype))
        else:
            metas.append((n, tuple(a.shape), "uint8"))
            report[n] = {"format": fmt, "shape": [int(s) for s in shape], "rel_error": err}
        arrays[n] = a
    return arrays, metas, report


def stage_param_bytes(spec, dims) -> dict[str, int]:
    """Parameter memory of a stage: ``stored`` (as the bundle holds it, blocks for the quantized
    tensors), ``float32`` (the same stage with a float32 base) and ``trainable`` (float32; each
    also has a gradient and two AdamW moments). For planners and board budgets (docs/quant.md)."""
    fmts = stage_formats(spec, dims)
    frozen = set(spec.frozen)
    stored = f32 = trained = 0
    for n, s in _params_of(spec, dims):
        full = 4 * int(np.prod(s))
        f32 += full
        stored += int(np.prod(stored_shape(s, fmts[n]))) if n in fmts else full
        trained += 0 if n in frozen else full
    return {"stored": stored, "float32": f32, "trainable": trained}
