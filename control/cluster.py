"""Local boards: N board daemons (`edgert serve`) as processes on this machine, 127.0.0.1, CURVE.

`LocalCluster` starts them (optionally under a launcher, e.g. qemu for an emulated arm64 board,
control/boards.py; in a memory cgroup, control/cgroup.py), waits until they listen, and is then a
`control.controller.BoardCluster` like any other: deploy, train_step, params ... Being their
parent, it also sees a board die at once (its process exits), can pin or throttle one, and stops
them all on `close()`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from control.cgroup import MemoryCgroup
from control.controller import BoardCluster, BoardHandle
from edgert.errors import BoardError, ConfigError
from edgert.protocol import Kind
from edgert.transport import generate_keys

log = logging.getLogger(__name__)

try:        # resolved here, in the parent: the forked child must not dlopen (loader locks)
    _PRCTL: Any = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _PRCTL = None


def _board_preexec() -> None:
    """In a board process before exec: ignore Ctrl-C (the controller stops the boards itself,
    after a checkpoint) and die with the controller (no orphan boards after a `kill -9`).

    PR_SET_PDEATHSIG fires when the *thread* that started the board exits: start a cluster in a
    thread that outlives it (the main thread, or the thread of a `control.run.Run`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)           # 1 = PR_SET_PDEATHSIG


