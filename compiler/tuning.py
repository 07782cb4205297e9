"""On-board kernel tuning: time each tunable kernel's `config_space` on this board, keep the fastest
correct config in a per-board JSON database, and hand it to the compiler.

    edgert tune --budget 600            # MiniLM's kernels at B=8, T=128, on this machine
    edgert train                        # compiles with ~/.cache/edgert/tuning/<hostname>.json
    edgert train --no-tuning            # the kernels' own default schedules

Tunable kernels are the builders whose module exposes `config_space` (and `default_config`):
GEMM and attention (docs/kernels.md). Every other kernel keeps its one schedule.

[Note: tuning database]
One JSON file per board (`default_db_path`). A record is keyed by (DB schema, TVM version, target,
dtype, kernel source hash, workload): the target is `Arch`'s target dict + host + threads as
canonical JSON, the source hash covers the builder's module and compiler/kernels/common.py (an edit
makes old timings meaningless), and the workload is the Emitter's key with the perf-neutral kwargs
dropped (`salt`: every layer's attention is the same tuning problem). `keys` lists the Emitter
keys the record's config applies to. Each measured candidate is appended (config, status, min ms)
and the file is rewritten atomically (tmp + os.replace) after every candidate, so an interrupted
run resumes without re-measuring. `pending` names the candidate being measured: if the process
dies inside a kernel, the next run records that candidate as "crashed" and skips it. `choice` is
what the compiler uses (None = keep the default): of the best few verified candidates, re-timed in
interleaved rounds with the default, the one whose median per-round time ratio to the default is
lowest, if below 1 - `min_gain` (on a shared machine a min-of-N taken in a quiet moment is not
enough: see `decide`).
One tuner per DB file at a time (last writer wins).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from compiler.arch import Arch
from edgert.errors import ConfigError

log = logging.getLogger(__name__)

SCHEMA = 1                    # bump when a record's meaning changes: old records are then ignored
PERF_NEUTRAL = ("salt",)      # builder kwargs that do not change a kernel's speed
MIN_GAIN = 0.05               # a tuned config must beat the default by 5% (confirmed) to be used:
                              # on a shared 2-core VM, re-checks of 2-4% wins were noise
CONFIRM_TOP = 3               # finalists re-timed against the default, interleaved
CONFIRM_ROUNDS = 5            # each round: default, then each finalist, each a min-of-N


# ------------------------------------------------------------------------------------ workloads
def _canon(cfg: dict) -> str:
    return json.dumps(cfg, sort_keys=True, separators=(",", ":"))


def _flops(name: str, args: tuple, kw: dict) -> float:
    """Multiply-adds x 2 of the tunable kernels (0 if unknown)."""
    if name == "build_gemm":
        M, N, K = args[:3]
        return 2.0 * M * N * K * math.prod(kw.get("batch", ()))
    if name.startswith("build_attention"):
        B, T, H, d = args[:4]
        hs = (kw["heads"][1] - kw["heads"][0]) if kw.get("heads") else H
        mm = 2 if name.endswith("_fwd") else 4        # QK^T, PV | dP, dQ, dK, dV
        return 2.0 * mm * B * hs * T * T * d
    return 0.0


def _label(name: str, args: tuple, kw: dict) -> str:
    if name == "build_gemm":
        flags = [f for f, on in (("A^T", kw.get("trans_a")), ("B^T", kw.get("trans_b")),
                                  ("+bias", kw.get("bias"))) if on]
        flags += [kw["epilogue"]] if kw.get("epilogue") else []
        return " ".join(["gemm " + "x".join(map(str, args[:3])), *flags])
    if name.startswith("build_attention"):
        B, T, H, d = args[:4]
        drop = " drop" if kw.get("dropout") else ""
        return f"attention {name.rsplit('_', 1)[-1]} B{B} T{T} H{H} d{d}{drop}"
    return name.removeprefix("build_") + " " + "x".join(map(str, args))


@dataclass
class Workload:
    """One tunable kernel: a builder and its arguments; `keys`: the Emitter keys it stands for."""

    key: str
    builder: Callable
    args: tuple
    kwargs: dict
    dtype: str = "float32"
    n_out: int = 1
    calls: int = 1              # call sites in the stages (fwd + bwd of one micro-batch)
    keys: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.builder.__name__

    @property
    def module(self):
        return sys.modules[self.builder.__module__]

    @property
    def flops(self) -> float:
        return _flops(self.name, self.args, self.kwargs)

    @property
    def label(self) -> str:
        return _label(self.name, self.args, self.kwargs)

    @property
    def weight(self) -> float:
        """Estimated time per micro-batch before measuring (calls x FLOPs; the tuner then uses
        calls x measured default time)."""
        return self.calls * max(self.flops, 1.0)

    def build(self, arch: Arch, config: dict | None = None):
        extra = {"config": config} if config is not None else {}
        return self.builder(*self.args, dtype=self.dtype, arch=arch, **self.kwargs, **extra)

    def _kw_for(self, fn) -> dict:
        params = inspect.signature(fn).parameters
        kw = {k: v for k, v in self.kwargs.items() if k in params}
        if "direction" in params:   # attention: fwd and bwd kernels share one config function
            kw.setdefault("direction", "bwd" if self.name.endswith("_bwd") else "fwd")
        return kw

    def default_config(self, arch: Arch) -> dict:
        fn = getattr(self.module, "default_config", None)
        return dict(fn(*self.args, arch=arch, dtype=self.dtype, **self._kw_for(fn))) if fn else {}

    def candidates(self, arch: Arch) -> list[dict]:
        """The default config first, then `config_space` in its order (without the default)."""
        fn = self.module.config_space
        space = [dict(c) for c in fn(*self.args, arch=arch, dtype=self.dtype, **self._kw_for(fn))]
        d = self.default_config(arch)
        return [d] + [c for c in space if _canon(c) != _canon(d)]


@functools.cache
def source_hash(module: str) -> str:
    """sha256 of a kernel module's source and the shared kernel helpers: an edit invalidates the
    module's tuning records (their timings describe the old code)."""
    h = hashlib.sha256()
    for name in (module, "compiler.kernels.common"):
        mod = importlib.import_module(name)
        h.update(Path(mod.__file__).read_bytes() if getattr(mod, "__file__", None) else b"")
    return h.hexdigest()[:16]


