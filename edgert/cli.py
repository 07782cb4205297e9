"""`edgert` command line.

    edgert train                       # the main job with every default (MiniLM-L6, Rotten Tomatoes, 2 stages)
    edgert train --stages 3 --steps 60 --seq 128
    edgert compile --stages 3 --target arm64 --out build/arm64
    edgert grads --model DIR --stages 2 --batch BATCH.npz --out OUT.npz

Host commands import the compiler lazily; board commands never do.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from edgert.errors import EdgeError


def _common_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None,
                   help="Hugging Face BERT folder (config.json, model.safetensors, tokenizer.json); "
                        "default: the installed all-MiniLM-L6-v2")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--stages", type=int, default=None, help="K even pipeline stages (by layer)")
    g.add_argument("--split", default=None, help="explicit layer ranges, e.g. 0:2,2:4,4:6")
    p.add_argument("--threads", type=int, default=None, help="TVM worker threads (default: all cores)")


def cmd_train(a: argparse.Namespace) -> int:
    from control.job import finetune

    rep = finetune(model_dir=a.model, out_dir=a.out, stages=a.stages or (None if a.split else 2),
                   split=a.split, steps=a.steps, batch=a.batch, micro_batches=a.micro_batches,
                   seq=a.seq, lr=a.lr, eval_examples=a.eval_examples, seed=a.seed, threads=a.threads)
    print(rep.summary())
    print(f"  report: {Path(a.out) / 'report.json'}; fine-tuned Hugging Face model: "
          f"{Path(a.out) / 'hf_model'}")
    return 0


def cmd_compile(a: argparse.Namespace) -> int:
    from control.job import compile_bundles, load_model

    model = load_model(a.model, num_labels=a.num_labels)
    paths = compile_bundles(model, a.out, stages=a.stages, split=a.split, batch=a.batch, seq=a.seq,
                            target=a.target, dropout=not a.no_dropout, threads=a.threads)
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
                            threads=a.threads)
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune on Rotten Tomatoes through compiled stages")
    _common_model(t)
    t.add_argument("--steps", type=int, default=60)
    t.add_argument("--batch", type=int, default=8, help="micro-batch size (compiled shape)")
    t.add_argument("--micro-batches", type=int, default=2, help="micro-batches per optimizer step")
    t.add_argument("--seq", type=int, default=64, help="sequence length (compiled shape)")
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--eval-examples", type=int, default=256)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("compile", help="compile stage bundles for a target")
    _common_model(c)
    c.add_argument("--batch", type=int, default=8)
    c.add_argument("--seq", type=int, default=128)
    c.add_argument("--num-labels", type=int, default=2)
    c.add_argument("--target", default="host", help="host, arm64, mali or adreno")
    c.add_argument("--no-dropout", action="store_true")
    c.add_argument("--out", type=Path, required=True)
    c.set_defaults(func=cmd_compile)

    g = sub.add_parser("grads", help="loss and gradients of one batch (dropout off) for checking")
    _common_model(g)
    g.add_argument("--batch", type=Path, required=True, help=".npz with input_ids, attention_mask, "
                   "[token_type_ids], labels (int64)")
    g.add_argument("--num-labels", type=int, default=2)
    g.add_argument("--seed", type=int, default=0, help="seed of the new classifier head")
    g.add_argument("--work", type=Path, default=None, help="where to put the compiled bundles")
    g.add_argument("--out", type=Path, required=True)
    g.set_defaults(func=cmd_grads)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose or os.environ.get("EDGERT_LOG") == "debug" else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except EdgeError as e:
        print(f"edgert: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgert: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
