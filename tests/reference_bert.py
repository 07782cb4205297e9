"""An independent float64 PyTorch reference of BERT for sequence classification.

Written from the BERT paper (Devlin et al. 2019) and Hugging Face's
``BertForSequenceClassification``
semantics, sharing no code with ``compiler/``, so that the compiled stages can be checked against
it. Everything is functional: weights are a dict of arrays keyed by the canonical names
(``embeddings.word_embeddings.weight``, ``encoder.layer.{i}.attention.self.query.weight``, ...,
``pooler.dense.weight``, ``classifier.weight``), linear weights in ``[out, in]`` layout.

Forward: embeddings (word + position + token type) -> LayerNorm -> dropout; then for each layer
(post-LN): self-attention with an additive mask (dtype minimum on padding), softmax, dropout on the
probabilities, output projection, dropout, residual + LayerNorm; FFN with exact erf GELU, dropout,
residual + LayerNorm; pooler = tanh(dense(h[:, 0])); dropout; classifier; mean cross-entropy.

Dropout is off unless explicit masks are passed. A mask is the *multiplier* applied at that site
(already scaled: values 0 or 1/(1-p)), keyed by site name (see `dropout_sites`):

* ``embeddings``                          [B, T, H]
* ``encoder.layer.{i}.attention.probs``   [B, heads, T, T]
* ``encoder.layer.{i}.attention.output``  [B, T, H]
* ``encoder.layer.{i}.output``            [B, T, H]
* ``classifier``                          [B, H]   (on the pooled output)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class RefConfig:
    """The two hyper-parameters the weights do not determine."""

    num_attention_heads: int = 12
    layer_norm_eps: float = 1e-12


def _ref_config(config: Any) -> RefConfig:
    if config is None:
        return RefConfig()
    if isinstance(config, RefConfig):
        return config
    get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
    return RefConfig(int(get("num_attention_heads", 12)), float(get("layer_norm_eps", 1e-12)))


def num_layers(weights: Mapping[str, Any]) -> int:
    """Number of encoder layers present in `weights`."""
    ids = {int(k.split(".")[2]) for k in weights if k.startswith("encoder.layer.")}
    return max(ids) + 1 if ids else 0


def dropout_sites(n_layers: int) -> list[str]:
    """All dropout site names, in forward order."""
    sites = ["embeddings"]
    for i in range(n_layers):
        p = f"encoder.layer.{i}."
        sites += [p + "attention.probs", p + "attention.output", p + "output"]
    return sites + ["classifier"]


def make_dropout_masks(
    weights: Mapping[str, Any],
    batch_size: int,
    seq_len: int,
    p_hidden: float,
    p_attn: float,
    seed: int,
    config: Any = None,
) -> dict[str, np.ndarray]:
    """Random scaled dropout masks (float64) for every site, from ``numpy.default_rng(seed)``."""
    cfg = _ref_config(config)
    h = int(np.asarray(weights["embeddings.LayerNorm.weight"]).shape[0])
    rng = np.random.default_rng(seed)

    def mask(shape: tuple[int, ...], p: float) -> np.ndarray:
        if p == 0.0:
            return np.ones(shape)
        return (rng.random(shape) >= p) / (1.0 - p)

    out = {}
    for site in dropout_sites(num_layers(weights)):
        if site.endswith("attention.probs"):
            out[site] = mask((batch_size, cfg.num_attention_heads, seq_len, seq_len), p_attn)
        elif site == "classifier":
            out[site] = mask((batch_size, h), p_hidden)
        else:
            out[site] = mask((batch_size, seq_len, h), p_hidden)
    return out


def _field(batch: Any, key: str) -> Any:
    if isinstance(batch, Mapping):
        return batch.get(key)
    return getattr(batch, key, None)


def _layer_norm(x: torch.Tensor, g: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    mu = x.mean(dim=-1, keepdim=True)
    var = ((x - mu) ** 2).mean(dim=-1, keepdim=True)  # biased variance, as in the paper / HF
    return (x - mu) / torch.sqrt(var + eps) * g + b


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return x @ w.transpose(0, 1) + b


def _drop(x: torch.Tensor, masks: Mapping[str, torch.Tensor] | None, site: str) -> torch.Tensor:
    if masks is None or site not in masks:
        return x
    return x * masks[site]


def layer_forward(
    p: Mapping[str, torch.Tensor],
    prefix: str,
    h: torch.Tensor,
    mask_add: torch.Tensor | None,
    cfg: RefConfig,
    masks: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One post-LN encoder layer. `h` [B, T, H]; `mask_add` [B, 1, 1, T] additive (or None)."""
    bsz, t, hid = h.shape
    nh = cfg.num_attention_heads
    dh = hid // nh

    def heads(x: torch.Tensor) -> torch.Tensor:  # [B, T, H] -> [B, nh, T, dh]
        return x.reshape(bsz, t, nh, dh).permute(0, 2, 1, 3)

    a = prefix + "attention."
    q = heads(_linear(h, p[a + "self.query.weight"], p[a + "self.query.bias"]))
    k = heads(_linear(h, p[a + "self.key.weight"], p[a + "self.key.bias"]))
    v = heads(_linear(h, p[a + "self.value.weight"], p[a + "self.value.bias"]))
    scores = q @ k.transpose(-1, -2) / math.sqrt(dh)
    if mask_add is not None:
        scores = scores + mask_add
    probs = torch.softmax(scores, dim=-1)
    probs = _drop(probs, masks, a + "probs")
    ctx = (probs @ v).permute(0, 2, 1, 3).reshape(bsz, t, hid)
    attn = _linear(ctx, p[a + "output.dense.weight"], p[a + "output.dense.bias"])
    attn = _drop(attn, masks, a + "output")
    h1 = _layer_norm(
        attn + h,
        p[a + "output.LayerNorm.weight"],
        p[a + "output.LayerNorm.bias"],
        cfg.layer_norm_eps,
    )
    inter = _gelu(
        _linear(h1, p[prefix + "intermediate.dense.weight"], p[prefix + "intermediate.dense.bias"])
    )
    out = _linear(inter, p[prefix + "output.dense.weight"], p[prefix + "output.dense.bias"])
    out = _drop(out, masks, prefix + "output")
    return _layer_norm(
        out + h1,
        p[prefix + "output.LayerNorm.weight"],
        p[prefix + "output.LayerNorm.bias"],
        cfg.layer_norm_eps,
    )


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T] 0/1 mask -> [B, 1, 1, T] with 0 on kept keys and the dtype's minimum on padding."""
    m = attention_mask.to(dtype)[:, None, None, :]
    return (1.0 - m) * torch.finfo(dtype).min


