"""Run a stage bundle with TVM's runtime alone: `tvm_ffi` + `libtvm_runtime.so`, never the compiler.

`import tvm` maps the whole compiler (~190 MiB RSS); a board does not need it. This module loads the
exported Relax VM executable through the runtime library and calls its entry points with tensors
shared with numpy through DLPack (zero copy).

[Note: torch and tvm_ffi] `tvm_ffi` imports torch when it is installed (+180 MiB). A board has no
torch, but a test host does; `load_runtime()` blocks that import in board processes (`block_torch`).
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

from edgert.artifact import (
    ACCUMULATE, LIB_FILE, OPTIMIZER_STEP, PARAMS_FILE, STAGE_BACKWARD, STAGE_FORWARD, STAGE_LOSS,
    Manifest, load_manifest,
)
from edgert.errors import ArtifactError

log = logging.getLogger(__name__)
_ALIGN = 64   # TVM kernels assume 64-byte aligned buffers; misaligned DLPack input segfaults
_rt = None


def _runtime_lib() -> Path:
    spec = importlib.util.find_spec("tvm")
    if spec is None or not spec.submodule_search_locations:
        raise ArtifactError("TVM's runtime is not installed: pip install apache-tvm==0.27.0.post1 "
                            "apache-tvm-ffi==0.1.14.post1 (or run scripts/setup.sh)")
    lib = Path(spec.submodule_search_locations[0]) / "lib" / "libtvm_runtime.so"
    if not lib.is_file():
        raise ArtifactError(f"{lib} is missing: reinstall apache-tvm")
    return lib


def load_runtime(threads: int | None = None, block_torch: bool = False):
    """Load tvm_ffi and libtvm_runtime once; returns the tvm_ffi module."""
    global _rt
    if _rt is not None:
        return _rt
    # TVM's pool starts with one worker on some VMs unless told; it reads this when it first runs.
    os.environ["TVM_NUM_THREADS"] = str(threads or os.environ.get("TVM_NUM_THREADS")
                                        or len(os.sched_getaffinity(0)))
    if block_torch and "torch" not in sys.modules:
        sys.modules["torch"] = None  # type: ignore[assignment]  # see [Note: torch and tvm_ffi]
    import tvm_ffi

    if "tvm" not in sys.modules:  # the full `tvm` package, if imported, has loaded it already
        ctypes.CDLL(str(_runtime_lib()), mode=ctypes.RTLD_GLOBAL)
    _rt = tvm_ffi
    return _rt


_lib_loaded: dict[str, str] = {}   # library path -> sha256 of what was loaded from it


def _unique_lib_path(bundle: Path, m: Manifest) -> Path:
    """The path to dlopen for this bundle's library.

    [Note: dlopen caches by path] The dynamic loader hands back the already-loaded library for a
    path it has opened before, even after the file was replaced. A board that is re-deployed in
    place (same bundle name, a different stage after a re-plan) would silently keep running the old
    code. So a path that was loaded with other content is loaded through a content-named hard link
    (a copy if links are impossible) beside the bundle.
    """
    path = bundle / LIB_FILE
    sha = m.files.get(LIB_FILE) or ""
    key = str(path.resolve())
    if _lib_loaded.setdefault(key, sha) == sha:
        return path
    alias = bundle.parent / f".{bundle.name}-{sha[:16]}-{LIB_FILE}"
    if not alias.exists():
        tmp = alias.with_name(alias.name + f".{os.getpid()}.part")
        try:
            os.link(path, tmp)
        except OSError:
            import shutil

            shutil.copyfile(path, tmp)
        tmp.replace(alias)
    _lib_loaded[str(alias.resolve())] = sha
    return alias


def aligned(a: np.ndarray) -> np.ndarray:
    """A C-contiguous, 64-byte aligned copy of `a` (or `a` itself if it already is one)."""
    if a.flags.c_contiguous and a.ctypes.data % _ALIGN == 0:
        return a
    buf = np.empty(a.nbytes + _ALIGN, dtype=np.uint8)
    off = (-buf.ctypes.data) % _ALIGN
    out = buf[off:off + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


_ST_DTYPES = {"F32": "float32", "F16": "float16", "F64": "float64", "I64": "int64",
              "I32": "int32", "U8": "uint8"}   # safetensors dtype codes -> numpy


def _aligned_empty(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    dt = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    buf = np.empty(nbytes + _ALIGN, dtype=np.uint8)
    off = (-buf.ctypes.data) % _ALIGN
    return buf[off:off + nbytes].view(dt).reshape(shape)


def read_params(path: Path, metas) -> list[np.ndarray]:
    """The tensors `metas` (TensorMeta: name, shape, dtype) of a safetensors file, each read
    straight from the file into its own 64-byte aligned array.

    Tensor by tensor, with no mmap and no whole-file buffer: loading peaks at the parameters plus
    one read call, not at twice the file (safetensors' load_file + the aligned copy coexisted).
    """
    def bad(why: str) -> ArtifactError:
        return ArtifactError(f"{path} is unreadable ({why}); re-deploy the bundle")

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= min(size - 8, 1 << 26):
            raise bad("no safetensors header")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise bad(f"header is not JSON: {e}") from e
        out = []
        for t in metas:
            e = header.get(t.name)
            shape = tuple(e.get("shape", ())) if isinstance(e, dict) else None
            if shape != tuple(t.shape):
                raise ArtifactError(f"{path}: tensor {t.name} missing or of shape {shape}, "
                                    f"manifest says {t.shape}")
            if _ST_DTYPES.get(e.get("dtype")) != np.dtype(t.dtype).name:
                raise bad(f"tensor {t.name} is {e.get('dtype')}, the manifest says {t.dtype}")
            a = _aligned_empty(shape, t.dtype)
            b0, b1 = e.get("data_offsets", (0, -1))
            if b1 - b0 != a.nbytes or 8 + n + b1 > size:
                raise bad(f"tensor {t.name} has offsets {b0}..{b1} for {a.nbytes} bytes in a "
                          f"{size}-byte file (truncated?)")
            f.seek(8 + n + b0)
            if a.nbytes and f.readinto(memoryview(a).cast("B")) != a.nbytes:
                raise bad(f"short read of {t.name}")
            out.append(a)
    return out


def _trim_heap() -> None:
    """glibc's malloc_trim(0): return free heap pages to the OS (no-op elsewhere). glibc raises its
    mmap threshold after large frees, so freed 1 MiB message buffers stay in the heap and in RSS."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def to_dev(a: np.ndarray):
    """numpy -> runtime tensor sharing memory (the tensor keeps the array alive)."""
    return _rt.from_dlpack(aligned(np.asarray(a)))


def to_np(t) -> np.ndarray:
    """runtime tensor -> numpy view (zero copy)."""
    return np.from_dlpack(t)


class TvmStage:
    """One loaded stage bundle: parameters resident, entry points callable.

    Examples
    --------
    >>> st = TvmStage.load("build/bundles/stage0")           # doctest: +SKIP
    >>> out, saved = st.forward([ids, types, mask], seed=1)  # doctest: +SKIP
    """

    def __init__(self, manifest: Manifest, vm, params: list):
        self.manifest = manifest
        self._vm = vm
        self.params = params          # runtime tensors, manifest.params order (frozen ones too)
        fz = manifest.frozen
        self._train_idx = [i for i, t in enumerate(manifest.params) if t.name not in fz]
        self._fns = {name: vm[name] for name in manifest.entries}

    @classmethod
    def load(cls, bundle: Path | str, *, threads: int | None = None, verify: bool = True,
             block_torch: bool = False) -> TvmStage:
        bundle = Path(bundle)
        m = load_manifest(bundle, verify=verify)
        rt = load_runtime(threads, block_torch=block_torch)
        try:
            mod = rt.load_module(str(_unique_lib_path(bundle, m)))
            vm = mod["vm_load_executable"]()
            vm["vm_initialization"](1, 0, 2)  # kDLCPU, device 0, pooled allocator
        except Exception as e:  # noqa: BLE001 - TVM raises its own error types
            raise ArtifactError(f"{bundle}/{LIB_FILE} could not be loaded by the TVM runtime ({e}); "
                                f"recompile the bundle for this board") from e
        _trim_heap()   # freed upload/message buffers back to the OS before the parameters come
        params = [to_dev(a) for a in read_params(bundle / PARAMS_FILE, m.params)]
        return cls(m, vm, params)

    # ---- entry points -----------------------------------------------------------------------
    def forward_check(self, data: list) -> None:
        """Raise ArtifactError if a data input's shape or dtype differs from the bundle's."""
        m = self.manifest
        for meta, a in zip(m.data_inputs, data, strict=True):
            if isinstance(a, np.ndarray) and (a.shape != meta.shape or a.dtype != np.dtype(meta.dtype)):
                raise ArtifactError(
                    f"stage {m.index}: input {meta.name} has shape {a.shape} {a.dtype}, the bundle "
                    f"was compiled for {meta.shape} {meta.dtype}; pad/truncate the batch or recompile")

    def forward(self, data: list, seed: np.ndarray):
        """Returns (outputs, saved): outputs = [hidden] or [loss, logits] on the last stage."""
        m = self.manifest
        self.forward_check(data)
        args = [to_dev(a) if isinstance(a, np.ndarray) else a for a in data]
        r = self._fns[STAGE_FORWARD](*args, to_dev(seed), *self.params)
        n_out = len(m.outputs)
        return list(r[:n_out]), list(r[n_out:])

    def loss(self, data: list) -> tuple:
        """(loss, logits) of a whole-model bundle with dropout off, through its forward-only
        `stage_loss` entry (no saved activations); bundles without it use stage_forward."""
        if STAGE_LOSS not in self._fns:
            outs, _ = self.forward(data, np.array([1, 0], np.int64))
            return outs[0], outs[1]
        self.forward_check(data)
        r = self._fns[STAGE_LOSS](*[to_dev(a) for a in data], *self.params)
        return r[0], r[1]

    def backward(self, saved: list, dout, seed: np.ndarray):
        """Returns (dinput or None, grads)."""
        if isinstance(dout, np.ndarray):
            dout = to_dev(dout)
        r = self._fns[STAGE_BACKWARD](*saved, dout, to_dev(seed), *self.params)
        r = list(r)
        if self.manifest.is_first:
            return None, r
        return r[0], r[1:]

    def zeros_like_params(self) -> list:
        """Zero tensors shaped like the *trained* parameters (gradients, AdamW moments)."""
        return [to_dev(np.zeros(t.shape, t.dtype)) for t in self.manifest.trainable]

    def accumulate(self, acc: list, grads: list) -> list:
        return list(self._fns[ACCUMULATE](*acc, *grads))

    def optimizer_step(self, grads: list, m: list, v: list, hyper: np.ndarray) -> None:
        """AdamW in place on the trained params, m and v (frozen params are never touched)."""
        trained = [self.params[i] for i in self._train_idx]
        h = to_dev(hyper.astype(self.manifest.dtype))   # edgert.contract.HYPER, in the stage dtype
        self._fns[OPTIMIZER_STEP](*trained, *grads, *m, *v, h)

    def params_numpy(self) -> dict[str, np.ndarray]:
        return {t.name: to_np(p).copy() for t, p in zip(self.manifest.params, self.params, strict=True)}

    def set_params(self, arrays: dict[str, np.ndarray]) -> None:
        """Replace the parameters with copies of `arrays` (the optimizer updates them in place, so
        sharing the caller's buffers would silently change the caller's arrays)."""
        self.params = [to_dev(np.array(arrays[t.name], dtype=t.dtype, order="C", copy=True))
                       for t in self.manifest.params]
