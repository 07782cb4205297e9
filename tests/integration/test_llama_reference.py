"""Validate tests/reference_llama.py and the GGUF loader against transformers' LlamaForCausalLM.

Skipped without torch/transformers (test extras). SmolLM2-135M-Instruct loaded by
`compiler.gguf.load_gguf`; a real batch of Cornell movie dialog (2 x 24 tokens, right-padded).

* Loss, logits and every gradient of the first 4 real layers (+ embedding, norm, tied head) equal
  ``LlamaForCausalLM`` in float64 (SDPA attention) to 1e-10 relative. transformers computes three
  things in float32 even in a float64 model (RMSNorm upcast, rotary angles, the causal-LM loss's
  ``logits.float()``; its eager attention also softmaxes in float32): for this check the RMSNorm and
  rotary methods of the HF *instance* are replaced by float64 versions of the same formulas, and the
  loss is transformers' ``fixed_cross_entropy`` with its label shift on the float64 logits.
  Everything else (GQA, masks, MLP, head tying) is transformers' code. Unpatched float32
  transformers agrees to 1e-3.
* Greedy generation from the full 30-layer float64 reference equals transformers' greedy tokens
  (float32, the library as shipped) and answers "Paris".
* Our tokenizer.json (rebuilt from the GGUF) equals transformers' GGUF tokenizer.
"""

from __future__ import annotations

import os
import types

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from compiler.gguf import load_gguf  # noqa: E402
from tests.reference_llama import LlamaRef, movie_dialog_batch, truncate  # noqa: E402

REL = 1e-10
N_LAYERS = 4
PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def ck():
    return load_gguf()


@pytest.fixture(scope="module")
def batch(ck):
    b = movie_dialog_batch(ck.tokenizer_file, B=2, T=24)
    assert b["attention_mask"].sum(1).min() < 24, "want a padded row"
    return b


def _f64_rmsnorm(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def _f64_rotary(self, x, position_ids):
    d = self.inv_freq.shape[0] * 2
    theta = self.config.rope_theta if hasattr(self.config, "rope_theta") else \
        self.config.rope_parameters["rope_theta"]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    emb = position_ids[..., None].double() * inv
    emb = torch.cat([emb, emb], dim=-1)
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _exact(m) -> None:
    """Make the float32 RMSNorm and rotary of a float64 HF model instance float64."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

    for mod in m.modules():
        if isinstance(mod, LlamaRMSNorm):
            mod.forward = types.MethodType(_f64_rmsnorm, mod)
        elif isinstance(mod, LlamaRotaryEmbedding):
            mod.forward = types.MethodType(_f64_rotary, mod)


def _hf_causal_loss(logits, labels):
    """transformers' ForCausalLMLoss minus its ``logits.float()`` upcast (a third float32 cast)."""
    from transformers.loss.loss_utils import fixed_cross_entropy

    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    return fixed_cross_entropy(logits.reshape(-1, logits.shape[-1]), shift.reshape(-1))


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def test_config_read_from_gguf(ck):
    c = ck.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size, c.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0
    assert ck.num_params() == 134_515_008


def _hf_from_params(cfg, params, dtype, attn):
    from transformers import LlamaConfig, LlamaForCausalLM

    m = LlamaForCausalLM(LlamaConfig(**cfg.to_hf_json())).to(dtype)
    m.config._attn_implementation = attn
    missing, unexpected = m.load_state_dict({k: torch.tensor(v) for k, v in params.items()},
                                            strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}   # tied head
    m.tie_weights()
    return m.eval()


@pytest.mark.slow
def test_reference_matches_transformers_float64(ck, batch):
    """4 real layers (30 take minutes in float64 on a loaded 2-core VM); same code per layer."""
    cfg, params = truncate(ck.config, ck.params, N_LAYERS)
    ref = LlamaRef(cfg, params)
    loss, grads = ref.grads(batch["input_ids"], batch["labels"], batch["attention_mask"])
    lg_ref = ref.logits(batch["input_ids"], batch["attention_mask"]).detach().numpy()
    del ref
    m = _hf_from_params(cfg, params, torch.float64, "sdpa")
    _exact(m)
    out = m(input_ids=torch.tensor(batch["input_ids"]),
            attention_mask=torch.tensor(batch["attention_mask"]))
    hf_loss = _hf_causal_loss(out.logits, torch.tensor(batch["labels"]))
    hf_loss.backward()
    hf_grads = {k: p.grad.numpy() for k, p in m.named_parameters()}
    assert abs(loss - float(hf_loss.detach())) <= REL * abs(float(hf_loss.detach()))
    valid = batch["attention_mask"].astype(bool)    # padded query rows are not compared
    assert _rel(lg_ref[valid], out.logits.detach().numpy()[valid]) <= REL
    assert set(hf_grads) == set(grads)
    worst = max(_rel(grads[k], hf_grads[k]) for k in grads)
    assert worst <= REL, worst
    # the library as shipped (float32 casts inside) is close but not exact
    m32 = _hf_from_params(cfg, params, torch.float32, "eager")
    with torch.no_grad():
        lg32 = m32(input_ids=torch.tensor(batch["input_ids"])).logits.numpy()
    assert 1e-9 < _rel(lg_ref[valid], lg32[valid]) <= 1e-3


@pytest.mark.slow
def test_greedy_generation_matches_transformers(ck):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ck.tokenizer_file))
    ids = tok.encode(PROMPT).ids
    ours = LlamaRef(ck.config, ck.params).greedy(ids, 8, eos=ck.config.eos_token_id)
    m = _hf_from_params(ck.config, ck.params, torch.float32, "eager")
    with torch.no_grad():
        out = m.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                         eos_token_id=ck.config.eos_token_id, pad_token_id=ck.config.pad_token_id)
    theirs = out[0, len(ids):].tolist()
    assert ours == theirs[: len(ours)] and len(ours) == len(theirs)
    assert "Paris" in tok.decode(ours)


def test_tokenizer_matches_transformers_gguf_tokenizer(ck):
    """Our tokenizer.json (rebuilt from the GGUF) vs transformers' own GGUF tokenizer conversion."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from compiler.gguf import default_gguf_file

    f = default_gguf_file()
    hf = AutoTokenizer.from_pretrained(str(f.parent), gguf_file=f.name)
    ours = Tokenizer.from_file(str(ck.tokenizer_file))
    texts = [PROMPT, "you're asking me out. that's so cute. what's your name again?",
             "  Spaces,\ttabs\nand UNICODE: naïve café — ok?", "<|im_end|>done"]
    for t in texts:
        assert ours.encode(t).ids == hf(t, add_special_tokens=False)["input_ids"], t
        assert ours.decode(ours.encode(t).ids, skip_special_tokens=False) == t
