"""Export fine-tuned weights as a Hugging Face ``BertForSequenceClassification`` folder.

The folder loads with ``BertForSequenceClassification.from_pretrained(out_dir)`` (and
``AutoTokenizer.from_pretrained(out_dir)``) with no edgert code: ``config.json`` with the label
maps,
``model.safetensors`` with HF key names (``bert.`` prefix on embeddings/encoder/pooler,
``classifier.*`` unprefixed), and the tokenizer files copied from the source checkpoint.

A marker file, ``edgert_export.json``, identifies folders written here so that a later export may
overwrite them; any other non-empty folder is refused.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from compiler.bert_config import BertConfig, expected_shapes, head_shapes, pooler_shapes
from edgert.artifact import sha256_file
from edgert.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

MARKER = "edgert_export.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def _label_maps(
    num_labels: int, id2label: Mapping[int, str] | Sequence[str] | None
) -> dict[int, str]:
    if id2label is None:
        return {i: f"LABEL_{i}" for i in range(num_labels)}
    if isinstance(id2label, Mapping):
        try:
            m = {int(k): str(v) for k, v in id2label.items()}
        except (TypeError, ValueError) as e:
            raise ConfigError(
                f"export_hf: id2label keys must be integers, got {list(id2label)}"
            ) from e
    else:
        m = {i: str(v) for i, v in enumerate(id2label)}
    if sorted(m) != list(range(num_labels)):
        raise ConfigError(
            f"export_hf: id2label must name labels 0..{num_labels - 1} exactly, got "
            f"keys {sorted(m)}; pass one name per class."
        )
    if len(set(m.values())) != len(m):
        raise ConfigError(f"export_hf: id2label names must be distinct, got {list(m.values())}.")
    return m


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder; choose another --out path.")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ConfigError(
            f"{out}: folder is not empty and is not a previous edgert export (no "
            f"{MARKER}); refusing to overwrite it. Choose an empty or new folder."
        )


def export_hf(
    out_dir: str | Path,
    config: BertConfig,
    weights: Mapping[str, np.ndarray],
    tokenizer_dir: str | Path,
    num_labels: int,
    id2label: Mapping[int, str] | Sequence[str] | None = None,
) -> Path:
    """Write a Hugging Face ``BertForSequenceClassification`` checkpoint folder.

    Parameters
    ----------
    out_dir : str or Path
        Destination; created if missing. Must be empty, new, or a previous export.
    config : BertConfig
        The encoder's config (written in full to config.json).
    weights : Mapping[str, np.ndarray]
        Canonical unprefixed names (as `compiler.hf.load_bert` + `init_head` give): every encoder
        and
        embedding tensor, ``pooler.dense.*`` and ``classifier.*``. Cast to float32.
    tokenizer_dir : str or Path
        Folder to copy tokenizer.json / vocab.txt / tokenizer_config.json / special_tokens_map.json
        from (those present; at least tokenizer.json or vocab.txt).
    num_labels : int
    id2label : Mapping[int, str] or Sequence[str], optional
        Class names; default ``LABEL_0`` ...

    Returns
    -------
    Path
        `out_dir`.

    Raises
    ------
    ConfigError
        If `out_dir` is a non-empty folder that is not a previous export, or the labels are invalid.
    ModelError
        If a tensor is missing or has the wrong shape, or the tokenizer files are missing.
    """
    out = Path(out_dir).expanduser().resolve()
    _check_out_dir(out)
    if not isinstance(num_labels, (int, np.integer)) or num_labels < 1:
        raise ConfigError(f"export_hf: num_labels must be a positive integer, got {num_labels!r}.")
    labels = _label_maps(int(num_labels), id2label)

    far = sorted(n for n in weights if ".learner." in n or ".frozen." in n)
    if far:
        raise ModelError(
            f"export_hf: {far[0]!r} is part of a FAR-reconfigured FFN; restore the dense layout "
            "first: compiler.far.restore(weights, FarPlan.load('<run>/far_plan.json'))."
        )
    want = {
        **expected_shapes(config),
        **pooler_shapes(config),
        **head_shapes(config, int(num_labels)),
    }
    tensors: dict[str, np.ndarray] = {}
    for name, shape in want.items():
        if name not in weights:
            raise ModelError(
                f"export_hf: weights lack {name!r}; pass the full model (checkpoint "
                "weights plus init_head's classifier/pooler)."
            )
        arr = np.asarray(weights[name])
        if tuple(arr.shape) != shape:
            raise ModelError(
                f"export_hf: {name!r} has shape {tuple(arr.shape)}, expected {shape} "
                f"(num_labels={num_labels}, hidden_size={config.hidden_size})."
            )
        key = name if name.startswith("classifier.") else "bert." + name
        tensors[key] = np.ascontiguousarray(arr, dtype=np.float32)
    extra = sorted(set(weights) - set(want) - {"embeddings.position_ids"})
    if extra:
        log.warning("export_hf: not exporting %d unknown tensor(s): %s", len(extra), extra[:8])

    tok_dir = Path(tokenizer_dir)
    tok_files = [tok_dir / f for f in TOKENIZER_FILES if (tok_dir / f).is_file()]
    if not any(f.name in ("tokenizer.json", "vocab.txt") for f in tok_files):
        raise ModelError(
            f"{tok_dir}: no tokenizer.json or vocab.txt to copy; pass the source "
            "checkpoint folder as tokenizer_dir."
        )

    cfg = {
        "architectures": ["BertForSequenceClassification"],
        **config.to_json(),
        "position_embedding_type": "absolute",
        "pad_token_id": 0,
        "num_labels": int(num_labels),
        "id2label": {str(i): n for i, n in labels.items()},
        "label2id": {n: i for i, n in labels.items()},
        "problem_type": "single_label_classification",
        "torch_dtype": "float32",
    }

    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    # Marker first, so that a crashed export can be overwritten by the next one.
    _write_text(
        out / MARKER, json.dumps({"format": "edgert-hf-export/1", "complete": False}) + "\n"
    )
    # A previous export's bottleneck adapters (compiler/adapters.py) do not belong to these weights.
    (out / "adapters.safetensors").unlink(missing_ok=True)
    st_tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(st_tmp), metadata={"format": "pt"})
    os.replace(st_tmp, out / "model.safetensors")
    _write_text(out / "config.json", json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for f in tok_files:
        shutil.copyfile(f, out / (f.name + ".tmp"))
        os.replace(out / (f.name + ".tmp"), out / f.name)
    marker = {
        "format": "edgert-hf-export/1",
        "complete": True,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model_sha256": sha256_file(out / "model.safetensors"),
        "num_labels": int(num_labels),
        "files": ["config.json", "model.safetensors", *[f.name for f in tok_files]],
    }
    _write_text(out / MARKER, json.dumps(marker, indent=2) + "\n")
    log.info("exported %d tensors to %s", len(tensors), out)
    return out


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def export_hf_internal(out_dir: str | Path, config: BertConfig, weights: Mapping[str, np.ndarray],
                       tokenizer_dir: str | Path, num_labels: int, *, lora_scale: float | None = None,
                       id2label: Mapping[int, str] | Sequence[str] | None = None) -> Path:
    """`export_hf` from internal (fused-QKV) weights, folding LoRA factors in first.

    Bottleneck adapters cannot be folded into the base weights (they are nonlinear): they go to
    ``adapters.safetensors`` next to the checkpoint (compiler/adapters.py; `load_adapters` reads
    them back), and ``model.safetensors`` holds the rest (base, trained LayerNorms and head).

    Parameters
    ----------
    weights : internal names (compiler/model_spec.py), e.g. `LocalPipeline.params()`; may hold
        `encoder.layer.<i>.attention.self.qkv.lora_A/B` (then `lora_scale` = alpha / rank is needed)
        or `encoder.layer.<i>.<site>.adapter.*` tensors.

    Examples
    --------
    >>> export_hf_internal("out/hf", cfg, pipe.params(), model_dir, 2, lora_scale=2.0)  # doctest: +SKIP
    """
    from compiler.model_spec import split_qkv
    from compiler.peft import merge_lora

    has_lora = any(".lora_" in k for k in weights)
    if has_lora and lora_scale is None:
        raise ConfigError("the weights hold LoRA factors: pass lora_scale = lora_alpha / lora_rank "
                            "(the bundle manifest's stage record has both) to merge them")
    from compiler.adapters import save_adapters, split_adapters

    base, adapters = split_adapters(dict(weights))
    merged = merge_lora(base, lora_scale) if has_lora else base
    out = export_hf(out_dir, config, split_qkv(merged), tokenizer_dir, num_labels, id2label)
    if adapters:   # export_hf removed any older adapters file
        save_adapters(out, adapters)
    return out
