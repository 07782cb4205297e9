"""The distinct tunable kernels (workloads) of a model's stages, found by recording a StageGraph's
kernel calls, heaviest (calls x FLOPs) first. See [Note: tuning database] in __init__.py for what a
workload key covers.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from compiler.arch import Arch

PERF_NEUTRAL = ("salt",)      # builder kwargs that do not change a kernel's speed


def canonical(cfg: dict) -> str:
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
        return [d] + [c for c in space if canonical(c) != canonical(d)]


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
