"""`edgert run` and `edgert resume`: unattended runs in a run directory (control/run_cli.py,
docs/runs.md).

    edgert run run.toml --out runs/night      # checkpoints, recovery, report
    edgert resume runs/night                   # continue it (after Ctrl-C or a crash)
"""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_run(a: argparse.Namespace) -> int:
    from control.run_cli import run_command

    return run_command(a.config, a.out, resume_only=False)


def cmd_resume(a: argparse.Namespace) -> int:
    from control.run_cli import run_command

    return run_command(None, a.dir, resume_only=True)


def run_parser(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("run", help="an unattended run: checkpoints, recovery from lost boards, "
                                   "report (docs/runs.md); continues DIR if it holds this run")
    r.add_argument("config", nargs="?", type=Path, default=None,
                   help="run.toml (flat keys of control.run_config.RunConfig; default: defaults)")
    r.add_argument("--out", type=Path, default=Path("runs/run"), help="the run directory")
    r.set_defaults(func=cmd_run)


def resume_parser(sub: argparse._SubParsersAction) -> None:
    rr = sub.add_parser("resume", help="continue a run directory from its newest checkpoint")
    rr.add_argument("dir", type=Path, help="the run directory (edgert run --out DIR)")
    rr.set_defaults(func=cmd_resume)
