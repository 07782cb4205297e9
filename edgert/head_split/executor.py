"""A training stage's attention layers split across the board's two CPU backends (board side).

A stage compiled with `head_split=True` (compiler/head_split.py) calls two global packed functions
instead of its own attention kernels (names and arguments: edgert/contract.py):

    edgert.attn.fwd(qkv, maskf, seed, meta, ctx_out, probs_out)
    edgert.attn.bwd(qkv, probs, dctx, seed, meta, dqkv_out)

meta = int64 [layer, salt]. This module registers both with tvm_ffi (once per process; they call
the installed `SplitExecutor`) and runs them at the board's split point k: heads [0, k) on worker
cpu0 and [k, H) on cpu1 (`PinnedWorkers`, processes pinned to cores 0 and 1, sharing a /dev/shm
arena), concurrently. k = 0 or H is the unsplit layer: the full-head kernel runs in this process
on the board's own thread pool, on the VM's tensors (zero copy). The forward returns the saved
probabilities to the VM, which keeps them with the micro-batch's other activations (1F1B
interleaves micro-batches) and hands them to the backward.

The board tunes k when it loads such a stage (`SplitExecutor.tune`: the tuner of
edgert/head_split/tuner.py over measured costs, cached by board, bundle, TVM version and shape;
reused on restart, re-measured with LOAD body `head_split_retune: true`); LOAD body
`head_split_k: K` forces a split point instead. The choice is in the LOAD reply, PROFILE, STATS
and telemetry.

[Note: salt folding]
Dropout masks are a counter hash h(index, seed, salt) with the salt compiled into each kernel
(compiler/kernels/common.py: hash_u32). The seed and salt enter it only as
    (seed * A mod 2^32) xor (salt * C + D mod 2^32),
and A is odd, so for a library compiled with salt LIB_SALT the seed
    seed' = A^-1 * ((seed * A) xor (salt * C + D) xor (LIB_SALT * C + D))  mod 2^32
gives exactly the masks of `salt`. So one library of head-subset kernels serves every layer of
every stage of a shape, for every k, and the board can pick k after the compile. The constants
below must match hash_u32; tests/integration/test_head_split_stage.py checks the split stage's
gradients with dropout on against the unsplit stage, bit for bit.
"""

from __future__ import annotations

import atexit
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgert.contract import BWD_FUNC, FWD_FUNC, LIB_SALT, SPLIT_LIB, AttnShape, kernel_name
from edgert.errors import BoardError, ConfigError
from edgert.head_split.cache import CacheKey, SplitCache, tvm_version
from edgert.head_split.timing import time_fn
from edgert.head_split.tuner import TuneResult, tune_head_split
from edgert.head_split.workers import PinnedWorkers

log = logging.getLogger(__name__)

BACKENDS = ("cpu0", "cpu1")            # worker processes pinned to cores 0 and 1
_M32, _A, _C, _D = 0xFFFFFFFF, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F   # see hash_u32
_A_INV = pow(_A, -1, 1 << 32)


def fold_seed(seed: int, salt: int, lib_salt: int = LIB_SALT) -> int:
    """The seed that makes a kernel compiled with `lib_salt` draw the masks of `salt`.
    See [Note: salt folding]."""
    h = ((seed * _A) & _M32) ^ ((salt * _C + _D) & _M32) ^ ((lib_salt * _C + _D) & _M32)
    return (h * _A_INV) & _M32


def has_split(manifest: Any) -> bool:
    """Whether a bundle was compiled with head split (it then carries SPLIT_LIB)."""
    return SPLIT_LIB in manifest.files


