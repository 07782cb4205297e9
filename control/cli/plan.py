"""`edgert plan`: choose stage boundaries for heterogeneous boards under their memory budgets
and explain the choice (control/partition.py, docs/partition.md).

    edgert plan --board pi0:1024 --board pi1:1024:0.25 --board orin:4096:2:4 --bandwidth-mbps 100
"""

from __future__ import annotations

import argparse
from pathlib import Path


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
    from control.partition import HOST_GFLOPS, MIB, BoardSpec, Links, bert_costs, host_gflops, plan

    dims = ModelDims.from_config(read_config(a.model or default_model_dir()), a.num_labels)
    ref, bench = HOST_GFLOPS, Path(__file__).resolve().parents[2] / "bench/results/train_step.json"
    if bench.is_file():
        ref = host_gflops(json.loads(bench.read_text()), dims)
    boards = [BoardSpec(n, None if b is None else int(b * MIB), gflops=ref * s,
                    accel_gflops=None if x is None else ref * x, accel_sync_ms=a.accel_sync_ms)
              for n, b, s, x in a.board]
    links = Links(None if a.bandwidth_mbps is None else a.bandwidth_mbps * 1e6 / 8,
                  a.latency_ms / 1e3)
    p = plan(bert_costs(dims, a.batch, a.seq), boards, a.micro_batches, links=links,
             objective=a.objective,
             search_order=a.search_order)
    print(p.explain())
    print(f"speeds relative to {ref:.0f} GFLOP/s; compile with: --split {p.to_split()}")
    return 0


def plan_parser(sub: argparse._SubParsersAction) -> None:
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
    q.add_argument("--objective", choices=("time", "memory"), default="time",
                   help="time: the fastest pipeline that fits every budget; memory: the smallest "
                        "largest-board footprint (docs/pipeline.md, memory-first plans)")
    q.set_defaults(func=cmd_plan)
