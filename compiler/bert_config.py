"""The BERT architecture edgert compiles: `BertConfig` (the subset of Hugging Face's config.json it
uses, validated) and the name and shape of every tensor a config implies.

Canonical tensor names are Hugging Face's without the ``bert.`` prefix, in HF ``nn.Linear`` layout
``[out, in]``: ``embeddings.word_embeddings.weight``,
``encoder.layer.0.attention.self.query.weight``, ``pooler.dense.weight``, ``classifier.weight``.
Reading a checkpoint folder: compiler/hf.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from edgert.errors import ModelError

SUPPORTED_MODEL_TYPES = ("bert",)
SUPPORTED_ACTIVATIONS = ("gelu",)  # exact erf GELU, as HF's "gelu"
CONFIG_FILE = "config.json"


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
