"""Flags several host commands share: the model and its stage split, and the tuning database."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgert.errors import ConfigError


def model_flags(p: argparse.ArgumentParser,
                threads_help: str = "TVM worker threads (default: all cores)") -> None:
    p.add_argument("--model", type=Path, default=None,
                   help="Hugging Face BERT folder (config.json, model.safetensors, "
                        "tokenizer.json); default: the installed all-MiniLM-L6-v2")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--stages", type=int, default=None, help="K even pipeline stages (by layer)")
    g.add_argument("--split", default=None, help="explicit layer ranges, e.g. 0:2,2:4,4:6")
    p.add_argument("--threads", type=int, default=None, help=threads_help)


def tuning_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", type=Path, default=None,
                   help="tuning database (default: this board's, from `edgert tune`, if it exists)")
    p.add_argument("--no-tuning", action="store_true",
                   help="ignore tuning databases: the default schedules")


def tuning_kwargs(a: argparse.Namespace) -> dict:
    if a.no_tuning and a.db:
        raise ConfigError("--db and --no-tuning contradict each other: pass one")
    return {"configs": {} if a.no_tuning else None, "tuning_db": a.db}

