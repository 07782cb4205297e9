"""Cross-target builds (arm64, Mali, Adreno) checked on the x86 build machine (see docs/targets.md).

* arm64: the exported stage.so is an aarch64 ELF shared object whose GEMMs use NEON FMAs, and an
  arm64 bundle is refused on this x86 host.
* mali / adreno: the stage really contains OpenCL kernels (none silently left on the host), every
  generated OpenCL kernel compiles under PoCL, and one PrimFunc of every distinct kernel variant
  (GEMM NT+bias / TN / epilogues, layernorm fwd+bwd, attention fwd+bwd, GELU, bias-grad, AdamW,
  accumulate) runs on PoCL through pyopencl and matches the host-LLVM build of the same
  unscheduled PrimFunc.
  Launch shapes come from the dlight-scheduled PrimFuncs' `T.thread_binding` extents.
  EDGERT_POCL_ALL=1 runs every PrimFunc (~46 per target) and builds every per-kernel program on its
  own (about +30 s per target).

One encoder layer (a middle stage), B=2, T=16 keeps the module under ~60 s on 2 cores.
"""

from __future__ import annotations

import ast
import os
import platform
import shutil
import time
import warnings

import numpy as np
import pytest
import tvm

from compiler import build_inspect as ci
from compiler.arch import get_arch
from compiler.model_spec import StageSpec
from tests.pocl_util import pocl_context, run_pocl

SPEC = StageSpec(index=1, num_stages=3, first=2, last=3, batch=2, seq=16)
ALL = os.environ.get("EDGERT_POCL_ALL", "") not in ("", "0")
# |pocl - cpu| <= REL_TOL * max(1, max|cpu|) per output tensor. Measured worst: 1.9e-7 of scale
# (GEMM with the gelu-grad epilogue, K=384; attention backward), so this leaves ~50x headroom
# for a different PoCL/LLVM contracting a*b+c into FMAs.
REL_TOL = 1e-5


@pytest.fixture(scope="module")
def model():
    from control.job import load_model

    return load_model()


# ------------------------------------------------------------------------------------ arm64


@pytest.fixture(scope="module")
def arm64_lib(model):
    from compiler.build import compile_stage

    arch = get_arch("arm64")
    if not shutil.which(arch.cross_cc):
        pytest.skip(f"aarch64 cross toolchain absent ({arch.cross_cc} not on PATH): "
                    f"apt-get install g++-aarch64-linux-gnu")
    lib, info = compile_stage(model.dims, SPEC, arch)
    return lib, info


def test_arm64_library_is_aarch64_shared_object(arm64_lib):
    lib, _ = arm64_lib
    h = ci.elf_header(lib)
    assert h["class"] == 2, "not ELFCLASS64"
    assert h["data"] == 1, "not little-endian"
    assert h["type"] == ci.ET_DYN, f"e_type {h['type']} is not ET_DYN (shared object)"
    assert h["machine"] == ci.EM_AARCH64, f"e_machine {h['machine']} is not EM_AARCH64 (183)"


def test_arm64_gemms_use_neon_fma(arm64_lib):
    lib, info = arm64_lib
    objdump = ci.find_objdump("aarch64")
    if objdump is None:
        pytest.skip("no aarch64 disassembler: apt-get install binutils-aarch64-linux-gnu")
    dis = ci.disassemble(lib, objdump)
    vec = ci.count_instructions(dis, r"^fmla\tv\d+\.4s")   # 128-bit NEON FMA (vector or by lane)
    scal = ci.count_instructions(dis, r"^fmadd\ts\d+")        # scalar float FMA

    def per_kernel(counts):
        out: dict[str, int] = {}
        for sym, n in counts.items():   # k0_gemm_compute_ (parallel body), __tvm_ffi_k0_gemm
            name = sym.removeprefix("__tvm_ffi_").split("_compute_")[0]
            out[name] = out.get(name, 0) + n
        return out

    vec_k, scal_k = per_kernel(vec), per_kernel(scal)
    n_gemm = sum(k.startswith("gemm.build_gemm") for k in info["kernel_keys"])
    gemms = sorted(k for k in vec_k if k.split("_", 1)[-1] == "gemm")
    print(f"\narm64 NEON: {sum(vec.values())} fmla .4s in stage.so; per GEMM kernel "
          + ", ".join(f"{k}={vec_k[k]}" for k in gemms) + f"; scalar fmadd in GEMMs: "
          f"{sum(scal_k.get(k, 0) for k in gemms)}")
    assert n_gemm > 0 and len(gemms) == n_gemm, \
        f"{n_gemm} GEMM kernels in the stage, only {gemms} contain NEON fmla .4s"
    for k in gemms:
        assert vec_k[k] >= 4, f"{k}: only {vec_k[k]} vector FMAs"
        assert vec_k[k] > scal_k.get(k, 0), f"{k}: more scalar fmadd ({scal_k[k]}) than NEON fmla"


