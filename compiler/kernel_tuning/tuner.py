"""The budgeted tuning run: `tune` times each workload's default, then spends the budget on the
candidates by weight, confirms the finalists and records everything in the database as it goes.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from compiler.arch import Arch
from compiler.kernel_tuning.choice import MIN_GAIN, best, confirmed, decide, default_ms, finalists
from compiler.kernel_tuning.db import TuningDB
from compiler.kernel_tuning.measure import Measurer, make_inputs
from compiler.kernel_tuning.workloads import Workload, canonical, workloads
from edgert.errors import ConfigError

log = logging.getLogger(__name__)

CONFIRM_ROUNDS = 5            # each round: default, then each finalist, each a min-of-N


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
        return {canonical(c["config"]) for c in self.rec["candidates"]}

    def todo(self) -> list[tuple[int, dict]]:
        d = self.done()
        return [(j, c) for j, c in enumerate(self.cands) if canonical(c) not in d]

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
