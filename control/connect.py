"""One way to get a cluster: `open_cluster(ClusterConfig(...))` opens local board processes, the
running daemons of a board registry, emulated boards, or no boards at all (every stage in this
process), and every job trains on what it returns through the same calls (`deploy`, `train_step`,
`params`, `optimizer_state`, `load_state`, `close`).

    open_cluster(ClusterConfig(boards=2))                               # 2 local `edgert serve`
    open_cluster(ClusterConfig(boards=2, registry="keys/boards.json"))  # running daemons
    open_cluster(ClusterConfig(boards=2, profiles={"board1": "qemu-a76"}))   # board1 emulated
    open_cluster(ClusterConfig(in_process=True))                        # control/local.py

[Note: threads per board]
`threads` is the number of TVM worker threads of each board process this controller starts, and
of this process when the stages run in it. 0 (the default) divides this machine's cores among the
processes that train: cores // boards for local boards (at least 1 each), all cores in process.
Boards of a registry keep their own setting (their profile's `threads`, docs/boards.md): the
controller does not start them, so it cannot change it. Every command's `--threads` means this
(`edgert train`, `edgert lm`, `edgert run`'s `threads`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgert.errors import ConfigError

THREADS_HELP = ("TVM threads of each board process (and of this process with --in-process); "
                "default: this machine's cores divided among the board processes, at least 1 each")


def threads_per_board(threads: int | None, boards: int) -> int:
    """See [Note: threads per board]."""
    return threads or max(1, len(os.sched_getaffinity(0)) // max(1, boards))


@dataclass(frozen=True)
class ClusterConfig:
    """Where the stages of a job run (see the module docstring)."""

    boards: int = 2                  # boards to open; stage i runs on board i
    in_process: bool = False         # no boards: the stages in this process (control/local.py)
    registry: str = ""               # attach to the running daemons of this registry instead
    board_names: tuple[str, ...] = ()   # which registry boards, in pipeline order (default: all)
    profiles: Mapping[str, str] = field(default_factory=dict)  # local board -> profile (emulated)
    threads: int = 0                 # see [Note: threads per board]
    budget_mib: float = 0.0          # memory budget of each local board (0 = unlimited)
    timeout_s: float = 120.0         # a board that does not answer a request in time is lost
    workdir: str | Path | None = None   # keys, board logs and uploads (default: a temp dir)

    def __post_init__(self) -> None:
        if type(self.boards) is not int or self.boards < 1:
            raise ConfigError(f"boards must be an integer >= 1, got {self.boards!r}")
        if type(self.threads) is not int or self.threads < 0:
            raise ConfigError(f"threads must be an integer >= 0 (0 = cores // boards), got "
                              f"{self.threads!r}")
        if self.in_process and (self.registry or self.profiles):
            raise ConfigError("in-process stages run on no boards: drop the registry / profiles")
        if self.registry and self.profiles:
            raise ConfigError("profiles start local (emulated) boards; a registry's boards run "
                              "already: pass one of them")
        if self.board_names and not self.registry:
            raise ConfigError("board names pick boards of a registry: add --registry "
                              "KEYS/boards.json")


def open_cluster(cfg: ClusterConfig, *, run_seed: int = 0, announce: bool = False) -> Any:
    """The boards of `cfg`, open and connected (a context manager; `close()` releases them).

    Returns a `control.local.LocalPipeline` (in process), a `control.remote.AttachedCluster`
    (registry) or a `control.cluster.LocalCluster` (local boards, emulated ones included).
    `announce` prints one line on stderr saying what is being started.

    Examples
    --------
    >>> with open_cluster(ClusterConfig(boards=2)) as c:       # doctest: +SKIP
    ...     c.deploy(bundles, micro_batches=2)
    ...     loss = c.train_step(micro, OptimConfig())
    """
    if cfg.in_process:
        from control.local import LocalPipeline

        return LocalPipeline(threads=cfg.threads or None, run_seed=run_seed)
    if cfg.registry:
        from control.remote import AttachedCluster, read_registry

        names = list(read_registry(cfg.registry, list(cfg.board_names) or None))
        if len(names) < cfg.boards:
            raise ConfigError(f"{cfg.boards} stages need {cfg.boards} boards; {cfg.registry} "
                              f"lists {names}")
        if announce:
            print(f"  attaching to {cfg.boards} boards of {cfg.registry}: {names[:cfg.boards]} "
                  f"...", file=sys.stderr)
        return AttachedCluster(cfg.registry, names[:cfg.boards], run_seed=run_seed,
                               timeout=cfg.timeout_s, workdir=_boards_dir(cfg))
    from control.cluster import LocalCluster

    per_board = threads_per_board(cfg.threads, cfg.boards)
    if announce:
        print(f"  starting {cfg.boards} local boards ({per_board} thread(s) each) ...",
              file=sys.stderr)
    return LocalCluster(cfg.boards, budget_mib=cfg.budget_mib or None, threads=per_board,
                        run_seed=run_seed, timeout=cfg.timeout_s, workdir=_boards_dir(cfg),
                        launcher=_launcher(cfg.profiles),
                        start_timeout=300.0 if cfg.profiles else 30.0)


def _boards_dir(cfg: ClusterConfig) -> Path | None:
    return None if cfg.workdir is None else Path(cfg.workdir)


def _launcher(profiles: Mapping[str, str]) -> Any:
    """Boards with a profile start as it says (emulated ones under qemu; control/boards.py)."""
    if not profiles:
        return None
    from control.boards import profile_launcher
    from edgert.profile import load_profile

    return profile_launcher({name: load_profile(p) for name, p in profiles.items()})