def test_arm64_bundle_refused_on_x86(arm64_lib, model, tmp_path):
    from compiler.build import build_bundle
    from edgert.artifact import load_manifest
    from edgert.errors import ArtifactError

    if platform.machine() == "aarch64":
        pytest.skip("this machine is aarch64: the arm64 bundle is supposed to load here")
    arch = get_arch("arm64")
    out = tmp_path / "stage1"
    m = build_bundle(out, model.dims, SPEC, arch, model.weights, model.model_id, model.sha256)
    assert m.target["elf_machine"] == "aarch64"
    with pytest.raises(ArtifactError, match=r"compiled for aarch64 .*this machine is x86_64"):
        load_manifest(out)


# ------------------------------------------------------------------------------ Mali / Adreno


class GpuStage:
    def __init__(self, name, graph, build, sources, kernels):
        self.name, self.graph, self.build = name, graph, build
        self.sources, self.kernels = sources, kernels

    @property
    def our_kernels(self) -> dict[str, str]:
        """PrimFunc name -> builder key of our kernels (compiler/kernels; not TVM's reshapes)."""
        E = self.graph.E
        return {E._gv[key].name_hint: key for key in E.kernels}


@pytest.fixture(scope="module", params=["mali", "adreno"])
def gpu(request, model) -> GpuStage:
    from compiler.stage import StageGraph

    arch = get_arch(request.param)
    g = StageGraph(model.dims, SPEC, arch)
    b = ci.compile_with_schedule(g.build(), arch)
    sources = ci.opencl_sources(b.ex)
    kernels = ci.gpu_kernels(b.scheduled, sources) if b.scheduled is not None else {}
    return GpuStage(request.param, g, b, sources, kernels)


def test_gpu_stage_has_opencl_kernels(gpu):
    mods = ci.opencl_modules(gpu.build.ex)
    n_launch = sum(len(k.launches) for k in gpu.kernels.values())
    print(f"\n{gpu.name}: {len(mods)} OpenCL module(s), {len(gpu.sources)} OpenCL kernels from "
          f"{len(gpu.kernels)} PrimFuncs")
    assert mods, f"{gpu.name}: no OpenCL module at all: every kernel went to the host (no dlight?)"
    assert len(gpu.sources) > 0
    on_host = [n for n in gpu.our_kernels if n not in gpu.kernels]
    assert not on_host, f"{gpu.name}: kernels compiled for the host CPU, not OpenCL: {on_host}"
    assert n_launch == len(gpu.sources), "every OpenCL kernel is one launch of a scheduled PrimFunc"


@pytest.fixture(scope="module")
def pocl(tmp_path_factory):
    return pocl_context(tmp_path_factory.mktemp("pocl-cache"))


@pytest.fixture(scope="module")
def pocl_program(gpu, pocl):
    """Every kernel of the stage in one program (the per-kernel programs share their prototypes)."""
    cl, ctx, _ = pocl
    src = ci.combined_program(gpu.sources)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # pyopencl's CompilerWarning on a non-empty build log
        try:
            prog = cl.Program(ctx, src).build()
        except cl.RuntimeError as e:
            bad = _failing_programs(cl, ctx, gpu.sources)
            raise AssertionError(f"{gpu.name}: PoCL rejects the generated OpenCL; failing kernels: "
                                 f"{bad or '(only the combined program)'}\n{str(e)[:3000]}") from e
    return prog, time.perf_counter() - t0


def _failing_programs(cl, ctx, sources: dict[str, str]) -> dict[str, str]:
    bad = {}
    for name, src in sources.items():
        try:
            cl.Program(ctx, src).build()
        except cl.RuntimeError as e:
            bad[name] = str(e)[-400:]
    return bad


def test_gpu_opencl_compiles_on_pocl(gpu, pocl, pocl_program):
    cl, ctx, _ = pocl
    prog, secs = pocl_program
    names = set(prog.get_info(cl.program_info.KERNEL_NAMES).split(";"))
    missing = sorted(set(gpu.sources) - names)
    assert not missing, f"{gpu.name}: kernels missing from the PoCL program: {missing[:8]}"
    print(f"\n{gpu.name}: PoCL compiled {len(names)} kernels in one program ({secs:.1f}s)")
    if ALL:   # each per-kernel program exactly as TVM generated it
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bad = _failing_programs(cl, ctx, gpu.sources)
        assert not bad, f"{gpu.name}: per-kernel programs PoCL rejects: {bad}"
        print(f"{gpu.name}: all {len(gpu.sources)} per-kernel programs compile "
              f"({time.perf_counter() - t0:.1f}s)")