def tunable(builder: Callable) -> bool:
    return hasattr(sys.modules.get(builder.__module__), "config_space")


def workload_key(builder: Callable, args: tuple, kw: dict) -> str:
    """The Emitter's key format, without the perf-neutral kwargs."""
    kept = sorted((k, v) for k, v in kw.items() if k not in PERF_NEUTRAL)
    return builder.__module__.rsplit(".", 1)[-1] + "." + builder.__name__ + repr((args, kept))


def workloads(model, specs, arch: Arch, dtype: str = "float32") -> list[Workload]:
    """The distinct tunable kernels of the given stages, heaviest (calls x FLOPs) first.

    `model` is a `control.job.Model` or a `ModelDims`.
    """
    from compiler.stage import Emitter, StageGraph

    @dataclass
    class _Recorder(Emitter):   # the Emitter's own bookkeeping, plus call counts and arguments
        seen: dict = field(default_factory=dict)

        def kernel(self, builder, *args, **kw):
            key = super().kernel(builder, *args, **kw)
            rec = self.seen.setdefault(key, [builder, args, kw, 0, 1])
            rec[3] += 1
            return key

        def call(self, key, args, n_out=1):
            self.seen[key][4] = n_out
            return super().call(key, args, n_out)

    dims = getattr(model, "dims", model)
    out: dict[str, Workload] = {}
    for spec in specs:
        g = StageGraph(dims, spec, arch, dtype)
        g.E = _Recorder(g.bb, arch, dtype)
        g.build(optimizer=False)           # AdamW / accumulate kernels are not tunable
        for key, (builder, args, kw, calls, n_out) in g.E.seen.items():
            if not tunable(builder):
                continue
            wk = workload_key(builder, args, kw)
            w = out.get(wk)
            if w is None:
                w = out[wk] = Workload(wk, builder, args, {k: v for k, v in kw.items()
                                                           if k not in PERF_NEUTRAL},
                                       dtype, n_out, 0, [])
            w.calls += calls
            w.keys.append(key)
    return sorted(out.values(), key=lambda w: -w.weight)