def logits_torch(
    p: Mapping[str, torch.Tensor],
    batch: Any,
    config: Any = None,
    masks: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Classifier logits [B, num_labels] from torch parameters (any float dtype)."""
    cfg = _ref_config(config)
    dtype = p["embeddings.word_embeddings.weight"].dtype
    ids = torch.as_tensor(np.asarray(_field(batch, "input_ids")), dtype=torch.long)
    bsz, t = ids.shape
    am = _field(batch, "attention_mask")
    am = torch.ones(bsz, t, dtype=torch.long) if am is None else torch.as_tensor(np.asarray(am))
    tt = _field(batch, "token_type_ids")
    tt = (
        torch.zeros(bsz, t, dtype=torch.long)
        if tt is None
        else torch.as_tensor(np.asarray(tt), dtype=torch.long)
    )
    pos = torch.arange(t, dtype=torch.long)
    e = "embeddings."
    x = (
        p[e + "word_embeddings.weight"][ids]
        + p[e + "position_embeddings.weight"][pos][None]
        + p[e + "token_type_embeddings.weight"][tt]
    )
    x = _layer_norm(x, p[e + "LayerNorm.weight"], p[e + "LayerNorm.bias"], cfg.layer_norm_eps)
    x = _drop(x, masks, "embeddings")
    mask_add = additive_mask(am, dtype)
    for i in range(num_layers(p)):
        x = layer_forward(p, f"encoder.layer.{i}.", x, mask_add, cfg, masks)
    pooled = torch.tanh(_linear(x[:, 0], p["pooler.dense.weight"], p["pooler.dense.bias"]))
    pooled = _drop(pooled, masks, "classifier")
    return _linear(pooled, p["classifier.weight"], p["classifier.bias"])


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the batch."""
    logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    return -logp.gather(1, labels[:, None]).mean()


def _params(
    weights: Mapping[str, np.ndarray], dtype: torch.dtype, grad: bool
) -> dict[str, torch.Tensor]:
    return {
        k: torch.tensor(np.asarray(v), dtype=dtype, requires_grad=grad)
        for k, v in weights.items()
        if k != "embeddings.position_ids"
    }


def _masks(
    dropout_masks: Mapping[str, np.ndarray] | None, dtype: torch.dtype
) -> dict[str, torch.Tensor] | None:
    if dropout_masks is None:
        return None
    return {k: torch.as_tensor(np.asarray(v), dtype=dtype) for k, v in dropout_masks.items()}


def logits(
    weights: Mapping[str, np.ndarray], batch: Any, dropout_masks=None, config: Any = None
) -> np.ndarray:
    """Float64 logits [B, num_labels] as numpy."""
    with torch.no_grad():
        out = logits_torch(
            _params(weights, torch.float64, False),
            batch,
            config,
            _masks(dropout_masks, torch.float64),
        )
    return out.numpy()


def loss_and_grads(
    weights: Mapping[str, np.ndarray],
    batch: Any,
    dropout_masks: Mapping[str, np.ndarray] | None = None,
    config: Any = None,
) -> tuple[float, dict[str, np.ndarray]]:
    """Mean cross-entropy loss and its gradient w.r.t. every weight, in float64.

    Parameters
    ----------
    weights : Mapping[str, np.ndarray]
        Canonical names including ``pooler.dense.*`` and ``classifier.*``.
    batch : Mapping or object
        ``input_ids``, ``attention_mask``, optional ``token_type_ids``, ``labels`` (int [B]).
    dropout_masks : Mapping[str, np.ndarray], optional
        Scaled multiplier masks by site (module docstring); None = no dropout.
    config : optional
        Anything with ``num_attention_heads`` / ``layer_norm_eps`` (attribute or key); default
        12 heads, eps 1e-12.

    Returns
    -------
    loss : float
    grads : dict[str, np.ndarray]
        float64, same names and shapes as `weights`.
    """
    p = _params(weights, torch.float64, True)
    out = logits_torch(p, batch, config, _masks(dropout_masks, torch.float64))
    labels = torch.as_tensor(np.asarray(_field(batch, "labels")), dtype=torch.long)
    loss = cross_entropy(out, labels)
    names = list(p)
    grads = torch.autograd.grad(loss, [p[n] for n in names], allow_unused=True)
    return float(loss.item()), {
        n: (g.detach().numpy().copy() if g is not None else np.zeros(p[n].shape))
        for n, g in zip(names, grads, strict=False)
    }
