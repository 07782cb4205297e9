"""`edgert tune`: time each tunable kernel's schedules on this board and keep the best in its
tuning database (compiler/kernel_tuning/); interruptible and resumable.

    edgert tune --budget 600
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from control.cli.common import model_flags


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_tune(a: argparse.Namespace) -> int:
    # TVM's pool reads this once, when tvm is imported (see edgert/runtime.py).
    os.environ.setdefault("TVM_NUM_THREADS", str(a.threads or len(os.sched_getaffinity(0))))
    from compiler import kernel_tuning as tuning
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


def tune_parser(sub: argparse._SubParsersAction) -> None:
    u = sub.add_parser("tune", help="tune the kernels on this board into its tuning database")
    model_flags(u)
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