# ------------------------------------------------------------------------------------- database
def default_db_path() -> Path:
    from compiler.build import cache_dir

    return cache_dir() / "tuning" / f"{socket.gethostname()}.json"


def target_id(arch: Arch) -> str:
    """The target as canonical JSON: what a tuned config is valid for."""
    return _canon({"target": arch.target, "host": arch.host, "threads": arch.threads,
                   "vector_bits": arch.vector_bits})


class TuningDB:
    """The per-board JSON database (see [Note: tuning database])."""

    FORMAT = "edgert-tuning-db"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.records: list[dict] = []
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ConfigError(f"tuning database {self.path} is unreadable ({e}); delete it or "
                                  "pass another --db") from None
            if data.get("format") != self.FORMAT:
                raise ConfigError(f"{self.path} is not an edgert tuning database")
            self.records = list(data.get("records", []))

    @staticmethod
    def _id(rec: dict) -> tuple:
        return (rec.get("schema"), rec.get("tvm"), rec.get("target"), rec.get("dtype"),
                rec.get("source"), rec.get("workload"))

    def matching(self, arch: Arch, dtype: str = "float32") -> list[dict]:
        """Records valid for this target, dtype, TVM version, DB schema and kernel source."""
        import tvm

        want = (SCHEMA, tvm.__version__, target_id(arch), dtype)
        return [r for r in self.records if self._id(r)[:4] == want
                and r.get("source") == source_hash(r["module"])]

    def record(self, arch: Arch, wl: Workload) -> dict:
        """The record of `wl` on `arch` (created empty if new; its `keys` gain wl's keys)."""
        import tvm

        src = source_hash(wl.builder.__module__)
        want = (SCHEMA, tvm.__version__, target_id(arch), wl.dtype, src, wl.key)
        rec = next((r for r in self.records if self._id(r) == want), None)
        if rec is None:
            rec = {"schema": SCHEMA, "tvm": tvm.__version__, "target": target_id(arch),
                   "dtype": wl.dtype, "source": src, "module": wl.builder.__module__,
                   "workload": wl.key, "label": wl.label, "flops": wl.flops,
                   "keys": [], "candidates": [], "pending": None, "confirm": None, "choice": None,
                   "complete": False}
            self.records.append(rec)
        rec["keys"] = sorted(set(rec["keys"]) | set(wl.keys))
        return rec

    def pin(self, arch: Arch, wl: Workload, config: dict) -> None:
        """Make the compiler use `config` for `wl` on `arch` whatever the timings (kept by tune)."""
        self.record(arch, wl)["choice"] = {"config": dict(config), "ms": None, "default_ms": None,
                                           "pinned": True}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"format": self.FORMAT, "schema": SCHEMA,
                                   "host": socket.gethostname(), "records": self.records},
                                  indent=1), encoding="utf-8")
        os.replace(tmp, self.path)


def configs_for(db: TuningDB, arch: Arch, dtype: str = "float32") -> dict[str, dict]:
    """Emitter key -> tuned config, for every record of this target whose tuned config is used."""
    out: dict[str, dict] = {}
    for rec in db.matching(arch, dtype):
        if rec.get("choice"):
            out.update({k: rec["choice"]["config"] for k in rec["keys"]})
    return out


