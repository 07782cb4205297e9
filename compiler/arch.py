"""Compile targets: what a kernel schedule needs to know about the machine it is for.

A stage is compiled for one `Arch`. CPU arches carry the vector width and core count that the
hand-written schedules in `compiler/kernels/` tile for; GPU arches leave kernels unscheduled so
that TVM's dlight GPU rules schedule them (see docs/compiler.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from edgert.artifact import cpu_flags
from edgert.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Arch:
    """One compile target.

    name:    preset name ("host", "arm64", "mali", "adreno")
    kind:    "cpu" (kernels scheduled by compiler/kernels) or "gpu" (scheduled by dlight)
    target:  TVM target as a JSON dict (TVM 0.27 rejects CLI target strings)
    host:    host target dict for GPU targets (the CPU side of an OpenCL build)
    vector_bits: SIMD register width the CPU schedules vectorise for (512 AVX-512, 256 AVX2, 128 NEON)
    threads: worker threads of TVM's pool on the board (parallel loops are split for this many)
    cross_cc: C++ compiler that links the exported library ("" = the host's default)
    """

    name: str
    kind: str
    target: dict[str, Any]
    host: dict[str, Any] | None = None
    vector_bits: int = 512
    threads: int = 2
    cross_cc: str = ""
    elf_machine: str = "x86_64"
    extra: dict[str, Any] = field(default_factory=dict)

    def lanes(self, dtype: str) -> int:
        """Vector lanes for `dtype` (float32 -> 16 on AVX-512, 4 on NEON)."""
        bits = {"float32": 32, "float64": 64, "float16": 16, "int32": 32, "uint32": 32}[dtype]
        return max(1, self.vector_bits // bits)

    def tvm_target(self):  # -> tvm.target.Target (imported lazily: boards never import the compiler)
        import tvm

        if self.host is not None:
            return tvm.target.Target(self.target, host=self.host)
        return tvm.target.Target(self.target)

    @property
    def is_cpu(self) -> bool:
        return self.kind == "cpu"


def _host_cpu() -> tuple[str, int]:
    """LLVM name of this machine's CPU and its SIMD width in bits."""
    from tvm.target import codegen

    cpu = codegen.llvm_get_system_cpu()
    flags = cpu_flags()
    if "avx512f" in flags:
        return cpu, 512
    if "avx2" in flags:
        return cpu, 256
    return cpu, 128


def host_arch(threads: int | None = None) -> Arch:
    """The machine this process runs on (x86-64 with AVX-512/AVX2, or a native aarch64 board)."""
    cpu, bits = _host_cpu()
    n = threads or len(os.sched_getaffinity(0))
    import platform

    machine = platform.machine()
    return Arch(
        name="host",
        kind="cpu",
        target={"kind": "llvm", "mcpu": cpu, "num-cores": n},
        vector_bits=bits,
        threads=n,
        elf_machine=machine,
    )


_AARCH64_HOST = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}

PRESETS: dict[str, dict[str, Any]] = {
    # Cortex-A76-class boards (RK3588 big cores, Snapdragon prime/gold cores, Raspberry Pi 5).
    "arm64": dict(
        kind="cpu",
        target={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76", "mattr": ["+neon"], "num-cores": 4},
        vector_bits=128,
        threads=4,
        cross_cc="aarch64-linux-gnu-g++",
        elf_machine="aarch64",
    ),
    # OpenCL GPUs of aarch64 boards: kernels scheduled by dlight, host code for the board's CPU.
    **{gpu: dict(kind="gpu", target={"kind": "opencl", "device": gpu}, host=_AARCH64_HOST,
                 vector_bits=128, threads=4, cross_cc="aarch64-linux-gnu-g++", elf_machine="aarch64")
       for gpu in ("mali", "adreno")},
}


def get_arch(name: str, threads: int | None = None) -> Arch:
    """Resolve a preset name ("host", "arm64", "mali", "adreno") to an Arch."""
    if name == "host":
        return host_arch(threads)
    if name not in PRESETS:
        raise ConfigError(
            f"unknown target {name!r}; choose one of: host, {', '.join(sorted(PRESETS))}"
        )
    kw = dict(PRESETS[name])
    if threads:
        kw["threads"] = threads
    return Arch(name=name, **kw)
