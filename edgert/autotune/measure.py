"""Timing harness, the head-split tuner, and two pinned CPU backends for this machine (I/O).

* `time_fn`: warm-up + median of N `time.perf_counter()` samples, with the variance recorded.
* `tune_head_split`: cached search of the split point over measurement callables (heads -> ms);
  a cached choice is reused without measuring, `retune=True` measures again.
* `PinnedWorkers`: two backends = two worker processes, each pinned to one core with
  `os.sched_setaffinity` and running TVM's runtime with a 1-thread pool on attention kernels loaded
  from an exported library. The layer's tensors live in one shared-memory file (/dev/shm); a split
  layer is one dispatch to both workers, each of which gathers its heads' columns, runs fwd + bwd
  and scatters its ctx / dqkv columns back, concurrently. See [Note: why processes]. Inside a
  training stage forward and backward run apart (`run_part("fwd"|"bwd", k)`, used by
  edgert/head_split_exec.py): the whole layer's probs travel through the arena with the VM.

[Note: why processes]
TVM's CPU thread pool is per process and `TVM_NUM_THREADS` is read once, so two backends in one
process would share one pool (or serialise on it). Separate processes give each backend its own
runtime, pool and core, like a CPU and a GPU runtime on a board. Kernels are loaded by name from
a library built on the host: `kernel_name("fwd"|"bwd", h0, h1)` for heads [h0, h1), so this
module never imports the compiler.

Worker (started by `PinnedWorkers`, not by hand):
    python -m edgert.autotune.measure worker '<json config>'
It reads one JSON command per line on stdin and answers one JSON line on stdout.
"""

from __future__ import annotations

import functools
import json
import logging
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgert.autotune.cache import CacheKey, SplitCache
from edgert.autotune.space import HeadSplit, search_crossing, split_cost
from edgert.errors import BoardError, ConfigError

log = logging.getLogger(__name__)
_ALIGN = 64   # bytes; TVM kernels assume 64-byte aligned buffers


# ------------------------------------------------------------------------------------- timing
@dataclass(frozen=True, slots=True)
class Timing:
    """median / mean in ms, variance in ms^2, and the samples (ms)."""

    median: float
    mean: float
    var: float
    samples: tuple[float, ...]

    @classmethod
    def of(cls, samples_ms: list[float]) -> Timing:
        s = tuple(float(x) for x in samples_ms)
        var = statistics.variance(s) if len(s) > 1 else 0.0
        return cls(statistics.median(s), statistics.fmean(s), var, s)

    def as_dict(self) -> dict[str, Any]:
        return {"median_ms": self.median, "mean_ms": self.mean, "var_ms2": self.var,
                "n": len(self.samples)}