def attn_shape(manifest: Any) -> tuple[AttnShape, float]:
    """(attention shape, dropout probability) of a bundle's layers, from its manifest."""
    dims, st = manifest.dims, manifest.stage
    shape = AttnShape(int(st["batch"]), int(st["seq"]), int(dims["heads"]),
                      int(dims["hidden"]) // int(dims["heads"]), manifest.dtype)
    return shape, float(dims["attn_dropout"]) if st.get("dropout", True) else 0.0


@dataclass(frozen=True, slots=True)
class SplitOptions:
    """LOAD body options: head_split_k (force a split point, 0..H), head_split_retune (bool)."""

    k: int | None = None
    retune: bool = False

    @classmethod
    def from_body(cls, manifest: Any, body: Mapping[str, Any]) -> SplitOptions | None:
        """The options for a bundle, validated before anything is loaded; None without split."""
        k, retune = body.get("head_split_k"), body.get("head_split_retune", False)
        if not has_split(manifest):
            if k is not None or retune:
                raise BoardError(f"load: head_split options given, but stage {manifest.index} "
                                 f"was compiled without head split; recompile it with "
                                 f"build_bundle(..., head_split=True)")
            return None
        H = attn_shape(manifest)[0].H
        if k is not None and (type(k) is not int or not 0 <= k <= H):
            raise BoardError(f"load: head_split_k must be an integer split point in [0, {H}] "
                             f"(heads [0, k) on {BACKENDS[0]}, [k, {H}) on {BACKENDS[1]}), "
                             f"got {k!r}")
        if type(retune) is not bool:
            raise BoardError(f"load: head_split_retune must be true or false, got {retune!r}")
        return cls(k, retune)


class SplitExecutor:
    """Runs the packed attention functions of one loaded stage at split point k.

    Examples
    --------
    >>> shape = AttnShape(8, 128, 12, 32)
    >>> ex = SplitExecutor(Path("stage0/attn_split.so"), shape, 0.1)  # doctest: +SKIP
    >>> install(ex)      # before TvmStage.load of the split stage  # doctest: +SKIP
    >>> ex.set_k(6)      # heads [0, 6) on cpu0, [6, 12) on cpu1  # doctest: +SKIP
    """

    def __init__(self, lib: Path, shape: AttnShape, dropout: float, *,
                 cores: tuple[int, int] | None = None, threads: int | None = None) -> None:
        from edgert.runtime import aligned, load_runtime, to_dev

        self.lib, self.shape, self.dropout = Path(lib), shape, dropout
        usable = sorted(os.sched_getaffinity(0))
        self.cores = cores or (tuple(usable[:2]) if len(usable) >= 2 else None)
        rt = load_runtime(threads, block_torch=True)
        try:
            mod = rt.load_module(str(self.lib))
            self._full = (mod[kernel_name("fwd", 0, shape.H)], mod[kernel_name("bwd", 0, shape.H)])
        except Exception as e:  # noqa: BLE001 - TVM raises its own error types
            raise BoardError(f"{self.lib} is not a head-split library for {shape} ({e}); "
                             f"recompile the bundle with head_split=True") from e
        self._mod = mod
        self._seed_np = aligned(np.zeros(2, "int64"))
        self._seed = to_dev(self._seed_np)       # the folded seed of the in-process kernels
        self._pw: PinnedWorkers | None = None
        self.k = shape.H
        self.report: dict[str, Any] = {}
        self.calls = {"fwd": 0, "bwd": 0}

    # ---- split point --------------------------------------------------------------------------
    def set_k(self, k: int) -> None:
        if type(k) is not int or not 0 <= k <= self.shape.H:
            raise ConfigError(f"head split point {k!r} outside [0, {self.shape.H}]")
        self.k = k

    def workers(self) -> PinnedWorkers:
        """The two pinned workers, started on first use (and again after one died)."""
        if self.cores is None:
            raise BoardError(f"head split: this board process may use only the cores "
                             f"{sorted(os.sched_getaffinity(0))}; a split needs two. Use split "
                             f"point 0 or {self.shape.H} (unsplit), or give the board two cores")
        if self._pw is None:
            self._pw = PinnedWorkers(str(self.lib), self.shape, self.cores, BACKENDS)
        return self._pw

    # ---- the packed functions -----------------------------------------------------------------
    def fwd(self, qkv: Any, maskf: Any, seed: Any, meta: Any, ctx: Any, probs: Any) -> None:
        self.calls["fwd"] += 1
        li, salt = (int(x) for x in np.from_dlpack(meta))
        if self.k in (0, self.shape.H):
            self._full[0](qkv, maskf, self._fold(seed, salt), ctx, probs)
            return
        a = self._arena_in(seed, salt, qkv=qkv, mask=maskf)
        self._run("fwd", li)
        np.copyto(np.from_dlpack(ctx), a.view("ctx"))
        np.copyto(np.from_dlpack(probs), a.view("probs"))

    def bwd(self, qkv: Any, probs: Any, dctx: Any, seed: Any, meta: Any, dqkv: Any) -> None:
        self.calls["bwd"] += 1
        li, salt = (int(x) for x in np.from_dlpack(meta))
        if self.k in (0, self.shape.H):
            self._full[1](qkv, probs, dctx, self._fold(seed, salt), dqkv)
            return
        a = self._arena_in(seed, salt, qkv=qkv, probs=probs, dctx=dctx)
        self._run("bwd", li)
        np.copyto(np.from_dlpack(dqkv), a.view("dqkv"))

    def _fold(self, seed: Any, salt: int) -> Any:
        s = np.from_dlpack(seed)
        self._seed_np[0] = fold_seed(int(s[0]), salt)
        self._seed_np[1] = s[1]
        return self._seed

    def _arena_in(self, seed: Any, salt: int, **tensors: Any) -> Any:
        a = self.workers().arena
        for name, t in tensors.items():
            np.copyto(a.view(name), np.from_dlpack(t))
        s = np.from_dlpack(seed)
        a.view("seed")[...] = (fold_seed(int(s[0]), salt), int(s[1]))
        return a

    def _run(self, op: str, li: int) -> None:
        pw = self.workers()
        try:
            pw.run_part(op, self.k)
        except (BoardError, OSError) as e:
            for _ in range(20):   # a killed worker's pipe may close just before it is reaped
                if pw.exited():
                    break
                time.sleep(0.05)
            why = "; ".join(pw.exited()) or str(e)
            self._drop_workers()
            raise BoardError(f"head split: layer {li} attention {op} at split k={self.k} failed: "
                             f"{why}; this step failed, the workers restart on the next "
                             f"step") from e

    def _drop_workers(self) -> None:
        pw, self._pw = self._pw, None
        if pw is not None:
            try:
                pw.close()
            except Exception as e:  # noqa: BLE001 - a dead worker may fail its shutdown
                log.warning("head-split workers did not shut down cleanly: %s", e)

    # ---- tuning -------------------------------------------------------------------------------
    def unsplit_ms(self, *, reps: int = 7, warmup: int = 2) -> float:
        """fwd + bwd of the whole layer in this process on the board's thread pool (k = 0 or H)."""
        from edgert.runtime import to_dev

        pw = self.workers()
        t = {n: to_dev(pw.arena.view(n)) for n in ("qkv", "mask", "ctx", "probs", "dctx", "dqkv")}
        f, b = self._full
        self._seed_np[...] = (1, 1)   # dropout on, as in training

        def run() -> None:
            f(t["qkv"], t["mask"], self._seed, t["ctx"], t["probs"])
            b(t["qkv"], t["probs"], t["dctx"], self._seed, t["dqkv"])

        return time_fn(run, warmup=warmup, n=reps).median

    def copy_ms(self, *, reps: int = 7) -> float:
        """This process's copies of one split layer into and out of the arena (fwd + bwd)."""
        a = self.workers().arena
        src = {n: np.empty_like(a.view(n)) for n in ("qkv", "mask", "ctx", "probs", "dctx", "dqkv")}

        def run() -> None:
            for n in ("qkv", "mask", "qkv", "probs", "dctx"):   # fwd in, bwd in
                np.copyto(a.view(n), src[n])
            for n in ("ctx", "probs", "dqkv"):                  # fwd out, bwd out
                np.copyto(src[n], a.view(n))

        return time_fn(run, warmup=1, n=reps).median

    def tune(self, *, board: str, source_hash: str, cache: SplitCache | None = None,
             retune: bool = False, reps: int = 7) -> TuneResult:
        """Choose k on this board (edgert/head_split/tuner.py): cost of n heads = the worker's part,
        or the in-process unsplit layer for n = H; copy(k) = two dispatches + this process's
        copies."""
        s = self.shape
        key = CacheKey(board, BACKENDS, source_hash, tvm_version(),
                       f"attn_stage B{s.B} T{s.T} H{s.H} d{s.d} {s.dtype} p{self.dropout}")
        cache = cache or SplitCache()
        if cache.get(key, retune=retune) is None:   # measuring needs inputs in the arena
            rng = np.random.default_rng(0)
            pw = self.workers()
            pw.set_inputs(rng.standard_normal((s.M, 3 * s.H * s.d)).astype(s.dtype),
                          np.ones((s.B, s.T), s.dtype), np.array([1, 1], "int64"),
                          rng.standard_normal((s.M, s.H * s.d)).astype(s.dtype))
            pw.arena.view("probs")[...] = 1.0 / s.T
        memo: dict[str, float] = {}

        def unsplit() -> float:
            if "u" not in memo:
                memo["u"] = self.unsplit_ms(reps=reps)
            return memo["u"]

        def cost(i: int):
            return lambda n: unsplit() if n == s.H else self.workers().cost(i, n, reps=reps)

        def copy(k: int) -> float:
            if "c" not in memo:
                memo["c"] = self.copy_ms(reps=reps)
            return 2 * self.workers().copy_ms(k, reps=reps).median + memo["c"]

        res = tune_head_split(s.H, cost(0), cost(1), copy, cache=cache, key=key, retune=retune)
        self.set_k(res.split.k)
        if self.k in (0, s.H):   # unsplit: the workers measured, now they only hold memory
            self._drop_workers()
        return res

    def close(self) -> None:
        self._drop_workers()


# ---- the process's packed functions -------------------------------------------------------------
_active: list[SplitExecutor | None] = [None]   # the loaded stage's executor (one stage per board)
_registered: list[bool] = [False]


def _call(op: str, *args: Any) -> None:
    ex = _active[0]
    if ex is None:
        raise BoardError(f"{FWD_FUNC if op == 'fwd' else BWD_FUNC}: this stage was compiled with "
                         f"head split but no split executor is running; load it with a LOAD "
                         f"request (edgert serve), or recompile it without head split")
    getattr(ex, op)(*args)


def install(ex: SplitExecutor | None) -> None:
    """Register the packed functions (once; before loading a split stage) and make `ex` the one
    they call (None: none; the previous one's workers stop)."""
    if not _registered[0]:
        from edgert.runtime import load_runtime

        rt = load_runtime(block_torch=True)
        # The VM resolves its packed functions when it is created (a stage that names one not
        # registered fails to load): trampolines are registered first, executors swap behind.
        rt.register_global_func(FWD_FUNC, lambda *a: _call("fwd", *a), override=True)
        rt.register_global_func(BWD_FUNC, lambda *a: _call("bwd", *a), override=True)
        atexit.register(install, None)   # stop the workers, remove the arena file
        _registered[0] = True
    old, _active[0] = _active[0], ex
    if old is not None and old is not ex:
        old.close()


def active() -> SplitExecutor | None:
    return _active[0]


def start_for_stage(bundle: Path, manifest: Any, opts: SplitOptions, *, board: str,
                    threads: int | None = None, cache: SplitCache | None = None
                    ) -> dict[str, Any]:
    """Start the split executor of a loaded stage, choose k (forced, cached or tuned), install it;
    returns the report for the controller: {k, H, split, layers {layer: k}, source, cost_ms,
    unsplit_ms, n_measured, tune_s}."""
    shape, p = attn_shape(manifest)
    ex = SplitExecutor(_content_path(Path(bundle) / SPLIT_LIB, manifest.files[SPLIT_LIB]), shape,
                       p, threads=threads)
    t0 = time.perf_counter()
    try:
        if opts.k is None and ex.cores is None:   # one core: nothing to split over
            rec: dict[str, Any] = {"source": "one core", "cost_ms": None, "n_measured": 0}
        elif opts.k is not None:
            ex.set_k(opts.k)
            if 0 < ex.k < shape.H:
                ex.workers()   # started now, not inside the first step
            rec = {"source": "forced", "cost_ms": None, "n_measured": 0}
        else:
            res = ex.tune(board=board, source_hash=manifest.files[SPLIT_LIB], cache=cache,
                          retune=opts.retune)
            meas = res.record.get("measured", {}).get("a", {})
            rec = {"source": "cache" if res.from_cache else "tuned", "cost_ms": res.cost_ms,
                   "n_measured": res.n_measured, "unsplit_ms": meas.get(str(shape.H))}
    except BaseException:
        ex.close()
        raise
    st = manifest.stage
    ex.report = {"k": ex.k, "H": shape.H, "split": {BACKENDS[0]: ex.k, BACKENDS[1]: shape.H - ex.k},
                 "layers": {str(li): ex.k for li in range(int(st["first"]), int(st["last"]))},
                 "tune_s": round(time.perf_counter() - t0, 3), **rec}
    install(ex)
    log.info("board %s: head split k=%d of %d (%s)", board, ex.k, shape.H, rec["source"])
    return ex.report


def _content_path(path: Path, sha: str) -> Path:
    """A content-named hard link (or copy) of path: dlopen caches libraries by path, and a
    re-deployed bundle of the same name may hold another library (see runtime.py
    [Note: dlopen caches by path])."""
    alias = path.with_name(f".{path.stem}-{sha[:16]}{path.suffix}")
    if not alias.exists():
        tmp = alias.with_name(f"{alias.name}.{os.getpid()}.part")
        try:
            os.link(path, tmp)
        except OSError:
            import shutil

            shutil.copyfile(path, tmp)
        tmp.replace(alias)
    return alias


def second_backend_heads(rep: Mapping[str, Any] | None) -> dict[str, int] | None:
    """{layer: heads on the second backend (H - k)} of a report, as the dashboard shows them
    (control/events.py `board` events); None for an unsplit bundle."""
    if not rep or "layers" not in rep:
        return None
    return {str(li): int(rep["H"]) - int(k) for li, k in rep["layers"].items()}


def report() -> dict[str, Any] | None:
    """The installed executor's report (None: no split stage loaded)."""
    ex = _active[0]
    return None if ex is None else {**ex.report, "calls": dict(ex.calls)}
