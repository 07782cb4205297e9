"""`edgert` command line.

    edgert train                       # the main job with every default (MiniLM-L6, Rotten Tomatoes, 2 stages)
    edgert train --stages 3 --steps 60 --seq 128
    edgert compile --stages 3 --target arm64 --out build/arm64
    edgert grads --model DIR --stages 2 --batch BATCH.npz --out OUT.npz
    edgert tune --budget 600                   # tune the kernels on this board (resumable)
    edgert keys --out keys --boards board0,board1          # CURVE keys for a cluster
    edgert serve --name board0 --port 5555 --keys keys --budget-mib 2048   # on a board
    edgert plan --board pi0:1024 --board pi1:1024:0.25 --board orin:4096:2:4 --bandwidth-mbps 100

Host commands import the compiler lazily; board commands never do.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from edgert.errors import ConfigError, EdgeError


def _common_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None,
                   help="Hugging Face BERT folder (config.json, model.safetensors, tokenizer.json); "
                        "default: the installed all-MiniLM-L6-v2")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--stages", type=int, default=None, help="K even pipeline stages (by layer)")
    g.add_argument("--split", default=None, help="explicit layer ranges, e.g. 0:2,2:4,4:6")
    p.add_argument("--threads", type=int, default=None, help="TVM worker threads (default: all cores)")


def _tuning_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", type=Path, default=None,
                   help="tuning database (default: this board's, from `edgert tune`, if it exists)")
    p.add_argument("--no-tuning", action="store_true",
                   help="ignore tuning databases: the default schedules")


def _tuning(a: argparse.Namespace) -> dict:
    if a.no_tuning and a.db:
        raise ConfigError("--db and --no-tuning contradict each other: pass one")
    return {"configs": {} if a.no_tuning else None, "tuning_db": a.db}


def cmd_train(a: argparse.Namespace) -> int:
    from control.job import finetune

    rep = finetune(model_dir=a.model, out_dir=a.out, stages=a.stages or (None if a.split else 2),
                   split=a.split, steps=a.steps, batch=a.batch, micro_batches=a.micro_batches,
                   seq=a.seq, lr=a.lr, eval_examples=a.eval_examples, seed=a.seed, threads=a.threads,
                   boards=not a.in_process, **_tuning(a))
    print(rep.summary())
    print(f"  report: {Path(a.out) / 'report.json'}; fine-tuned Hugging Face model: "
          f"{Path(a.out) / 'hf_model'}")
    return 0


def cmd_compile(a: argparse.Namespace) -> int:
    from control.job import compile_bundles, load_model

    model = load_model(a.model, num_labels=a.num_labels)
    paths = compile_bundles(model, a.out, stages=a.stages, split=a.split, batch=a.batch, seq=a.seq,
                            target=a.target, dropout=not a.no_dropout, threads=a.threads,
                            **_tuning(a))
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
                            threads=a.threads, **_tuning(a))
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


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_tune(a: argparse.Namespace) -> int:
    # TVM's pool reads this once, when tvm is imported (see edgert/runtime.py).
    os.environ.setdefault("TVM_NUM_THREADS", str(a.threads or len(os.sched_getaffinity(0))))
    from compiler import tuning
    from compiler.arch import get_arch
    from compiler.model_spec import parse_split, stage_specs
    from control.job import load_model

    model = load_model(a.model, num_labels=a.num_labels)
    arch = get_arch(a.target, a.threads)
    specs = stage_specs(parse_split(a.split, a.stages, model.dims.layers), a.batch, a.seq,
                        not a.no_dropout)
    db = tuning.TuningDB(a.db or tuning.default_db_path())
    print(f"tuning {model.model_id} B={a.batch} T={a.seq} on {arch.name} for {a.budget:.0f}s "
          f"-> {db.path}", file=sys.stderr)
    signal.signal(signal.SIGTERM, _interrupt)   # `kill`/`timeout` stop it like Ctrl-C
    gain = tuning.MIN_GAIN if a.min_gain is None else a.min_gain
    rep = tuning.tune(model, specs, arch, db, a.budget, progress=tuning.print_progress,
                      min_gain=gain)
    print(rep.format())
    return 130 if rep.interrupted else 0


def cmd_keys(a: argparse.Namespace) -> int:
    from edgert.transport import generate_keys

    ring = generate_keys(a.out, [b for b in a.boards.split(",") if b])
    print(f"keys in {ring.root}: copy public/ to every machine, private/<name>.key_secret to "
          f"that machine only")
    return 0


def _board_spec(text: str) -> tuple[str, float | None, float, float | None]:
    """NAME:BUDGET_MIB[:SPEED[:ACCEL_SPEED]]; BUDGET_MIB may be '-' (unlimited)."""
    parts = text.split(":")
    try:
        if not 2 <= len(parts) <= 4 or not parts[0]:
            raise ValueError
        budget = None if parts[1] == "-" else float(parts[1])
        speed = float(parts[2]) if len(parts) > 2 else 1.0
        accel = float(parts[3]) if len(parts) > 3 else None
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: write NAME:BUDGET_MIB[:SPEED[:ACCEL_SPEED]], e.g. pi4:1024:0.25 "
            f"(speeds relative to this host; '-' for no budget)") from None
    return parts[0], budget, speed, accel


def cmd_plan(a: argparse.Namespace) -> int:
    import json

    from compiler.hf import default_model_dir, read_config
    from compiler.model_spec import ModelDims
    from control.partition import HOST_GFLOPS, MIB, Board, Links, bert_costs, host_gflops, plan

    dims = ModelDims.from_config(read_config(a.model or default_model_dir()), a.num_labels)
    ref, bench = HOST_GFLOPS, Path(__file__).resolve().parents[1] / "bench/results/train_step.json"
    if bench.is_file():
        ref = host_gflops(json.loads(bench.read_text()), dims)
    boards = [Board(n, None if b is None else int(b * MIB), gflops=ref * s,
                    accel_gflops=None if x is None else ref * x, accel_sync_ms=a.accel_sync_ms)
              for n, b, s, x in a.board]
    links = Links(None if a.bandwidth_mbps is None else a.bandwidth_mbps * 1e6 / 8,
                  a.latency_ms / 1e3)
    p = plan(bert_costs(dims, a.batch, a.seq), boards, a.micro_batches, links=links,
             search_order=a.search_order)
    print(p.explain())
    print(f"speeds relative to {ref:.0f} GFLOP/s; compile with: --split {p.to_split()}")
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from edgert.board import MIB, Board, BoardConfig
    from edgert.transport import KeyRing, ZmqTransport

    workdir = a.workdir or Path(f"/tmp/edgert-{a.name}-{os.getpid()}")
    cfg = BoardConfig(name=a.name, workdir=workdir, threads=a.threads,
                      budget_bytes=None if a.budget_mib is None else int(a.budget_mib * MIB))
    t = ZmqTransport(a.name, keys=KeyRing(a.keys),
                     max_msg_bytes=int(a.max_msg_mib * MIB))
    try:
        endpoint = t.bind(f"tcp://{a.host}:{a.port}")
        print(f"edgert-board {a.name} listening {endpoint}", flush=True)
        Board(cfg, t).serve()
    finally:
        t.close()
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
    t.add_argument("--in-process", action="store_true",
                   help="run every stage in this process instead of one local board process per stage")
    _tuning_flags(t)
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("compile", help="compile stage bundles for a target")
    _common_model(c)
    c.add_argument("--batch", type=int, default=8)
    c.add_argument("--seq", type=int, default=128)
    c.add_argument("--num-labels", type=int, default=2)
    c.add_argument("--target", default="host", help="host, arm64, mali or adreno")
    c.add_argument("--no-dropout", action="store_true")
    c.add_argument("--out", type=Path, required=True)
    _tuning_flags(c)
    c.set_defaults(func=cmd_compile)

    g = sub.add_parser("grads", help="loss and gradients of one batch (dropout off) for checking")
    _common_model(g)
    g.add_argument("--batch", type=Path, required=True, help=".npz with input_ids, attention_mask, "
                   "[token_type_ids], labels (int64)")
    g.add_argument("--num-labels", type=int, default=2)
    g.add_argument("--seed", type=int, default=0, help="seed of the new classifier head")
    g.add_argument("--work", type=Path, default=None, help="where to put the compiled bundles")
    g.add_argument("--out", type=Path, required=True)
    _tuning_flags(g)
    g.set_defaults(func=cmd_grads)

    u = sub.add_parser("tune", help="tune the kernels on this board into its tuning database")
    _common_model(u)
    u.add_argument("--batch", type=int, default=8)
    u.add_argument("--seq", type=int, default=128)
    u.add_argument("--num-labels", type=int, default=2)
    u.add_argument("--no-dropout", action="store_true")
    u.add_argument("--budget", type=float, default=600.0, help="seconds; re-run to resume")
    u.add_argument("--db", type=Path, default=None,
                   help="tuning database (default: ~/.cache/edgert/tuning/<hostname>.json)")
    u.add_argument("--target", default="host", help="a CPU target this machine runs (host)")
    u.add_argument("--min-gain", type=float, default=None,
                   help="use a tuned config only if this much faster (default 0.05)")
    u.set_defaults(func=cmd_tune)

    k = sub.add_parser("keys", help="create a cluster's CURVE keypairs (controller + boards)")
    k.add_argument("--out", type=Path, required=True)
    k.add_argument("--boards", required=True, help="comma-separated board names")
    k.set_defaults(func=cmd_keys)

    q = sub.add_parser("plan", help="choose stage boundaries for boards (docs/partition.md)")
    q.add_argument("--model", type=Path, default=None,
                   help="Hugging Face BERT folder (default: MiniLM)")
    q.add_argument("--board", type=_board_spec, action="append", required=True,
                   help="NAME:BUDGET_MIB[:SPEED[:ACCEL_SPEED]] in pipeline order, one per board; "
                        "speeds relative to this host")
    q.add_argument("--batch", type=int, default=8, help="micro-batch size")
    q.add_argument("--seq", type=int, default=128)
    q.add_argument("--micro-batches", type=int, default=4, help="micro-batches per optimizer step")
    q.add_argument("--num-labels", type=int, default=2)
    q.add_argument("--bandwidth-mbps", type=float, default=None, help="link speed (default: free)")
    q.add_argument("--latency-ms", type=float, default=0.0)
    q.add_argument("--accel-sync-ms", type=float, default=0.0,
                   help="per-layer cost of splitting heads onto a board's accelerator")
    q.add_argument("--search-order", action="store_true", help="also try every board order")
    q.set_defaults(func=cmd_plan)

    s = sub.add_parser("serve", help="run the board daemon (TVM runtime only)")
    s.add_argument("--name", required=True, help="this board's name (= its key name)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=0, help="0: the OS picks; printed on start")
    s.add_argument("--keys", type=Path, required=True,
                   help="cluster key directory (edgert keys); only its keys may connect")
    s.add_argument("--budget-mib", type=float, default=None, help="memory budget for a stage")
    s.add_argument("--max-msg-mib", type=float, default=257.0, help="largest frame accepted")
    s.add_argument("--workdir", type=Path, default=None, help="where deployed bundles go")
    s.add_argument("--threads", type=int, default=None)
    s.set_defaults(func=cmd_serve)
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