def board_configs(arch: Arch, db_path: str | Path | None = None) -> dict[str, dict]:
    """Tuned configs from `db_path` (must exist) or from this board's default DB (if it exists)."""
    path = Path(db_path) if db_path else default_db_path()
    if not path.is_file():
        if db_path:
            raise ConfigError(f"no tuning database at {path}: run `edgert tune --db {path}` first, "
                              "or drop --db")
        return {}
    configs = configs_for(TuningDB(path), arch)
    log.info("%d tuned kernel configs from %s", len(configs), path)
    return configs


def _ok(rec: dict) -> list[dict]:
    return [c for c in rec["candidates"] if c["status"] == "ok"]


def default_ms(rec: dict) -> float | None:
    return next((c["ms"] for c in rec["candidates"] if c.get("default") and c["status"] == "ok"),
                None)


def best(rec: dict) -> dict | None:
    """The fastest verified candidate (ties: the earlier, i.e. the default)."""
    ok = _ok(rec)
    return min(ok, key=lambda c: c["ms"]) if ok else None


def finalists(rec: dict, k: int = CONFIRM_TOP) -> list[dict]:
    """Up to k fastest verified non-default candidates that timed faster than the default."""
    d = default_ms(rec)
    ok = sorted((c for c in _ok(rec) if not c.get("default")), key=lambda c: c["ms"])
    return [c for c in ok if d is not None and c["ms"] < d][:k]


def confirmed(rec: dict) -> bool:
    """Whether `confirm` is up to date (no candidate was measured after it)."""
    conf = rec.get("confirm")
    return bool(conf) and conf.get("measured") == len(rec["candidates"])


def decide(rec: dict, min_gain: float = MIN_GAIN) -> None:
    """`choice` = the re-timed finalist with the lowest median (over rounds) of its time relative
    to the default's in the same round, if that median is below 1 - `min_gain`. A ratio of two
    adjacent timings cancels most of a shared machine's load drift; the median ignores a round that
    a burst of load hit."""
    if (rec.get("choice") or {}).get("pinned"):
        return
    rec["choice"] = None
    conf = rec.get("confirm")
    if not conf or not conf["candidates"]:
        return
    top = min(conf["candidates"], key=lambda c: c["ratio"])
    if top["ratio"] < 1 - min_gain:
        rec["choice"] = {"config": top["config"], "ms": top["ms"], "default_ms": conf["default_ms"],
                         "ratio": top["ratio"]}


