"""`edgert lm`: causal-LM fine-tuning of SmolLM2 through compiled decoder stages, in this process
or on local boards, or as forward-gradient clients (control/decoder.py, docs/decoder.md).

    edgert lm --boards 3 --lora 8 --prompt "Hello"
"""

from __future__ import annotations

import argparse
from pathlib import Path

from control.connect import THREADS_HELP
from edgert.errors import ConfigError


def cmd_lm(a: argparse.Namespace) -> int:
    from control.decoder import finetune_lm

    if a.fwdgrad:
        return _lm_fwdgrad(a)
    r = finetune_lm(steps=a.steps, stages=a.stages, split=a.split, lora=a.lora, layers=a.layers,
                    batch=a.batch, seq=a.seq, lr=1e-4 if a.lr is None else a.lr,
                    micro_batches=a.micro_batches,
                    boards=a.boards, threads=a.threads, prompt=a.prompt,
                    max_new_tokens=a.max_new_tokens, temperature=a.temperature, model=a.model,
                    out=a.out, seed=a.seed)
    where = f"{len(r.boards)} local boards" if r.boards else "this process"
    print(f"causal-LM fine-tuning, {r.steps} steps, stages {r.split} on {where}, "
          f"compile {r.compile_s:.1f}s")
    print(f"  held-out perplexity {r.ppl_before:.2f} -> {r.ppl_after:.2f}")
    if r.losses:
        print(f"  train loss first/last {r.losses[0]:.4f} / {r.losses[-1]:.4f}; median step "
              f"{sorted(r.step_ms)[len(r.step_ms) // 2]:.0f} ms")
    for b in r.boards:
        print(f"  {b['name']}: stage {b['stage']}, peak RSS {b['peak_rss_mib']:.0f} MiB")
    print(f"  greedy:  {r.generation!r}\n  sampled: {r.sample!r}")
    return 0


def _lm_fwdgrad(a: argparse.Namespace) -> int:
    from control.decoder_fwdgrad import fwdgrad_lm

    if a.stages != 1 or a.split:
        raise ConfigError("--fwdgrad clients hold the whole model: drop --stages / --split")
    r = fwdgrad_lm(clients=a.boards or 2, rounds=a.rounds, layers=a.layers, lora=a.lora or 8,
                   batch=a.batch, seq=a.seq, k=a.k, lr=0.01 if a.lr is None else a.lr,
                   seed=a.seed, out_dir=a.out, model=a.model)
    print(f"forward-gradient LoRA, {r['clients']} board clients x {r['rounds']} rounds, "
          f"{r['trainable']} trainable values, compile {r['compile_s']:.1f}s, "
          f"train {r['train_s']:.1f}s")
    print(f"  held-out perplexity {r['ppl_before']:.2f} -> {r['ppl_after']:.2f}")
    print(f"  uplink {r['bytes_up']} bytes in all; peak RSS per board "
          + ", ".join(f"{x:.0f}" for x in r["peak_rss_mib"]) + " MiB")
    return 0


def lm_parser(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("lm", help="causal-LM fine-tuning of SmolLM2 (docs/decoder.md)",
                       description="Fine-tune SmolLM2 (or a LLaMA GGUF/HF folder) on movie dialog "
                       "through compiled decoder stages: held-out perplexity before/after, then a "
                       "greedy and a sampled continuation. --boards N runs stage i on local board "
                       "process i (edgert serve, CURVE ZeroMQ, 1F1B over --micro-batches); "
                       "multi-stage runs need --lora R (the tied embedding/head gradient "
                       "exchange for full fine-tuning is not implemented). Example: "
                       "edgert lm --boards 3 --lora 8 --micro-batches 3 --steps 10")
    m.add_argument("--model", default=None, help="GGUF file or HF LLaMA folder (default SmolLM2)")
    m.add_argument("--layers", type=int, default=None, help="keep only the first N layers")
    m.add_argument("--stages", type=int, default=1)
    m.add_argument("--split", default=None, help="layer ranges, e.g. 0:10,10:20,20:30")
    m.add_argument("--lora", type=int, default=0, help="LoRA rank on the fused QKV (0 = full)")
    m.add_argument("--steps", type=int, default=20)
    m.add_argument("--batch", type=int, default=2)
    m.add_argument("--seq", type=int, default=32)
    m.add_argument("--lr", type=float, default=None,
                   help="AdamW lr (default 1e-4); with --fwdgrad the server SGD lr (default 0.01)")
    m.add_argument("--fwdgrad", action="store_true",
                   help="backprop-free federated LoRA: --boards N clients (default 2) each run "
                        "perturbed forward passes on their own text shard (docs/fwdgrad.md)")
    m.add_argument("--rounds", type=int, default=20, help="--fwdgrad: federated rounds")
    m.add_argument("--k", type=int, default=8, help="--fwdgrad: perturbations per client/round")
    m.add_argument("--micro-batches", type=int, default=1,
                   help="batches per optimizer step (pipelined 1F1B on boards)")
    m.add_argument("--boards", type=int, default=0,
                   help="run the stages on N local board processes (0 = in this process)")
    m.add_argument("--threads", type=int, default=None,
                   help=THREADS_HELP)
    m.add_argument("--prompt", default=None)
    m.add_argument("--max-new-tokens", type=int, default=8)
    m.add_argument("--temperature", type=float, default=0.8, help="for the sampled continuation")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--out", type=Path, default=Path("build/lm"), help="bundle directory")
    m.set_defaults(func=cmd_lm)