class LocalCluster(BoardCluster):
    """N board processes on this machine plus the controller's links to them.

    Examples
    --------
    >>> with LocalCluster(2) as c:                                   # doctest: +SKIP
    ...     c.deploy(["build/stage0", "build/stage1"], micro_batches=2)
    ...     loss = c.train_step([batch0, batch1], OptimConfig(lr=1e-4))
    ...     weights = c.params()
    """

    def __init__(self, n_boards: int, *, budget_mib: float | None = None, threads: int = 1,
                 run_seed: int = 0, timeout: float = 120.0, start_timeout: float = 30.0,
                 workdir: Path | str | None = None, max_msg_mib: float | None = None,
                 mem_cap_mib: float | None = None, telemetry_s: float | None = None,
                 launcher: Callable[[str, list[str]], list[str]] | None = None) -> None:
        if type(n_boards) is not int or n_boards < 1:
            raise ConfigError(f"n_boards must be an integer >= 1, got {n_boards!r}")
        self._setup(run_seed, timeout, workdir)
        self.cgroups: dict[str, Any] = {}   # name -> MemoryCgroup, "name/cpu" -> CpuCap
        names = [f"board{i}" for i in range(n_boards)]
        self.keys = generate_keys(self.root / "keys", names)
        # Memory caps (control/cgroup.py) and push telemetry (control/telemetry.py).
        self.mem_cap_mib, self.telemetry_s = mem_cap_mib, telemetry_s
        # launcher(name, argv) -> argv: how a board starts, e.g. under qemu (control/boards.py)
        self.launcher = launcher
        try:
            self.boards = [self._spawn(n, budget_mib, threads, max_msg_mib) for n in names]
            self._wait_listening(start_timeout)
            self._connect(start_timeout)
        except BaseException:
            self.close()
            raise

    # ---- processes ------------------------------------------------------------------------------
    def _spawn(self, name: str, budget_mib: float | None, threads: int,
               max_msg_mib: float | None) -> BoardHandle:
        log_path = self.root / f"{name}.log"
        cmd = [sys.executable, "-m", "edgert", "serve", "--name", name, "--port", "0",
               "--keys", str(self.root / "keys"), "--workdir", str(self.root / name),
               "--threads", str(threads)]
        if budget_mib is not None:
            cmd += ["--budget-mib", str(budget_mib)]
        if max_msg_mib is not None:
            cmd += ["--max-msg-mib", str(max_msg_mib)]
        if self.telemetry_s is not None:
            cmd += ["--telemetry-s", str(self.telemetry_s)]
        if self.launcher is not None:
            cmd = self.launcher(name, cmd)
        if self.mem_cap_mib is not None:
            cg = MemoryCgroup.create(name, int(self.mem_cap_mib * (1 << 20)))
            self.cgroups[name] = cg
            cmd = cg.wrap(cmd)        # the board joins its cgroup before Python starts
        with open(log_path, "wb") as errf:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errf,
                                    stdin=subprocess.DEVNULL, preexec_fn=_board_preexec)
        return BoardHandle(name, proc, "", log_path)

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for b in self.boards:
            assert b.proc.stdout is not None
            while not b.endpoint:
                left = deadline - time.monotonic()
                ready, _, _ = select.select([b.proc.stdout], [], [], max(0.0, left))
                line = b.proc.stdout.readline().decode(errors="replace") if ready else ""
                if line.startswith("edgert-board "):
                    b.endpoint = line.split()[-1]
                elif not line and (b.proc.poll() is not None or left <= 0):
                    raise BoardError(f"{b.name} did not start within {timeout:.0f} s "
                                     f"(exit code {b.proc.poll()}){self._death_note(b)}; its "
                                     f"log:\n{b.log_tail()}")

    def _check_alive(self) -> None:
        for b in self.boards:
            rc = b.proc.poll()
            if rc is not None:
                raise BoardError(f"{b.name} (pid {b.proc.pid}) exited with code {rc}"
                                 f"{self._death_note(b)}; its log:\n{b.log_tail()}")

    def _death_note(self, b: BoardHandle) -> str:
        """'; <board> hit its memory cap ...' when a capped board was OOM-killed, else ''."""
        cg = self.cgroups.get(b.name)
        note = cg.oom_report() if cg is not None else None
        if note is None:
            return ""
        if b.manifest is not None and self.stages:     # what it was asked to hold
            from edgert.contract import estimate_footprint

            k, i = len(self.stages), self.stages.index(b) if b in self.stages else 0
            fp = estimate_footprint(b.manifest, min(k - i, self.n_mb or 1))["total"]
            need = fp / 2**20 + 45                     # + the idle runtime process, MiB
            note += (f". Its stage's estimate: {fp / 2**20:.0f} MiB of tensors + ~45 MiB of "
                     f"runtime = {need:.0f} MiB, {need - cg.limit_bytes / 2**20:+.0f} MiB against "
                     f"the cap (the estimate runs 1.3-1.9x low: docs/pipeline.md)")
        last = self.telemetry.latest(b.name) if self.telemetry is not None else None
        if last is not None:
            note += (f". Last telemetry: RSS {last['rss'] / 2**20:.0f} MiB, peak "
                     f"{last['peak_rss'] / 2**20:.0f} MiB, after step {last.get('step')}")
        return "; " + note

    def pin(self, name: str, cores: set[int]) -> None:
        """Set the CPU affinity of every thread of board `name` (TVM's pool threads included)."""
        b = next(x for x in self.boards if x.name == name)
        for tid in os.listdir(f"/proc/{b.proc.pid}/task"):
            os.sched_setaffinity(int(tid), cores)

    def throttle(self, name: str, fraction: float, core: int | None = None) -> None:
        """Cap board `name` at `fraction` of one core (cgroup v1 CFS quota, control.cgroup.CpuCap),
        pinned to `core` if given; call again to change the cap. Simulates a board that slows down
        (its owner using it, thermal throttling)."""
        from control.cgroup import CpuCap

        b = next((x for x in self.boards if x.name == name), None)
        if b is None:
            raise ConfigError(f"no board {name!r} to throttle; boards: "
                              f"{[x.name for x in self.boards]}")
        if core is not None:
            self.pin(name, {core})
        key = f"{name}/cpu"            # closed with the memory caps in close()
        cap = self.cgroups.get(key)
        if cap is None:
            cap = CpuCap.create(name, fraction)
            self.cgroups[key] = cap
            cap.add(b.proc.pid)
        else:
            cap.set(fraction)

    # ---- shutdown -------------------------------------------------------------------------------
    def close(self, timeout: float = 5.0) -> None:
        """SHUTDOWN every board, then kill what has not exited after `timeout` s."""
        if self._closed:
            return
        self._closed = True
        if self.t is not None:
            alive = [b for b in self.boards if b.proc.poll() is None]
            try:
                wanted = {(b.name, self.send(b, Kind.SHUTDOWN)) for b in alive}
                self.collect(wanted, timeout)
            except Exception as e:  # noqa: BLE001 - closing must not fail; we kill below
                log.warning("graceful shutdown incomplete: %s", e)
        for b in self.boards:
            try:
                b.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not exit; killing pid %d", b.name, b.proc.pid)
                b.proc.kill()
                b.proc.wait()
            if b.proc.stdout is not None:
                b.proc.stdout.close()
        self._release()

    def _release(self) -> None:
        """Also release the memory and CPU cgroups."""
        for cg in self.cgroups.values():
            try:
                cg.close()
            except ConfigError as e:
                log.warning("%s", e)
        super()._release()