# ------------------------------------------------------------------------------------ measuring
def make_inputs(params, n_out: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Random inputs by buffer name: masks keep >= half of each row, seeds enable dropout."""
    out = []
    for p in params[:len(params) - n_out]:
        shape, dt = tuple(int(s) for s in p.shape), str(p.dtype)
        if p.name == "seed":
            a = np.array([1234, 1] + [0] * (math.prod(shape) - 2), np.int64)[:math.prod(shape)]
        elif p.name == "mask":
            keep = rng.integers(shape[-1] // 2, shape[-1] + 1, size=shape[:-1])
            a = (np.arange(shape[-1]) < keep[..., None]).astype(dt)
        elif np.dtype(dt).kind in "iu":
            a = rng.integers(0, 2, size=shape).astype(dt)
        else:
            a = rng.uniform(-1, 1, size=shape).astype(dt)
        out.append(a.reshape(shape))
    return out


class Measurer:
    """Compiles one PrimFunc for the target and times it on this machine (min of N runs)."""

    def __init__(self, arch: Arch, min_seconds: float = 0.15, min_runs: int = 3,
                 max_runs: int = 50, rtol: float = 1e-4):
        import tvm

        self.arch, self.target, self.dev = arch, arch.tvm_target(), tvm.cpu()
        self.min_seconds, self.min_runs, self.max_runs = min_seconds, min_runs, max_runs
        self.rtol = rtol

    def compile(self, f) -> Callable:
        import tvm

        mod = tvm.IRModule({"main": f.with_attr("global_symbol", "main")})
        return tvm.compile(mod, target=self.target)["main"]

    def args(self, f, n_out: int, inputs: list[np.ndarray]) -> list:
        """Device tensors: the inputs, then outputs filled with NaN (a skipped store shows)."""
        import tvm

        outs = []
        for p in f.params[len(f.params) - n_out:]:
            dt = str(p.dtype)
            fill = np.nan if np.dtype(dt).kind == "f" else -1
            outs.append(np.full(tuple(int(s) for s in p.shape), fill, dt))
        return [tvm.runtime.tensor(a, self.dev) for a in [*inputs, *outs]]

    def run_once(self, fn, args, n_out: int) -> list[np.ndarray]:
        fn(*args)
        return [a.numpy() for a in args[len(args) - n_out:]]

    def time(self, fn, args, cutoff: float | None = None) -> float:
        """Min over runs (seconds); stops after two runs once slower than `cutoff`."""
        fn(*args)                                   # warm-up
        t_min, total, n = math.inf, 0.0, 0
        while n < self.min_runs or (total < self.min_seconds and n < self.max_runs):
            t0 = time.perf_counter()
            fn(*args)
            dt = time.perf_counter() - t0
            t_min, total, n = min(t_min, dt), total + dt, n + 1
            if cutoff is not None and n >= 2 and t_min > cutoff:
                break
        return t_min

    def mismatch(self, out: list[np.ndarray], ref: list[np.ndarray]) -> str | None:
        """Why `out` differs from the reference outputs (None if it agrees)."""
        for i, (o, r) in enumerate(zip(out, ref, strict=True)):
            scale = float(np.abs(r).max()) if r.size else 0.0
            if not np.allclose(o, r, rtol=self.rtol, atol=self.rtol * max(scale, 1e-30)):
                with np.errstate(invalid="ignore"):
                    err = float(np.nanmax(np.abs(o.astype(np.float64) - r))) if o.size else 0.0
                nan = int(np.isnan(o).sum())
                return f"output {i}: max |diff| {err:.3g} (scale {scale:.3g}, {nan} NaN)"
        return None


# ---------------------------------------------------------------------------------------- tuning
@dataclass(frozen=True, slots=True)
class Event:
    """One progress step: a candidate measured (or a best config confirmed) for one workload."""

    index: int                  # workload i of n (1-based)
    total: int
    label: str
    candidate: int              # candidate j of m (1-based; 0 for a confirmation)
    candidates: int
    config: dict
    status: str     # ok wrong build_error run_error same crashed | confirmed rejected (confirm)
    ms: float | None
    best_ms: float | None
    default_ms: float | None
    elapsed: float              # s, this run
    budget: float               # s
    ratio: float | None = None  # confirmation: median time ratio to the default, round by round

    def line(self) -> str:
        ms = f"{self.ms:8.3f} ms" if self.ms is not None else " " * 11
        best = f"best {self.best_ms:.3f}" if self.best_ms is not None else "best -"
        dflt = f" (default {self.default_ms:.3f})" if self.default_ms is not None else ""
        cand = f"cand {self.candidate:2d}/{self.candidates}" if self.candidate else "confirm   "
        cfg = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}"
                       for k, v in self.config.items())
        ratio = f" ratio {self.ratio:.3f}" if self.ratio is not None else ""
        return (f"[{self.elapsed:5.0f}s/{self.budget:.0f}s] wl {self.index:2d}/{self.total} "
                f"{self.label:<34.34} {cand} {ms} {self.status:<11} {best}{dflt}{ratio}  {cfg}")


def print_progress(ev: Event) -> None:
    print(ev.line(), file=sys.stderr, flush=True)


@dataclass(frozen=True, slots=True)
class Row:
    label: str
    calls: int
    default_ms: float | None
    tuned_ms: float | None
    measured: int
    candidates: int
    config: dict | None         # the tuned config the compiler uses (None: the default)

    @property
    def speedup(self) -> float:
        return (self.default_ms / self.tuned_ms) if self.default_ms and self.tuned_ms else 1.0


@dataclass
class TuneReport:
    rows: list[Row]
    elapsed: float
    measured: int               # candidates timed in this run
    interrupted: bool = False
    db_path: str = ""

    def format(self) -> str:
        head = (f"{'workload':<36} {'calls':>5} {'default ms':>10} {'tuned ms':>9} {'speedup':>7} "
                f"{'tried':>7}")
        lines = [head, "-" * len(head)]
        before = after = 0.0
        for r in self.rows:
            d = f"{r.default_ms:10.3f}" if r.default_ms is not None else f"{'-':>10}"
            t = f"{r.tuned_ms:9.3f}" if r.tuned_ms is not None else f"{'-':>9}"
            lines.append(f"{r.label:<36.36} {r.calls:5d} {d} {t} {r.speedup:6.2f}x "
                         f"{r.measured:3d}/{r.candidates:<3d}")
            if r.default_ms is not None and r.tuned_ms is not None:
                before, after = before + r.calls * r.default_ms, after + r.calls * r.tuned_ms
        gain = before - after
        lines.append(f"estimated gain: {gain:.1f} ms of {before:.1f} ms per micro-batch (fwd+bwd, "
                     f"tunable kernels) = {100 * gain / before if before else 0:.1f}%; "
                     f"{self.measured} candidates timed in {self.elapsed:.0f}s"
                     + (" (interrupted: re-run to resume)" if self.interrupted else ""))
        if self.db_path:
            lines.append(f"database: {self.db_path}")
        return "\n".join(lines)


class _WorkloadTuner:
    """One workload's tuning state in one run: its record, compiled default, reference outputs."""

    def __init__(self, wl: Workload, rec: dict, arch: Arch, measurer: Measurer, seed: int):
        self.wl, self.rec, self.arch, self.m = wl, rec, arch, measurer
        self.cands = wl.candidates(arch)
        self.rng_seed = seed
        self.ref: list[np.ndarray] | None = None
        self.inputs: list[np.ndarray] | None = None
        self.fns: dict[str, Callable] = {}
        self.failed = False
        if rec.get("pending") is not None:    # the last run died inside this candidate
            self._add(rec["pending"], "crashed", error="the process died while measuring it")
            rec["pending"] = None

    # -- bookkeeping
    def done(self) -> set[str]:
        return {_canon(c["config"]) for c in self.rec["candidates"]}

    def todo(self) -> list[tuple[int, dict]]:
        d = self.done()
        return [(j, c) for j, c in enumerate(self.cands) if _canon(c) not in d]

    def _add(self, config, status, ms=None, **extra) -> dict:
        e = {"config": config, "status": status, "ms": ms, **extra}
        self.rec["candidates"].append(e)
        self.rec["complete"] = not self.todo()
        self.rec["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        return e

    def default_ms(self) -> float | None:
        return default_ms(self.rec)

    def weight(self) -> float:
        d = self.default_ms()
        return self.wl.calls * (d if d is not None else self.wl.flops * 1e-8)

    # -- measuring
    def _prepare(self) -> None:
        """Compile the default and compute the reference outputs every candidate must match."""
        if self.ref is not None:
            return
        self.default_f = f = self.wl.build(self.arch)
        self.inputs = make_inputs(f.params, self.wl.n_out, np.random.default_rng(self.rng_seed))
        self.fns["default"] = fn = self.m.compile(f)
        self.args = self.m.args(f, self.wl.n_out, self.inputs)
        self.ref = self.m.run_once(fn, self.args, self.wl.n_out)

    def measure(self, j: int, cfg: dict) -> dict | None:
        """Build, verify and time candidate j (j == 0: the default, built with config=None).

        Returns the new candidate entry, or None if the default itself no longer builds (the
        workload is then skipped: there is no reference to verify against)."""
        try:
            self._prepare()
        except Exception as e:   # noqa: BLE001 - reported, the workload is skipped
            self.failed = True
            log.warning("%s: the default config fails: %s", self.wl.label, e)
            if j == 0:
                return self._add(cfg, "build_error", default=True, error=_err(e))
            return None
        if j == 0:
            f, fn, args, tag = self.default_f, self.fns["default"], self.args, {"default": True}
        else:
            try:
                f = self.wl.build(self.arch, cfg)
                h = str(_structural_hash(f))
                twin = next((c for c in self.rec["candidates"] if c.get("hash") == h), None)
                if twin is not None:        # e.g. a tile size clamped to the same schedule
                    return self._add(cfg, "same", same_as=twin["config"], hash=h)
                fn = self.m.compile(f)
                args = self.m.args(f, self.wl.n_out, self.inputs)
            except Exception as e:   # noqa: BLE001 - a candidate that does not build is skipped
                return self._add(cfg, "build_error", error=_err(e))
            tag = {}
        tag["hash"] = h if j else str(_structural_hash(f))
        try:
            if j != 0:
                bad = self.m.mismatch(self.m.run_once(fn, args, self.wl.n_out), self.ref)
                if bad:
                    return self._add(cfg, "wrong", error=bad, **tag)
            b = best(self.rec)
            ms = self.m.time(fn, args, 3e-3 * b["ms"] if b else None) * 1e3
        except Exception as e:   # noqa: BLE001
            self.failed = self.failed or j == 0
            return self._add(cfg, "run_error", error=_err(e), **tag)
        return self._add(cfg, "ok", ms, **tag)

    def confirm(self, min_gain: float) -> str | None:
        """Re-time the finalists and the default in interleaved rounds (min of each): on a shared
        machine the load drifts between a candidate's and the default's first timing."""
        fin = finalists(self.rec)
        if confirmed(self.rec) or not fin:
            decide(self.rec, min_gain)
            return None
        self._prepare()
        fns = [self.fns["default"]] + [self.m.compile(self.wl.build(self.arch, c["config"]))
                                       for c in fin]
        r = np.array([[self.m.time(fn, self.args) for fn in fns] for _ in range(CONFIRM_ROUNDS)])
        t = r.min(axis=0) * 1e3                                    # ms, min over rounds
        ratio = np.median(r[:, 1:] / r[:, :1], axis=0)             # vs the default, per round
        self.rec["confirm"] = {"measured": len(self.rec["candidates"]), "rounds": CONFIRM_ROUNDS,
                               "default_ms": float(t[0]), "candidates": [
                                   {"config": c["config"], "ms": float(ti), "ratio": float(q)}
                                   for c, ti, q in zip(fin, t[1:], ratio, strict=True)]}
        for c, ti in zip(fin, t[1:], strict=True):      # every entry: min over all its timings
            c["ms"] = min(c["ms"], float(ti))
        self._default_entry()["ms"] = min(self.default_ms(), float(t[0]))
        decide(self.rec, min_gain)
        return "confirmed" if self.rec["choice"] else "rejected"

    def _default_entry(self) -> dict:
        return next(c for c in self.rec["candidates"] if c.get("default") and c["status"] == "ok")

    def retime_default(self) -> None:
        """Time the default again (min with its earlier timing): the candidates are compared with
        it as they come, and its first timing may have hit a busy moment."""
        if self.failed or self.default_ms() is None:
            return
        try:
            self._prepare()
        except Exception as e:   # noqa: BLE001
            self.failed = True
            log.warning("%s: the default config fails: %s", self.wl.label, e)
            return
        e = self._default_entry()
        e["ms"] = min(e["ms"], self.m.time(self.fns["default"], self.args) * 1e3)

    def row(self) -> Row:
        ch, d = self.rec.get("choice"), self.default_ms()
        return Row(self.wl.label, self.wl.calls, ch["default_ms"] if ch else d,
                   ch["ms"] if ch else d, len(self.rec["candidates"]), len(self.cands),
                   ch["config"] if ch else None)


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:300]


def _structural_hash(f) -> int:
    import tvm_ffi

    return tvm_ffi.structural_hash(f)


class _Clock:
    def __init__(self, budget: float):
        self.t0, self.budget = time.monotonic(), float(budget)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.budget - self.elapsed()


def tune(model, specs, arch: Arch, db: TuningDB, budget_seconds: float,
         progress: Callable[[Event], None] | None = None, *, wls: list[Workload] | None = None,
         measurer: Measurer | None = None, min_gain: float = MIN_GAIN, seed: int = 0) -> TuneReport:
    """Tune the stages' kernels on this machine for at most `budget_seconds`; results go to `db`.

    Phase 1 times every workload's default (the baseline, the reference outputs and the weight:
    calls x default time); phase 2 spends the remaining budget on the workloads' candidates, each
    getting a share proportional to its weight (unused shares flow to the next). Candidates already
    in `db` are not measured again. Ctrl-C stops the run with everything measured so far saved
    (`TuneReport.interrupted`); an exception from `progress` propagates, also after saving.
    """
    if not arch.is_cpu:
        raise ConfigError(f"target {arch.name!r} is a GPU target: dlight schedules its kernels, "
                          "there is nothing to tune; tune a CPU target on the board itself")
    import platform

    if arch.elf_machine != platform.machine():
        raise ConfigError(f"target {arch.name!r} is for {arch.elf_machine}, this machine is "
                          f"{platform.machine()}: run `edgert tune` on the board itself")
    if "TVM_NUM_THREADS" not in os.environ:
        log.warning("TVM_NUM_THREADS is not set: TVM may time kernels on one thread")
    wls = workloads(model, specs, arch) if wls is None else wls
    m = measurer or Measurer(arch)
    clock = _Clock(budget_seconds)
    tuners = [_WorkloadTuner(w, db.record(arch, w), arch, m, seed) for w in wls]
    db.save()
    n, measured, interrupted = len(tuners), 0, False

    def step(i: int, t: _WorkloadTuner, j: int, cfg: dict) -> None:
        nonlocal measured
        t.rec["pending"] = cfg
        db.save()
        e = t.measure(j, cfg)
        t.rec["pending"] = None
        db.save()
        if e is None:
            return
        measured += e["status"] != "same"
        b = best(t.rec)
        if progress:
            progress(Event(i + 1, n, t.wl.label, j + 1, len(t.cands), cfg, e["status"], e["ms"],
                           b["ms"] if b else None, t.default_ms(), clock.elapsed(), clock.budget))

    try:
        for i, t in enumerate(tuners):                      # phase 1: defaults
            todo = t.todo()
            if todo and todo[0][0] == 0 and clock.left() > 0:
                step(i, t, 0, todo[0][1])
        active = sorted((i for i, t in enumerate(tuners) if not t.failed and t.default_ms()),
                        key=lambda i: -tuners[i].weight())
        for k, i in enumerate(active):                      # phase 2: candidates by weight
            t = tuners[i]
            rest = sum(tuners[r].weight() for r in active[k:] if tuners[r].todo())
            until = clock.elapsed() + max(0.0, clock.left()) * t.weight() / max(rest, 1e-30)
            before = measured
            if t.todo() and clock.left() > 0:
                t.retime_default()
            for j, cfg in t.todo():
                if clock.left() <= 0 or clock.elapsed() >= until or t.failed:
                    break
                step(i, t, j, cfg)
            if t.failed or (clock.left() <= 0 and measured == before):
                continue
            status = t.confirm(min_gain)
            db.save()
            if status and progress:
                conf = t.rec["confirm"]
                top = min(conf["candidates"], key=lambda c: c["ratio"])
                progress(Event(i + 1, n, t.wl.label, 0, len(t.cands), top["config"], status,
                               top["ms"], top["ms"], conf["default_ms"], clock.elapsed(),
                               clock.budget, top["ratio"]))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        for t in tuners:
            t.rec["pending"] = None
            decide(t.rec, min_gain)     # pure: a new min_gain applies without re-timing
        db.save()
    rows = sorted((t.row() for t in tuners),
                  key=lambda r: -(r.calls * (r.default_ms or 0)))
    return TuneReport(rows, clock.elapsed(), measured, interrupted, str(db.path))