def _variant(key: str) -> tuple:
    """The schedule-relevant identity of a kernel: builder + options, without shapes or salts."""
    builder, rest = key.split("(", 1)
    _args, kw = ast.literal_eval("(" + rest)
    return builder, tuple((k, v) for k, v in kw if k not in ("salt", "eps"))


def _selected(gpu: GpuStage) -> list[str]:
    if ALL:
        return sorted(gpu.kernels)
    seen, out = set(), []
    for name, key in gpu.our_kernels.items():   # in emission order: first of each variant
        v = _variant(key)
        if v not in seen and name in gpu.kernels:
            seen.add(v)
            out.append(name)
    return out


def _inputs(gk: ci.GpuKernel, rng) -> dict[str, np.ndarray]:
    ins = {}
    for name, shape, dtype in gk.params:
        if name in gk.outputs:
            continue
        if name == "seed":            # (seed, dropout on): runs the int64 mask hash on the device
            ins[name] = np.array([20261122, 1], np.int64)[: shape[0]]
        elif name == "mask":          # attention padding mask: last 5 keys of the last row padded
            mk = np.ones(shape, dtype)
            mk[-1, -5:] = 0
            ins[name] = mk
        elif dtype.startswith("int"):
            ins[name] = rng.integers(0, 2, shape).astype(dtype)
        elif name in ("v", "hyper", "rstd"):   # AdamW second moment / hyper-params, 1/std: positive
            ins[name] = rng.uniform(0.1, 1.0, shape).astype(dtype)
        else:
            ins[name] = rng.standard_normal(shape).astype(dtype)
    return ins


def _run_cpu(ref, gk: ci.GpuKernel, ins) -> dict[str, np.ndarray]:
    args = [tvm.runtime.tensor(np.ascontiguousarray(ins[n]) if n in ins else np.zeros(s, d))
            for n, s, d in gk.params]
    ref[gk.name](*args)
    return {n: a.numpy() for (n, _, _), a in zip(gk.params, args, strict=True) if n in gk.outputs}


def test_gpu_kernels_match_cpu_on_pocl(gpu, pocl, pocl_program):
    cl, ctx, queue = pocl
    prog, _ = pocl_program
    names = _selected(gpu)
    kinds = {n.split("_", 1)[-1] for n in names}   # "k3_layernorm_fwd" -> "layernorm_fwd"
    for need in ("gemm", "layernorm_fwd", "attention_fwd"):
        assert need in kinds, f"{gpu.name}: no {need} kernel selected from {names}"
    # Reference: the same PrimFuncs before dlight (LegalizeOps output), compiled for the host CPU.
    host = get_arch("host")
    ref = tvm.compile(tvm.IRModule({n: gpu.build.legalized[n].with_attr("global_symbol", n)
                                    for n in names}), target=host.tvm_target())
    rng = np.random.default_rng(0)
    report, failures = [], []
    for name in names:
        gk = gpu.kernels[name]
        ins = _inputs(gk, rng)
        want = _run_cpu(ref, gk, ins)
        t0 = time.perf_counter()
        try:
            got = run_pocl(cl, ctx, queue, prog, gk, ins)
        except Exception as e:  # noqa: BLE001 - report every kernel, then fail
            failures.append(f"{name}: could not run on PoCL: {type(e).__name__}: {e}")
            continue
        secs = time.perf_counter() - t0
        errs = []
        for out, w in want.items():
            g_ = got[out]
            scale = float(np.max(np.abs(w)))
            err = float(np.max(np.abs(g_.astype(np.float64) - w)))
            errs.append(f"{out} {err:.1e}/{scale:.1e}")
            if not (np.all(np.isfinite(w)) and np.all(np.isfinite(g_))):
                failures.append(f"{name}.{out}: non-finite values")
            elif scale == 0.0:
                failures.append(f"{name}.{out}: the CPU reference is all zeros (useless input)")
            elif err > REL_TOL * max(1.0, scale):
                failures.append(f"{name}.{out}: max|pocl-cpu| {err:.2e} > "
                                f"{REL_TOL:g} x {max(1.0, scale):.1f}")
        launches = " ".join(f"{L.grid}x{L.block}" for L in gk.launches)
        report.append(f"  {name:20s} {len(gk.launches)} launch(es) {launches[:60]:60s} "
                      f"{secs * 1e3:6.0f} ms  " + ", ".join(errs))
    print(f"\n{gpu.name}: {len(names)} PrimFuncs run on PoCL vs host LLVM "
          f"(max abs err / max abs value):\n"
          + "\n".join(report))
    assert not failures, f"{gpu.name}:\n" + "\n".join(failures)
