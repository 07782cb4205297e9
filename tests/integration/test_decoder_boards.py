"""Decoder (SmolLM2) LoRA fine-tuning on real board processes (control.cluster.LocalCluster: two
`edgert serve` processes, CURVE ZeroMQ on 127.0.0.1, 1F1B) against the in-process LocalPipeline.

Real SmolLM2-135M-Instruct weights truncated to their first 2 layers, real movie-dialog text,
2 micro-batches of 2 x 16 tokens per step (the libraries are those of test_llama_train's K=2 LoRA
bundles: compiled once per session). The boards run one TVM thread each, this process two,
so the comparison also covers the thread count (the causal-attention backward used to read out of
bounds, which crashed the boards: [Note: no indices under Select] in
compiler/kernels/causal_attention.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from tokenizers import Tokenizer

from control.decoder import (
    compile_decoder_bundles, corpus_blocks, finetune_lm, lm_batches, load_decoder,
)
from control.local import LocalPipeline, OptimConfig
from edgert.errors import ConfigError

B, T, M, STEPS = 2, 16, 2, 3
OPT = {"lr": 1e-2}


@pytest.mark.slow
def test_boards_reproduce_local_pipeline_and_learn(build_root):
    """finetune_lm(boards=2) against the same job step by step in this process: same losses,
    same held-out perplexity before and after (weights gathered from the boards), same greedy
    tokens; the training text's perplexity and the held-out perplexity go down."""
    from control.decoder import generate, held_out_batches, perplexity

    dec = load_decoder(layers=2)
    r = finetune_lm(steps=STEPS, boards=2, lora=8, layers=2, batch=B, seq=T, micro_batches=M,
                    eval_blocks=2, max_new_tokens=3, out=build_root / "lm_boards", **OPT)
    # the reference: the bundles finetune_lm compiled (cached libraries), run here with two TVM
    # threads (the boards had one each)
    local = LocalPipeline(compile_decoder_bundles(dec, build_root / "lm_local", stages=2, lora=8,
                                                  batch=B, seq=T))
    train = lm_batches(corpus_blocks(dec.tokenizer_file, T, STEPS * M * B), B)
    held = held_out_batches(dec.tokenizer_file, T, B, 2)
    ppl_train0 = perplexity(local, train)
    ppl0 = perplexity(local, held)
    opt = OptimConfig(weight_decay=0.0, **OPT)
    want = [local.train_step(train[i:i + M], opt) for i in range(0, STEPS * M, M)]
    # same kernels, same data: float32 rounding at most (observed: identical)
    np.testing.assert_allclose(r.losses, want, rtol=1e-6)
    assert r.ppl_before == pytest.approx(ppl0, rel=1e-6)
    assert r.ppl_after == pytest.approx(perplexity(local, held), rel=1e-5)
    tok_ids = Tokenizer.from_file(str(dec.tokenizer_file)).encode("I don't know what you").ids
    assert r.generation == Tokenizer.from_file(str(dec.tokenizer_file)).decode(
        generate(local, tok_ids, 3, eos=dec.config.eos_token_id))
    # it learns: the training text's perplexity falls, and so does the held-out one
    assert perplexity(local, train) < 0.5 * ppl_train0
    assert r.ppl_after < r.ppl_before
    assert r.split == [(0, 1), (1, 2)] and [b["stage"] for b in r.boards] == [0, 1]
    assert all(b["peak_rss_mib"] > 50 and b["threads"] == 1 for b in r.boards)
    # LoRA on the boards moved only the factors (the base weights are compared by the frozen
    # set of the manifests: every trainable tensor is a LoRA factor)
    assert {t.name.rsplit(".", 1)[-1] for st in local.stages for t in st.manifest.trainable} \
        == {"lora_A", "lora_B"}


def test_boards_must_match_stages():
    with pytest.raises(ConfigError, match="--boards 3 needs 3 stages"):
        finetune_lm(steps=1, boards=3, stages=2, lora=8, layers=2)
    with pytest.raises(ConfigError, match="--boards"):
        finetune_lm(steps=1, boards=-1, layers=2)
