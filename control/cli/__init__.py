"""`edgert` command line.

    edgert train                # the main job, every default (MiniLM-L6, Rotten Tomatoes, 2 stages)
    edgert train --stages 3 --steps 60 --seq 128
    edgert train --peft adapter --adapter-size 16 --lr 5e-3   # or --peft lora|bitfit (docs/peft.md)
    edgert compile --stages 3 --target arm64 --out build/arm64
    edgert grads --model DIR --stages 2 --batch BATCH.npz --out OUT.npz
    edgert tune --budget 600                   # tune the kernels on this board (resumable)
    edgert keys --out keys --boards board0,board1          # CURVE keys for a cluster
    edgert serve --name board0 --port 5555 --keys keys --budget-mib 2048   # on a board
    edgert serve --name board0 --keys keys --board rk3588     # budget/threads/port from a profile
    edgert probe                               # which backends this board can really use
    edgert plan --board pi0:1024 --board pi1:1024:0.25 --board orin:4096:2:4 --bandwidth-mbps 100
    edgert run run.toml --out runs/night      # unattended run: checkpoints, recovery, report
    edgert resume runs/night                   # continue it (after Ctrl-C or a crash)
    edgert fwdgrad --clients 3 --rounds 20     # backprop-free federated fine-tuning
    edgert lm --boards 3 --lora 8 --prompt "Hello"   # SmolLM2 LoRA on 3 local boards

Host commands (control/cli/) import the compiler lazily; board commands (edgert/cli.py) never do.
"""

# The console script `edgert` (pyproject.toml) and `python -m control` run `main`. One module per
# area registers its commands (accelerate-style); the board's serve, probe and keys come from
# edgert/cli.py, the only place they are defined (a board runs them as `python -m edgert ...`).

from __future__ import annotations

import sys

from control.cli.compile import compile_parser, grads_parser
from control.cli.fwdgrad import fwdgrad_parser
from control.cli.lm import lm_parser
from control.cli.plan import plan_parser
from control.cli.runs import resume_parser, run_parser
from control.cli.train import train_parser
from control.cli.tune import tune_parser
from edgert import cli as board_cli

# In the order `edgert --help` lists them.
COMMANDS = {
    "train": train_parser, "fwdgrad": fwdgrad_parser, "compile": compile_parser,
    "grads": grads_parser, "tune": tune_parser, "keys": board_cli.keys_parser,
    "plan": plan_parser, "serve": board_cli.serve_parser, "probe": board_cli.probe_parser,
    "run": run_parser, "resume": resume_parser, "lm": lm_parser,
}


def build_parser():
    p, sub = board_cli.new_parser(__doc__)
    for register in COMMANDS.values():
        register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    return board_cli.run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