def time_fn(fn: Callable[[], Any], *, warmup: int = 2, n: int = 7) -> Timing:
    """Run fn `warmup` times untimed, then n timed runs."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return Timing.of(out)


# -------------------------------------------------------------------------------------- tuner
@dataclass(frozen=True, slots=True)
class TuneResult:
    """The chosen split, its modelled cost, whether it came from the cache, what was measured."""

    split: HeadSplit
    cost_ms: float
    from_cache: bool
    n_measured: int                  # backend/copy measurements this call made (0 from cache)
    record: dict[str, Any] = field(default_factory=dict)


class _Memo:
    """Memoised measurement callable that remembers what it measured."""

    def __init__(self, fn: Callable[[int], float]):
        self.fn, self.seen = fn, {}

    def __call__(self, n: int) -> float:
        if n not in self.seen:
            self.seen[n] = float(self.fn(n))
        return self.seen[n]


def tune_head_split(n_heads: int, cost_a: Callable[[int], float], cost_b: Callable[[int], float],
                    copy: Callable[[int], float], *, cache: SplitCache, key: CacheKey,
                    retune: bool = False) -> TuneResult:
    """Split point for the two backends of `key.backends` (heads [0, k) on the first).

    cost_a(n) / cost_b(n): ms for n heads on backend A / B; copy(k): serial copy + dispatch ms of
    split k. Cached under `key`; see edgert/autotune/space.py [Note: head-split cost model].
    """
    if len(key.backends) != 2:
        raise ConfigError(f"the head-split tuner splits over 2 backends, key has {key.backends}")
    rec = cache.get(key, retune=retune)
    if rec is not None:
        split = HeadSplit.from_dict(rec["split"])
        log.info("head split %s from cache %s (%.3f ms)", split, cache.path, rec["cost_ms"])
        return TuneResult(split, float(rec["cost_ms"]), True, 0, rec)
    a, b, c = _Memo(cost_a), _Memo(cost_b), _Memo(copy)
    res = search_crossing(n_heads, a, b, c, backends=key.backends)
    rec = {"split": res.split.as_dict(), "k": res.split.k, "cost_ms": res.cost,
           "evaluated": list(res.evaluated), "tuned_at": time.time(),
           "measured": {name: {str(n): v for n, v in sorted(m.seen.items())}
                        for name, m in (("a", a), ("b", b), ("copy", c))}}
    cache.put(key, rec)
    n = len(a.seen) + len(b.seen) + len(c.seen)
    log.info("head split %s tuned: %.3f ms, %d measurements", res.split, res.cost, n)
    return TuneResult(res.split, res.cost, False, n, rec)


# ------------------------------------------------------------------------- shared-memory arena
@dataclass(frozen=True, slots=True)
class AttnShape:
    """Attention layer shape: B sequences of T tokens, H heads of d, float dtype."""

    B: int
    T: int
    H: int
    d: int
    dtype: str = "float32"

    @property
    def M(self) -> int:
        return self.B * self.T

    def layout(self) -> dict[str, tuple[int, tuple[int, ...], str]]:
        """name -> (byte offset, full shape, dtype) of every buffer in the arena."""
        B, T, H, d, M = self.B, self.T, self.H, self.d, self.M
        specs: list[tuple[str, tuple[int, ...], str]] = [
            ("mask", (B, T), self.dtype), ("seed", (2,), "int64"),
            ("qkv", (M, 3 * H * d), self.dtype), ("dctx", (M, H * d), self.dtype),   # layer in
            ("ctx", (M, H * d), self.dtype), ("dqkv", (M, 3 * H * d), self.dtype),   # layer out
            ("probs", (B, H, T, T), self.dtype)]   # fwd out, bwd in (ops "fwd"/"bwd")
        for w in ("w0", "w1"):
            specs += [(f"{w}.{name}", shp, self.dtype) for name, shp in (
                ("qkv", (M, 3 * H * d)), ("dctx", (M, H * d)), ("ctx", (M, H * d)),
                ("probs", (B, H, T, T)), ("dqkv", (M, 3 * H * d)))]
        out, off = {}, 0
        for name, shape, dt in specs:
            out[name] = (off, shape, dt)
            off += -(-int(np.prod(shape)) * np.dtype(dt).itemsize // _ALIGN) * _ALIGN
        return out

    def part_shapes(self, n: int) -> dict[str, tuple[int, ...]]:
        """Shapes of a worker's buffers when it runs n heads (a prefix of each buffer)."""
        M, d = self.M, self.d
        return {"qkv": (M, 3 * n * d), "dctx": (M, n * d), "ctx": (M, n * d),
                "probs": (self.B, n, self.T, self.T), "dqkv": (M, 3 * n * d)}


