"""`edgert train`: the main job (MiniLM-L6 on Rotten Tomatoes through compiled stages), with FAR
or a parameter-efficient trainable set as variants (control/job.py, far.py, peft_train.py).

    edgert train                       # the main job, every default (2 stages on 2 local boards)
    edgert train --stages 3 --steps 60 --seq 128
    edgert train --peft adapter --adapter-size 16 --lr 5e-3   # or --peft lora|bitfit (docs/peft.md)
    edgert train --far 0.4                                    # FAR (docs/far.md)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from control.cli.common import model_flags, tuning_flags, tuning_kwargs
from control.connect import THREADS_HELP
from edgert.errors import ConfigError


def cmd_train(a: argparse.Namespace) -> int:
    from control.job import finetune

    if a.far is not None and a.peft:
        raise ConfigError("--far and --peft are two different trainable sets: pass one of them")
    if a.head_split and (a.far is not None or a.peft):
        raise ConfigError("--head-split is available for full fine-tuning only for now: drop "
                          "--head-split, or --far / --peft")
    if (a.registry or a.boards_named or a.target != "host") and (a.far is not None or a.peft):
        raise ConfigError("--registry/--boards-named/--target are available for full "
                          "fine-tuning for now: drop them, or --far / --peft")
    if a.boards_named and not a.registry:
        raise ConfigError("--boards-named picks boards of a registry: add --registry "
                          "KEYS/boards.json")
    if a.far_freeze_embeddings and a.far is None:
        raise ConfigError("--far-freeze-embeddings goes with --far RETENTION, e.g. --far 0.4")
    if a.far is not None:
        return _train_far(a)
    if a.peft or a.adapter_size is not None or a.lora_rank is not None or a.lora_alpha is not None:
        return _train_peft(a)
    rep = finetune(model_dir=a.model, out_dir=a.out, stages=a.stages or (None if a.split else 2),
                   split=a.split, steps=a.steps, batch=a.batch, micro_batches=a.micro_batches,
                   seq=a.seq, lr=a.lr, eval_examples=a.eval_examples, seed=a.seed,
                   threads=a.threads,
                   boards=not a.in_process, head_split=a.head_split, registry=a.registry,
                   board_names=a.boards_named, target=a.target, **tuning_kwargs(a))
    print(rep.summary())
    for b in rep.boards:
        if b.get("head_split"):
            hs = b["head_split"]
            print(f"  {b['name']}: attention heads [0, {hs['k']}) on cpu0, [{hs['k']}, {hs['H']}) "
                  f"on cpu1 ({hs['source']})")
    print(f"  report: {Path(a.out) / 'report.json'}; fine-tuned Hugging Face model: "
          f"{Path(a.out) / 'hf_model'}")
    return 0


def _train_peft(a: argparse.Namespace) -> int:
    from control.peft_train import PeftConfig, finetune_peft

    sizes = {"adapter": ("adapter_size",), "lora": ("lora_rank", "lora_alpha"), "bitfit": ()}
    stray = [k for k in ("adapter_size", "lora_rank", "lora_alpha")
             if getattr(a, k) is not None and k not in sizes.get(a.peft, ())]
    if stray:
        flag, want = "--" + stray[0].replace("_", "-"), stray[0].split("_")[0]
        raise ConfigError(f"{flag} applies to --peft {want} only (got --peft {a.peft}): "
                          f"add --peft {want} or drop {flag}")
    peft = PeftConfig(a.peft, **{k: getattr(a, k) for k in sizes[a.peft]
                                 if getattr(a, k) is not None})
    rep = finetune_peft(peft=peft, model_dir=a.model, out_dir=a.out,
                        stages=a.stages or (None if a.split else 2), split=a.split, steps=a.steps,
                        batch=a.batch, micro_batches=a.micro_batches, seq=a.seq, lr=a.lr,
                        eval_examples=a.eval_examples, seed=a.seed, threads=a.threads,
                        boards=not a.in_process, **tuning_kwargs(a))
    print(rep.summary())
    print(f"  report: {Path(a.out) / 'report.json'}; fine-tuned Hugging Face model: "
          f"{Path(a.out) / 'hf_model'}" + (" (+ adapters.safetensors)" if a.peft == "adapter"
                                           else ""))
    return 0


def _train_far(a: argparse.Namespace) -> int:
    from control.far import FarConfig, finetune_far, summary

    cfg = tuning_kwargs(a)["configs"]
    far = FarConfig(retention=a.far, freeze_embeddings=a.far_freeze_embeddings)
    rep = finetune_far(far=far, model_dir=a.model, out_dir=a.out,
                       stages=a.stages or (None if a.split else 2), split=a.split, steps=a.steps,
                       batch=a.batch, micro_batches=a.micro_batches, seq=a.seq, lr=a.lr,
                       eval_examples=a.eval_examples, seed=a.seed, threads=a.threads, configs=cfg,
                       boards=not a.in_process)
    print(summary(rep))
    print(f"  report: {Path(a.out) / 'report.json'}; plan: {rep['plan']}; fine-tuned Hugging Face "
          f"model: {Path(a.out) / 'hf_model'}")
    return 0


def train_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="fine-tune on Rotten Tomatoes through compiled stages")
    model_flags(t, THREADS_HELP)
    t.add_argument("--steps", type=int, default=60)
    t.add_argument("--batch", type=int, default=8, help="micro-batch size (compiled shape)")
    t.add_argument("--micro-batches", type=int, default=2, help="micro-batches per optimizer step")
    t.add_argument("--seq", type=int, default=64, help="sequence length (compiled shape)")
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--eval-examples", type=int, default=256)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    t.add_argument("--in-process", action="store_true",
                   help="run every stage in this process instead of one local board process per "
                        "stage")
    t.add_argument("--far", type=float, default=None, metavar="RETENTION",
                   help="FAR: after 5%% priming steps train only this share of each FFN's nodes "
                        "(e.g. 0.4; on the boards, or with --in-process; docs/far.md)")
    t.add_argument("--far-freeze-embeddings", action="store_true",
                   help="with --far: also freeze the embeddings after priming (the paper's "
                        "operating point; skips their backward and AdamW)")
    t.add_argument("--peft", choices=("bitfit", "lora", "adapter"), default=None,
                   help="train only a parameter-efficient set (docs/peft.md): biases, LoRA "
                        "factors on the QKV, or bottleneck adapters + LayerNorms (+ the head)")
    t.add_argument("--adapter-size", type=int, default=None, help="--peft adapter: bottleneck "
                   "size r (default 16)")
    t.add_argument("--lora-rank", type=int, default=None, help="--peft lora: rank (default 8)")
    t.add_argument("--lora-alpha", type=float, default=None, help="--peft lora: alpha (default 16)")
    t.add_argument("--head-split", action="store_true",
                   help="split every attention layer's heads over each board's two backends at "
                        "the split the board tunes on load (docs/head_split.md)")
    t.add_argument("--registry", type=Path, default=None, metavar="KEYS/boards.json",
                   help="train on running board daemons of this registry (boards/provision.sh "
                        "--start writes it) instead of local processes (docs/boards.md)")
    t.add_argument("--boards-named", type=lambda x: [n for n in x.split(",") if n], default=None,
                   metavar="rk0,pi0", help="with --registry: which boards, in stage order")
    t.add_argument("--target", default="host",
                   help="compile the stages for this target (host, arm64, mali, adreno)")
    tuning_flags(t)
    t.set_defaults(func=cmd_train)
