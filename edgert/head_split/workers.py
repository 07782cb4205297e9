"""Two pinned CPU backends for this machine: `PinnedWorkers`, the parent side (I/O).

Two backends = two worker processes (edgert/head_split/worker.py), each pinned to one core with
`os.sched_setaffinity` and running TVM's runtime with a 1-thread pool on attention kernels loaded
from an exported library. The layer's tensors live in one shared-memory arena (arena.py); a split
layer is one dispatch to both workers, each of which gathers its heads' columns, runs fwd + bwd
and scatters its ctx / dqkv columns back, concurrently. See [Note: why processes]. Inside a
training stage forward and backward run apart (`run_part("fwd"|"bwd", k)`, used by
edgert/head_split/executor.py): the whole layer's probs travel through the arena with the VM.

[Note: why processes]
TVM's CPU thread pool is per process and `TVM_NUM_THREADS` is read once, so two backends in one
process would share one pool (or serialise on it). Separate processes give each backend its own
runtime, pool and core, like a CPU and a GPU runtime on a board. Kernels are loaded by name from
a library built on the host: `kernel_name("fwd"|"bwd", h0, h1)` (edgert/contract.py) for heads
[h0, h1), so this package never imports the compiler.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any

import numpy as np

from edgert.contract import AttnShape
from edgert.errors import BoardError, ConfigError
from edgert.head_split.arena import Arena, part_shapes
from edgert.head_split.timing import Timing, time_fn

WORKER_MODULE = "edgert.head_split.worker"


class PinnedWorkers:
    """Two CPU backends: worker i runs in its own process pinned to cores[i].

    Examples
    --------
    >>> with PinnedWorkers("attn.so", AttnShape(8, 128, 12, 32)) as pw:   # doctest: +SKIP
    ...     pw.set_inputs(qkv, mask, seed, dctx)
    ...     ctx, probs, dqkv = pw.run_split(5)   # heads [0,5) on core 0, [5,12) on core 1
    """

    def __init__(self, lib: str, shape: AttnShape, cores: tuple[int, int] = (0, 1),
                 names: tuple[str, str] = ("cpu0", "cpu1"), startup_timeout: float = 120.0):
        self.shape, self.cores, self.names = shape, cores, names
        fd, path = tempfile.mkstemp(prefix="edgert-split-", dir="/dev/shm" if os.path.isdir(
            "/dev/shm") else None)
        os.close(fd)
        os.unlink(path)
        self.arena = Arena(path, shape, create=True)
        self._procs: list[subprocess.Popen[str]] = []
        env = {**os.environ, "TVM_NUM_THREADS": "1"}
        for i, core in enumerate(cores):
            cfg = {"lib": str(lib), "arena": path, "shape": list(_shape_tuple(shape)),
                   "core": core, "prefix": f"w{i}"}
            self._procs.append(subprocess.Popen(
                [sys.executable, "-m", WORKER_MODULE, json.dumps(cfg)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=env))
        self.worker_info = [self._recv(i) for i in range(2)]

    # ---- plumbing ----------------------------------------------------------------------------
    def _send(self, i: int, cmd: dict[str, Any]) -> None:
        p = self._procs[i]
        assert p.stdin is not None
        p.stdin.write(json.dumps(cmd) + "\n")
        p.stdin.flush()

    def _recv(self, i: int) -> dict[str, Any]:
        p = self._procs[i]
        assert p.stdout is not None
        line = p.stdout.readline()
        if not line:
            raise BoardError(f"head-split worker {self.names[i]} (core {self.cores[i]}) exited "
                             f"with code {p.wait()}; see its stderr above")
        msg = json.loads(line)
        if "error" in msg:
            raise BoardError(f"head-split worker {self.names[i]}: {msg['error']}")
        return msg

    def close(self) -> None:
        for i, p in enumerate(self._procs):
            if p.poll() is None:
                try:
                    self._send(i, {"op": "exit"})
                    p.wait(timeout=10)
                except (OSError, subprocess.TimeoutExpired):
                    p.kill()
                    p.wait()
        self._procs = []
        if os.path.exists(self.arena.path):
            os.unlink(self.arena.path)

    def __enter__(self) -> PinnedWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- a split layer -----------------------------------------------------------------------
    def set_inputs(self, qkv: np.ndarray, mask: np.ndarray, seed: np.ndarray,
                   dctx: np.ndarray) -> None:
        """The layer's inputs: qkv [M, 3*H*d], mask [B, T], seed [2] int64, dctx [M, H*d]."""
        self.arena.view("qkv")[...] = qkv
        self.arena.view("dctx")[...] = dctx
        self.arena.view("mask")[...] = mask
        self.arena.view("seed")[...] = seed

    def _parts(self, k: int) -> list[tuple[int, int, int]]:
        """(worker, h0, h1) of the non-empty parts of split k."""
        if not 0 <= k <= self.shape.H:
            raise ConfigError(f"split point {k} outside [0, {self.shape.H}]")
        return [(i, h0, h1) for i, (h0, h1) in enumerate(((0, k), (k, self.shape.H))) if h1 > h0]

    def _probs(self, parts: list[tuple[int, int, int]]) -> np.ndarray:
        s = self.shape
        P = np.empty((s.B, s.H, s.T, s.T), s.dtype)
        for i, h0, h1 in parts:
            P[:, h0:h1] = self.arena.view(f"w{i}.probs", part_shapes(s, h1 - h0)["probs"])
        return P

    def _attn(self, parts: list[tuple[int, int, int]], io: bool, reps: int = 1,
              warmup: int = 0) -> list[dict[str, Any]]:
        for i, h0, h1 in parts:   # both start before either is awaited
            self._send(i, {"op": "attn", "h0": h0, "h1": h1, "io": io, "reps": reps,
                           "warmup": warmup})
        return [self._recv(i) for i, _, _ in parts]

    def run_split(self, k: int, *, probs: bool = True) -> list[np.ndarray]:
        """Attention fwd + bwd with heads [0, k) on worker 0 and [k, H) on worker 1, concurrently;
        each worker gathers its heads' columns of qkv/dctx and scatters its ctx/dqkv columns itself.
        Returns [ctx, probs, dqkv] of the whole layer (ctx, dqkv: views of the shared buffers,
        valid until the next run). probs=False skips gathering the saved probabilities: in
        training they stay on the backend that computed them."""
        parts = self._parts(k)
        self._attn(parts, io=True)
        P = self._probs(parts) if probs else np.empty(0, self.shape.dtype)
        return [self.arena.view("ctx"), P, self.arena.view("dqkv")]

    def run_part(self, op: str, k: int) -> None:
        """One direction of a stage's attention layer, split at k, on the arena's tensors:
        op "fwd" reads qkv, mask, seed and writes ctx, probs; "bwd" reads qkv, probs, dctx, seed
        and writes dqkv (edgert/head_split/executor.py copies them in and out)."""
        parts = self._parts(k)
        for i, h0, h1 in parts:   # both start before either is awaited
            self._send(i, {"op": op, "h0": h0, "h1": h1})
        for i, _, _ in parts:
            self._recv(i)

    def exited(self) -> list[str]:
        """'<name> (core c) exited with code x' for each worker that is no longer running."""
        return [f"worker {self.names[i]} (core {self.cores[i]}) exited with code {p.returncode}"
                for i, p in enumerate(self._procs) if p.poll() is not None]

    # ---- measurements (ms) -------------------------------------------------------------------
    def backend_ms(self, i: int, n: int, *, io: bool = True, reps: int = 7,
                   warmup: int = 2) -> Timing:
        """n heads alone on worker i, timed inside the worker: heads [0, n) on worker 0 and
        [H-n, H) on worker 1, the parts they run in a split. io: include the worker's gather and
        scatter of its columns (what a split part costs); io=False is the kernels alone (an
        unsplit layer whose tensors already live on that backend)."""
        h0, h1 = (0, n) if i == 0 else (self.shape.H - n, self.shape.H)
        return Timing.of(self._attn([(i, h0, h1)], io, reps, warmup)[0]["ms"])

    def cost(self, i: int, n: int, *, reps: int = 7, warmup: int = 2) -> float:
        """The tuner's cost curve (median ms): n < H heads as a split part (with its gather and
        scatter), n = H as the unsplit layer on that backend (kernels only, tensors in place)."""
        return self.backend_ms(i, n, io=n < self.shape.H, reps=reps, warmup=warmup).median

    def copy_ms(self, k: int, *, reps: int = 7, warmup: int = 2) -> Timing:
        """The serial part of split k: one dispatch round trip to both workers (gathers and
        scatters run on the workers, inside the concurrent part: see backend_ms(io=True))."""
        parts = self._parts(k)

        def serial() -> None:
            for i, _, _ in parts:
                self._send(i, {"op": "ping"})
            for i, _, _ in parts:
                self._recv(i)

        return time_fn(serial, warmup=warmup, n=reps)

    def split_ms(self, k: int, *, reps: int = 7, warmup: int = 2) -> Timing:
        """End-to-end split layer (dispatch, concurrent gather + fwd + bwd + scatter), timed by
        the parent."""
        return time_fn(lambda: self.run_split(k, probs=False), warmup=warmup, n=reps)


def _shape_tuple(s: AttnShape) -> tuple[int, int, int, int, str]:
    return (s.B, s.T, s.H, s.d, s.dtype)
