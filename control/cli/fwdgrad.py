"""`edgert fwdgrad`: backprop-free federated fine-tuning with forward gradients (docs/fwdgrad.md).

    edgert fwdgrad --clients 3 --rounds 20     # 3 local boards as clients
"""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_fwdgrad(a: argparse.Namespace) -> int:
    """Forward-gradient (FwdLLM-style) federated fine-tuning on local boards (docs/fwdgrad.md)."""
    from control.federated import fwdgrad_finetune
    from control.fwdgrad import FwdGradConfig

    cfg = FwdGradConfig(eps=a.eps, lr=a.lr, momentum=a.momentum, k_init=a.k,
                        k_max=max(a.k, a.k_max), var_threshold=a.var_threshold,
                        pool_factor=a.pool, seed=a.seed)
    rep = fwdgrad_finetune(model_dir=a.model, out_dir=a.out, clients=a.clients, rounds=a.rounds,
                           method=a.method, alpha=a.non_iid, batch=a.batch, seq=a.seq,
                           rows_per_round=a.rows or a.batch, eval_examples=a.eval_examples,
                           seed=a.seed, cfg=cfg, boards=not a.in_process,
                           checkpoint_every=a.checkpoint_every, resume=not a.no_resume,
                           eval_every=a.eval_every)
    b, f = rep["before"], rep["after"]
    print(f"forward-gradient {a.method}: {a.rounds} rounds x {a.clients} clients, "
          f"{rep['trainable']} trainable values")
    print(f"  held-out loss     {b['loss']:.4f} -> {f['loss']:.4f}")
    print(f"  held-out accuracy {100 * b['accuracy']:.1f}% -> {100 * f['accuracy']:.1f}%")
    up = rep["bytes_per_round"]
    print(f"  uplink per round {up['up_mean']:.0f} B (gradient tensors would be "
          f"{up['up_if_gradient_tensors']} B); report: {Path(a.out) / 'report.json'}")
    return 0


def fwdgrad_parser(sub: argparse._SubParsersAction) -> None:
    f = sub.add_parser("fwdgrad", help="backprop-free federated fine-tuning (forward gradients)")
    f.add_argument("--model", type=Path, default=None, help="Hugging Face BERT folder")
    f.add_argument("--clients", type=int, default=3, help="local board processes (clients)")
    f.add_argument("--rounds", type=int, default=20)
    f.add_argument("--method", choices=["bitfit", "head", "lora"], default="bitfit",
                   help="trainable set (lora: LoRA B factors + head of a LoRA bundle)")
    f.add_argument("--non-iid", type=float, default=None, metavar="ALPHA",
                   help="label-skewed shards, Dirichlet alpha (default: IID)")
    f.add_argument("--k", type=int, default=8, help="perturbations per client and round")
    f.add_argument("--k-max", type=int, default=64, help="cap when --var-threshold grows k")
    f.add_argument("--var-threshold", type=float, default=0.0,
                   help="grow k until the estimate's noise share is below this (0 = fixed k)")
    f.add_argument("--pool", type=int, default=1, help="cosine-filtered sampler pool factor")
    f.add_argument("--eps", type=float, default=1e-3)
    f.add_argument("--lr", type=float, default=0.005)
    f.add_argument("--momentum", type=float, default=0.0)
    f.add_argument("--batch", type=int, default=8)
    f.add_argument("--seq", type=int, default=32)
    f.add_argument("--rows", type=int, default=0,
                   help="examples per client and round (default: batch)")
    f.add_argument("--eval-examples", type=int, default=128)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--out", type=Path, default=Path("runs/fwdgrad"),
                   help="run directory: report.json, events.jsonl (the dashboard reads it), "
                        "report.html, checkpoints/; if it holds a checkpoint the run resumes from "
                        "it")
    f.add_argument("--checkpoint-every", type=int, default=5, metavar="N",
                   help="save the server state every N rounds and at the end (0 = never)")
    f.add_argument("--no-resume", action="store_true",
                   help="start afresh, deleting --out's checkpoints and events (default: "
                        "resume; --rounds is the total, resuming needs the same other settings)")
    f.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="held-out evaluation every N rounds (round 0 and the last always)")
    f.add_argument("--in-process", action="store_true", help="clients in this process, no boards")
    f.set_defaults(func=cmd_fwdgrad)
