"""`edgert compile` (stage bundles for a board) and `edgert grads` (the compiled model's loss and
gradients of one batch, for checking it against your own reference).

    edgert compile --stages 3 --target arm64 --out build/arm64
    edgert grads --model DIR --stages 2 --batch BATCH.npz --out OUT.npz
"""

from __future__ import annotations

import argparse
from pathlib import Path

from control.cli.common import model_flags, tuning_flags, tuning_kwargs


def cmd_compile(a: argparse.Namespace) -> int:
    from control.job import compile_bundles, load_model

    model = load_model(a.model, num_labels=a.num_labels)
    paths = compile_bundles(model, a.out, stages=a.stages, split=a.split, batch=a.batch, seq=a.seq,
                            target=a.target, dropout=not a.no_dropout, threads=a.threads,
                            head_split=a.head_split, **tuning_kwargs(a))
    for p in paths:
        print(p)
    return 0


def cmd_grads(a: argparse.Namespace) -> int:
    import numpy as np

    from compiler.model_spec import split_qkv
    from control.data import load_batch
    from control.job import compile_bundles, load_model
    from control.local import LocalPipeline

    batch = load_batch(a.batch).as_dict()
    B, T = batch["input_ids"].shape
    model = load_model(a.model, num_labels=a.num_labels, head_seed=a.seed)
    from compiler.hf import load_bert

    ckpt_names = set(load_bert(model.path).weights)
    out_root = Path(a.work) if a.work else Path(a.out).with_suffix(".bundles")
    paths = compile_bundles(model, out_root, stages=a.stages, split=a.split, batch=B, seq=T,
                            threads=a.threads, **tuning_kwargs(a))
    pipe = LocalPipeline(paths, threads=a.threads)
    loss, grads = pipe.grads(batch)
    merged: dict = {}
    for g in grads:
        merged.update(g)
    out = {"loss": np.array(loss, np.float64)}
    out.update({f"grad/{k}": v for k, v in split_qkv(merged).items()})
    out.update({f"param/{k}": v for k, v in model.hf_weights().items() if k not in ckpt_names})
    np.savez(a.out, **out)
    print(f"loss {loss:.6f}; {len(merged)} gradient tensors -> {a.out}")
    return 0


def compile_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("compile", help="compile stage bundles for a target")
    model_flags(c)
    c.add_argument("--batch", type=int, default=8)
    c.add_argument("--seq", type=int, default=128)
    c.add_argument("--num-labels", type=int, default=2)
    c.add_argument("--target", default="host", help="host, arm64, mali or adreno")
    c.add_argument("--no-dropout", action="store_true")
    c.add_argument("--head-split", action="store_true",
                   help="attention through the board's head-split executor (docs/head_split.md)")
    c.add_argument("--out", type=Path, required=True)
    tuning_flags(c)
    c.set_defaults(func=cmd_compile)


def grads_parser(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("grads", help="loss and gradients of one batch (dropout off) for checking")
    model_flags(g)
    g.add_argument("--batch", type=Path, required=True, help=".npz with input_ids, attention_mask, "
                   "[token_type_ids], labels (int64)")
    g.add_argument("--num-labels", type=int, default=2)
    g.add_argument("--seed", type=int, default=0, help="seed of the new classifier head")
    g.add_argument("--work", type=Path, default=None, help="where to put the compiled bundles")
    g.add_argument("--out", type=Path, required=True)
    tuning_flags(g)
    g.set_defaults(func=cmd_grads)