class _Arena:
    """Named numpy views into one mmap'ed file shared by the parent and both workers."""

    def __init__(self, path: str, shape: AttnShape, create: bool):
        self.path, self.layout = path, shape.layout()
        size = max(off + int(np.prod(s)) * np.dtype(dt).itemsize
                   for off, s, dt in self.layout.values())
        fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)

    def view(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        off, full, dt = self.layout[name]
        shape = shape or full
        return np.frombuffer(self._mm, dt, int(np.prod(shape)), off).reshape(shape)


def kernel_name(direction: str, h0: int, h1: int) -> str:
    """Name of the fwd/bwd attention kernel for heads [h0, h1) in the library given to workers."""
    return f"attn_{direction}_{h0}_{h1}"


# ------------------------------------------------------------------------------ parent side
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
        self.arena = _Arena(path, shape, create=True)
        self._procs: list[subprocess.Popen[str]] = []
        env = {**os.environ, "TVM_NUM_THREADS": "1"}
        for i, core in enumerate(cores):
            cfg = {"lib": str(lib), "arena": path, "shape": list(_shape_tuple(shape)),
                   "core": core, "prefix": f"w{i}"}
            self._procs.append(subprocess.Popen(
                [sys.executable, "-m", "edgert.autotune.measure", "worker", json.dumps(cfg)],
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
            P[:, h0:h1] = self.arena.view(f"w{i}.probs", s.part_shapes(h1 - h0)["probs"])
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
        and writes dqkv (edgert/head_split_exec.py copies them in and out)."""
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


# ------------------------------------------------------------------------------ worker side
def _worker(cfg: dict[str, Any]) -> None:
    os.sched_setaffinity(0, {int(cfg["core"])})   # before the runtime starts its pool
    from edgert.runtime import load_runtime, to_dev

    rt = load_runtime(threads=1, block_torch=True)
    shape = AttnShape(*cfg["shape"])
    arena, w = _Arena(cfg["arena"], shape, create=False), cfg["prefix"]
    lib = rt.load_module(cfg["lib"])
    seed, mask = to_dev(arena.view("seed")), to_dev(arena.view("mask"))
    fns: dict[tuple[int, int], tuple[Any, Any, list[Any]]] = {}

    def prepared(h0: int, h1: int) -> tuple[Any, Any, list[Any]]:
        if (h0, h1) not in fns:   # zero-copy runtime tensors over the arena views
            t = {n: to_dev(arena.view(f"{w}.{n}", s))
                 for n, s in shape.part_shapes(h1 - h0).items()}
            fns[(h0, h1)] = (lib[kernel_name("fwd", h0, h1)], lib[kernel_name("bwd", h0, h1)],
                             [t["qkv"], t["ctx"], t["probs"], t["dctx"], t["dqkv"]])
        return fns[(h0, h1)]

    @functools.cache
    def io(h0: int, h1: int) -> dict[str, Callable[[], None]]:
        """This worker's copies between the whole layer's buffers and its heads' part: gathers of
        its q|k|v, dctx and probs columns, scatters of its ctx, probs and dqkv columns."""
        n, M, d = h1 - h0, shape.M, shape.d
        sh = shape.part_shapes(n)
        cols = slice(h0 * d, h1 * d)
        full = {name: arena.view(name) for name in ("qkv", "dctx", "ctx", "dqkv", "probs")}
        part = {name: arena.view(f"{w}.{name}", sh[name]) for name in full}
        q3, pq3 = full["qkv"].reshape(M, 3, -1), part["qkv"].reshape(M, 3, n * d)
        g3, pg3 = full["dqkv"].reshape(M, 3, -1), part["dqkv"].reshape(M, 3, n * d)

        def put(dst: np.ndarray, src: np.ndarray) -> Callable[[], None]:
            return lambda: np.copyto(dst, src)

        return {"qkv": put(pq3, q3[:, :, cols]), "dctx": put(part["dctx"], full["dctx"][:, cols]),
                "probs_in": put(part["probs"], full["probs"][:, h0:h1]),
                "ctx": put(full["ctx"][:, cols], part["ctx"]), "dqkv": put(g3[:, :, cols], pg3),
                "probs_out": put(full["probs"][:, h0:h1], part["probs"])}

    def part(op: str, h0: int, h1: int) -> float:
        """fwd: ctx, probs of heads [h0, h1) from the arena's qkv; bwd: dqkv from qkv, probs,
        dctx. Gathers its columns and scatters its results itself; returns ms."""
        t0 = time.perf_counter()
        f, b, (qkv, ctx, probs, dctx, dqkv) = prepared(h0, h1)
        c = io(h0, h1)
        if op == "fwd":
            c["qkv"]()
            f(qkv, mask, seed, ctx, probs)
            c["ctx"]()
            c["probs_out"]()
        else:
            c["qkv"]()
            c["dctx"]()
            c["probs_in"]()
            b(qkv, probs, dctx, seed, dqkv)
            c["dqkv"]()
        return (time.perf_counter() - t0) * 1e3

    print(json.dumps({"ready": True, "core": cfg["core"],
                      "affinity": sorted(os.sched_getaffinity(0))}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["op"] == "exit":
                break
            if cmd["op"] == "ping":
                reply: dict[str, Any] = {"ms": []}
            elif cmd["op"] in ("fwd", "bwd"):   # one direction of a stage's layer: see run_part
                reply = {"ms": [part(cmd["op"], cmd["h0"], cmd["h1"])]}
            else:
                f, b, (qkv, ctx, probs, dctx, dqkv) = prepared(cmd["h0"], cmd["h1"])
                c = io(cmd["h0"], cmd["h1"]) if cmd["io"] else {}
                gather = _seq(c.get("qkv", _nop), c.get("dctx", _nop))
                scatter = _seq(c.get("ctx", _nop), c.get("dqkv", _nop))

                def step() -> None:   # noqa: B023 below: called within this iteration only
                    gather()                             # noqa: B023
                    f(qkv, mask, seed, ctx, probs)       # noqa: B023
                    b(qkv, probs, dctx, seed, dqkv)      # noqa: B023
                    scatter()                            # noqa: B023

                reply = {"ms": list(time_fn(step, warmup=cmd["warmup"], n=cmd["reps"]).samples)}
        except Exception as e:  # noqa: BLE001 - reported to the parent, which raises BoardError
            reply = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(reply), flush=True)


def _nop() -> None:
    pass


def _seq(*fns: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        for f in fns:
            f()

    return run


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "worker":
        sys.exit("usage: python -m edgert.autotune.measure worker '<json config>'")
    _worker(json.loads(sys.argv[2]))
