"""The stage bundle contract between the compiler (writer) and the board runtime (reader).

A bundle is a directory:

    manifest.json        this schema (Manifest), written last
    stage.so             the compiled Relax VM executable with every kernel (TVM export_library)
    params.safetensors   the stage's parameters (internal names, see compiler/model_spec.py)

Loading verifies the sha256 of every file and that the bundle's target fits this machine, and raises
`ArtifactError` saying what to do otherwise. This module needs only the standard library and numpy:
boards read it without TVM's compiler.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgert.contract import TensorMeta
from edgert.errors import ArtifactError

FORMAT_VERSION = 1
STAGE_FORWARD = "stage_forward"
STAGE_BACKWARD = "stage_backward"
OPTIMIZER_STEP = "optimizer_step"
ACCUMULATE = "grad_accumulate"
# Forward-only entry of whole-model bundles: stage_loss(*data, *params) -> (loss, logits), dropout
# off and no saved activations (compiler/stage.py; docs/fwdgrad.md "Memory").
STAGE_LOSS = "stage_loss"
LIB_FILE = "stage.so"
PARAMS_FILE = "params.safetensors"
MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True, slots=True)
class Manifest:
    """Everything a board needs to know about a stage bundle."""

    model_id: str
    checkpoint_sha256: str
    dims: dict[str, Any]
    stage: dict[str, Any]                # index, num_stages, first, last, batch, seq, dropout
    target: dict[str, Any]               # preset, tvm target dict, host, elf_machine, vector_bits, cpu_flags
    tvm_version: str
    compiler_hash: str
    dtype: str
    data_inputs: tuple[TensorMeta, ...]  # stage_forward's leading inputs (before seed and params)
    outputs: tuple[TensorMeta, ...]      # stage_forward's leading outputs (before saved tensors)
    saved: tuple[TensorMeta, ...]        # tensors kept from forward to backward
    params: tuple[TensorMeta, ...]
    entries: tuple[str, ...]
    files: dict[str, str] = field(default_factory=dict)   # file name -> sha256
    kernels: int = 0
    compile_seconds: float = 0.0
    format_version: int = FORMAT_VERSION
    # params stored as GGUF blocks (uint8): name -> {"format": "q8_0"|"q4_1", "shape": logical
    # float shape, "rel_error": quantization error or None}; see docs/quant.md
    quantized: dict[str, Any] = field(default_factory=dict)

    @property
    def index(self) -> int:
        return int(self.stage["index"])

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == int(self.stage["num_stages"]) - 1

    @property
    def frozen(self) -> frozenset[str]:
        """Parameters the stage takes but does not train (no gradient, no AdamW state)."""
        return frozenset(self.stage.get("frozen", ()))

    @property
    def trainable(self) -> tuple[TensorMeta, ...]:
        """The trained parameters, in the order of the backward's gradients and the optimizer's
        arguments (compiler/stage.py [Note: frozen params])."""
        fz = self.frozen
        return tuple(t for t in self.params if t.name not in fz)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> Manifest:
        try:
            d = json.loads(text)
            if d.get("format_version") != FORMAT_VERSION:
                raise ArtifactError(
                    f"{where}: bundle format {d.get('format_version')} but this runtime reads "
                    f"format {FORMAT_VERSION}; recompile the bundle with this version (edgert compile)")
            for k in ("data_inputs", "outputs", "saved", "params"):
                d[k] = tuple(TensorMeta.from_dict(t) for t in d[k])
            d["entries"] = tuple(d["entries"])
            return cls(**d)
        except ArtifactError:
            raise
        except (ValueError, KeyError, TypeError) as e:
            raise ArtifactError(f"{where} is not a valid stage manifest ({e}); recompile the bundle") from e


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def check_fits_machine(m: Manifest, where: str) -> None:
    """Refuse a bundle compiled for another machine (architecture, SIMD features, TVM version)."""
    want = m.target.get("elf_machine")
    have = platform.machine()
    if want and want != have:
        raise ArtifactError(
            f"{where} was compiled for {want} (target {m.target.get('preset')!r}) but this machine is "
            f"{have}; compile the stage for this board's target (edgert compile --target ...)")
    if m.target.get("kind") == "gpu" and not m.target.get("allow_cpu_fallback"):
        raise ArtifactError(
            f"{where} targets an OpenCL GPU ({m.target.get('preset')}), and this TVM runtime has no "
            f"OpenCL support (the PyPI wheel is built with USE_OPENCL=OFF); deploy the arm64 CPU bundle "
            f"on this board, or install a TVM runtime built with OpenCL")
    need = set(m.target.get("cpu_flags", []))
    if need and have == "x86_64":
        missing = need - cpu_flags()
        if missing:
            raise ArtifactError(
                f"{where} uses CPU features this machine lacks ({', '.join(sorted(missing))}); "
                f"recompile with --target host on this machine")
    try:
        from importlib.metadata import version

        rt = version("apache-tvm")
    except Exception:  # noqa: BLE001 - a board may carry only the runtime library
        rt = None
    if rt and m.tvm_version and rt != m.tvm_version:
        raise ArtifactError(
            f"{where} was compiled by TVM {m.tvm_version} but this runtime is TVM {rt}; recompile "
            f"the bundle or install apache-tvm=={m.tvm_version}")


def load_manifest(bundle: Path, verify: bool = True) -> Manifest:
    """Read and verify a bundle directory; raises ArtifactError with a fix-it message."""
    bundle = Path(bundle)
    mpath = bundle / MANIFEST_FILE
    if not mpath.is_file():
        raise ArtifactError(
            f"{bundle} is not a stage bundle (no {MANIFEST_FILE}); build one with `edgert compile`")
    m = Manifest.from_json(mpath.read_text(encoding="utf-8"), where=str(mpath))
    if verify:
        for name, digest in m.files.items():
            p = bundle / name
            if not p.is_file():
                raise ArtifactError(f"{bundle}: {name} is missing; recompile or re-deploy the bundle")
            got = sha256_file(p)
            if got != digest:
                raise ArtifactError(
                    f"{bundle}: {name} has changed since it was compiled (sha256 {got[:12]}... != "
                    f"{digest[:12]}...); the bundle is corrupt or was edited: recompile or re-deploy it")
        check_fits_machine(m, str(bundle))
    return m
