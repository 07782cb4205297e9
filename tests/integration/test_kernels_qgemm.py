"""Quantized-weight kernels (compiler/kernels/qgemm.py, qembed.py) vs float64 references computed
from the same blocks dequantized by compiler/gguf.py's decoders (not by the kernel's own code).

* Host: forward ``X W^T`` (+bias, GELU, residual add) and data gradient ``dY W`` (+GELU-gradient,
  add) for Q8_0 and Q4_1, on shapes that are not multiples of the tile, the MiniLM and SmolLM2
  projection shapes at the edge micro-batch (2 x 32 = 64 rows), 1024 rows (8 x 128), the SmolLM2
  head (a 4096-row vocabulary slice forward, the whole 49152-row reduction backward: split in
  chunks), batched, float64 builds. Tolerance as tests/integration/test_kernels_gemm.py:
  ||C - ref|| / ||ref|| <= 1e-5 and max|C - ref| <= 3e-5 max|ref| (float32; observed: 3.5e-7 at
  64 x 1152 x 384 up to 1.0e-6 at K = 3072 and 1.2e-6 for the 49152-long head reduction, i.e.
  float32 rounding of the sums, as the float GEMM's); float64 builds 1e-12.
* Exactness: with X = I the kernels return the dequantized weights bit for bit, including blocks
  whose fp16 scale or min is subnormal or zero.
* arm64: the kernels build with NEON FMAs and, run under qemu-aarch64 with TVM's aarch64 runtime
  (the emulated board's root filesystem), give the float64 reference's values (same tolerance).
* OpenCL (Mali, Adreno): the unscheduled kernels compile through the stage GPU pipeline (dlight)
  into OpenCL, which PoCL builds and runs to the same tolerance.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess

import numpy as np
import pytest
import tvm

from compiler import quant as Q
from compiler.arch import get_arch
from compiler.gguf import dequantize as gguf_dequantize
from compiler.kernels.qembed import build_qembed_fwd, build_qtok_embed_fwd
from compiler.kernels.qgemm import build_qgemm, config_space, default_config

HOST = get_arch("host")
TOL = {"float32": (1e-5, 3e-5), "float64": (1e-12, 1e-12)}
FMTS = ("q8_0", "q4_1")


def _erf(x):
    return np.vectorize(math.erf)(x)


def weight(shape, fmt, seed=0, special=True):
    """Blocks of N(0, 1) weights; with `special` (and more than one row), row 0 holds a zero
    block, a block whose fp16 scale (and Q4_1 min) is subnormal, and a constant block (Q4_1
    d = 0)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    r = w.reshape(-1, shape[-1])
    if special and r.shape[0] > 1:
        r[0, :32] = 0.0
        if shape[-1] >= 64:
            r[0, 32:64] *= 1e-5
        if shape[-1] >= 96:
            r[0, 64:96] = -0.25
    blocks = Q.quantize(w, fmt)
    deq = gguf_dequantize(blocks.reshape(-1), Q.GGUF_NAMES[fmt], shape)
    return blocks, deq.astype(np.float64)


def reference(a, wd, trans_b, bias=None, epilogue=None, extra=None):
    acc = a.astype(np.float64) @ (np.swapaxes(wd, -1, -2) if trans_b else wd)
    if bias is not None:
        acc = acc + bias
    if epilogue == "gelu":
        return acc * 0.5 * (1.0 + _erf(acc / math.sqrt(2.0)))
    if epilogue == "gelu_grad":
        u = extra.astype(np.float64)
        return acc * (0.5 * (1.0 + _erf(u / math.sqrt(2.0)))
                      + u * np.exp(-0.5 * u * u) / math.sqrt(2 * math.pi))
    if epilogue == "add":
        return acc + extra
    return acc


def case(M, N, K, fmt, trans_b, *, bias=False, epilogue=None, batch=(), dtype="float32", seed=0):
    """(inputs in PrimFunc order, float64 reference) of one qgemm call."""
    rng = np.random.default_rng(seed + 1)
    blocks, wd = weight((*batch, N, K) if trans_b else (*batch, K, N), fmt, seed)
    a = rng.standard_normal((*batch, M, K)).astype(dtype)
    ins = [a, blocks]
    b = rng.standard_normal(N).astype(dtype) if bias else None
    if bias:
        ins.append(b)
    extra = None
    if epilogue in ("gelu_grad", "add"):
        extra = rng.standard_normal((*batch, M, N)).astype(dtype)
        ins.append(extra)
    return ins, reference(a, wd, trans_b, b, epilogue, extra)


def check(got, ref, dtype="float32") -> float:
    rel_norm, rel_max = TOL[dtype]
    got = got.astype(np.float64)
    assert np.isfinite(got).all()
    err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    assert err <= rel_norm, err
    assert np.abs(got - ref).max() <= rel_max * np.abs(ref).max()
    return err


def run_host(f, ins, out_shape, dtype="float32"):
    lib = tvm.compile(f, target=HOST.tvm_target())
    out = tvm.runtime.tensor(np.full(out_shape, np.nan, dtype))
    lib["main"](*[tvm.runtime.tensor(x) for x in ins], out)
    return out.numpy()


def _run(M, N, K, fmt, trans_b, *, batch=(), dtype="float32", config=None, **kw):
    ins, ref = case(M, N, K, fmt, trans_b, batch=batch, dtype=dtype, **kw)
    f = build_qgemm(M, N, K, fmt=fmt, trans_b=trans_b, batch=batch, dtype=dtype, arch=HOST,
                    config=config, **kw)
    assert len(f.params) == len(ins) + 1
    return check(run_host(f, ins, (*batch, M, N), dtype), ref, dtype)


# ---- host ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("bias,epilogue", [(False, None), (True, None), (True, "gelu"),
                                           (False, "add"), (True, "add")])
def test_forward_padded_tiles_and_epilogues(fmt, bias, epilogue):
    # 40 x 72 x 96: M and N not multiples of the register tile (padded, clamped reads)
    _run(40, 72, 96, fmt, True, bias=bias, epilogue=epilogue)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("epilogue", [None, "gelu_grad", "add"])
def test_data_gradient_padded_tiles_and_epilogues(fmt, epilogue):
    _run(40, 96, 72, fmt, False, epilogue=epilogue)   # K = 72: any length, N in whole blocks


@pytest.mark.parametrize("M,N,K,tb,kw,fmt", [
    (37, 53, 64, True, {"bias": True}, "q8_0"),     # primes
    (37, 53, 64, True, {"bias": True}, "q4_1"),
    (37, 64, 53, False, {}, "q8_0"),
    (37, 64, 53, False, {}, "q4_1"),
    (1, 32, 32, True, {}, "q4_1"),
    (1, 32, 1, False, {}, "q8_0"),
    (13, 17, 1024, True, {}, "q4_1"),                # long K, tiny M
])
def test_odd_shapes(fmt, M, N, K, tb, kw):
    _run(M, N, K, fmt, tb, **kw)


# (M, N, K, trans_b, options): a layer's forward GEMMs, then its data-gradient GEMMs
MINILM = [(64, 1152, 384, True, {"bias": True}), (64, 384, 384, True, {"bias": True}),
          (64, 1536, 384, True, {"bias": True}), (64, 384, 1536, True, {"bias": True}),
          (64, 384, 1152, False, {}), (64, 384, 384, False, {}),
          (64, 1536, 384, False, {"epilogue": "gelu_grad"}),
          (64, 384, 1536, False, {"epilogue": "add"})]
SMOLLM2 = [(64, 960, 576, True, {}), (64, 576, 576, True, {}), (64, 3072, 576, True, {}),
           (64, 576, 1536, True, {"epilogue": "add"}),
           (64, 576, 960, False, {}), (64, 576, 576, False, {}), (64, 576, 3072, False, {}),
           (64, 1536, 576, False, {})]


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("M,N,K,tb,kw", MINILM)
def test_minilm_shapes(fmt, M, N, K, tb, kw):
    _run(M, N, K, fmt, tb, **kw)


@pytest.mark.parametrize("M,N,K,tb,kw", SMOLLM2)
def test_smollm2_shapes_q4_1(M, N, K, tb, kw):
    _run(M, N, K, "q4_1", tb, **kw)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("tb", [True, False])
def test_1024_rows(fmt, tb):
    _run(1024, 1152, 384, fmt, True) if tb else _run(1024, 384, 1152, fmt, False)


def test_smollm2_head_slice_forward_q8_0():
    _run(64, 4096, 576, "q8_0", True)


def test_smollm2_frozen_head_data_gradient_q8_0():
    """dhidden = dlogits W over the whole vocabulary: the reduction is split into chunks."""
    assert default_config(64, 576, 49152, trans_b=False, arch=HOST)["ks"] == 12
    _run(64, 576, 49152, "q8_0", False)


@pytest.mark.parametrize("fmt", FMTS)
def test_batched_and_split_reduction(fmt):
    _run(40, 72, 96, fmt, True, batch=(3,), bias=True)
    _run(40, 64, 96, fmt, False, batch=(2,), epilogue="add", config={"ks": 3})
    _run(40, 64, 96, fmt, True, config={"ks": 3})


@pytest.mark.parametrize("fmt", FMTS)
def test_float64_builds(fmt):
    _run(24, 40, 64, fmt, True, dtype="float64", bias=True, epilogue="gelu")
    _run(24, 64, 40, fmt, False, dtype="float64", epilogue="gelu_grad")


@pytest.mark.parametrize("fmt", FMTS)
def test_identity_input_reproduces_the_dequantized_weights_exactly(fmt):
    """X = I: every output is 1.0 * w (+ exact zeros), so the kernel must return gguf.dequantize's
    values bit for bit, whatever the scale: normal, subnormal (1e-5 weights) or zero."""
    N, K = 40, 96
    blocks, wd = weight((N, K), fmt)
    assert (np.abs(wd[0, 32:64]) < 6.2e-5).all() and wd[0, 32:64].any()   # subnormal fp16 scale
    got = run_host(build_qgemm(K, N, K, fmt=fmt, trans_b=True, arch=HOST),
                   [np.eye(K, dtype=np.float32), blocks], (K, N))
    assert np.array_equal(got, wd.T.astype(np.float32))
    got = run_host(build_qgemm(N, K, N, fmt=fmt, trans_b=False, arch=HOST),
                   [np.eye(N, dtype=np.float32), blocks], (N, K))
    assert np.array_equal(got, wd.astype(np.float32))


def test_every_config_space_candidate_is_correct():
    M, N, K = 50, 96, 64
    space = config_space(M, N, K, trans_b=True, arch=HOST)
    assert space[0] == default_config(M, N, K, trans_b=True, arch=HOST)
    for cfg in space[:: max(1, len(space) // 4)]:
        _run(M, N, K, "q4_1", True, config=cfg, bias=True)
        _run(M, K, N, "q8_0", False, config=cfg)


@pytest.mark.parametrize("fmt", FMTS)
def test_embedding_gathers(fmt):
    B, T, V, D, P, NT = 2, 16, 300, 96, 40, 2
    rng = np.random.default_rng(5)
    blocks, wd = weight((V, D), fmt)
    ids = rng.integers(0, V, (B, T)).astype(np.int64)
    ids[0, 0] = 0                                       # the row with the special blocks
    got = run_host(build_qtok_embed_fwd(B, T, V, D, fmt=fmt, arch=HOST), [ids, blocks], (B * T, D))
    assert np.array_equal(got, wd[ids.reshape(-1)].astype(np.float32))
    tt = rng.integers(0, NT, (B, T)).astype(np.int64)
    pos = rng.standard_normal((P, D)).astype(np.float32)
    typ = rng.standard_normal((NT, D)).astype(np.float32)
    got = run_host(build_qembed_fwd(B, T, V, D, P, NT, fmt=fmt, arch=HOST),
                   [ids, tt, blocks, pos, typ], (B * T, D))
    want = (wd.astype(np.float32)[ids] + pos[:T][None] + typ[tt]).reshape(B * T, D)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    bad = ids.copy()
    bad[1, 3] = V + 7                                   # out of vocabulary: clamped, no fault
    got = run_host(build_qtok_embed_fwd(B, T, V, D, fmt=fmt, arch=HOST), [bad, blocks], (B * T, D))
    assert np.array_equal(got[T + 3], wd[V - 1].astype(np.float32))


def test_host_kernel_uses_vector_fma():
    f = build_qgemm(64, 96, 64, fmt="q4_1", trans_b=True, arch=HOST, bias=True)
    asm = tvm.compile(f, target=HOST.tvm_target()).mod.inspect_source("asm")
    reg = "zmm" if HOST.vector_bits == 512 else "ymm"
    assert len(re.findall(rf"vfmadd\d+ps\s+[^\n]*%{reg}", asm)) >= 12


def test_bad_requests():
    with pytest.raises(ValueError, match="multiple of 32"):
        build_qgemm(8, 8, 40, fmt="q8_0", trans_b=True, arch=HOST)
    with pytest.raises(ValueError, match="block format"):
        build_qgemm(8, 8, 32, fmt="q5_0", trans_b=True, arch=HOST)


# ---- arm64 (NEON), run under qemu ----------------------------------------------------------------
ARM_CASES = [(64, 96, 64, "q8_0", True, {"bias": True}), (64, 96, 64, "q4_1", True, {}),
             (40, 64, 72, "q8_0", False, {"epilogue": "add"}), (40, 64, 72, "q4_1", False, {})]


@pytest.fixture(scope="module")
def arm64_libs(tmp_path_factory):
    arm = get_arch("arm64", threads=1)
    if not shutil.which(arm.cross_cc):
        pytest.skip(f"aarch64 cross toolchain absent ({arm.cross_cc})")
    d = tmp_path_factory.mktemp("qgemm_arm64")
    libs, cases, asm = [], {}, []
    for i, (M, N, K, fmt, tb, kw) in enumerate(ARM_CASES):
        f = build_qgemm(M, N, K, fmt=fmt, trans_b=tb, arch=arm, **kw)
        ex = tvm.compile(f, target=arm.tvm_target())
        asm.append(ex.mod.inspect_source("asm"))
        ex.export_library(str(d / f"k{i}.so"), cc=arm.cross_cc)
        libs.append(str(d / f"k{i}.so"))
        ins, ref = case(M, N, K, fmt, tb, **kw)
        cases.update({f"{i}/in{j}": x for j, x in enumerate(ins)})
        cases[f"{i}/out"] = np.zeros((M, N), np.float32)
        cases[f"{i}/ref"] = ref
    np.savez(d / "cases.npz", **cases)
    return d, libs, asm


def test_arm64_kernels_use_neon_fma(arm64_libs):
    _, _, asm = arm64_libs
    for i, a in enumerate(asm):
        assert len(re.findall(r"fmla\s+v\d+\.4s", a)) >= 8, ARM_CASES[i]


def test_arm64_kernels_match_reference_under_qemu(arm64_libs):
    from control.boards import arm64_rootfs, qemu_command

    if shutil.which("qemu-aarch64-static") is None:
        pytest.skip("needs qemu-user-static (scripts/setup.sh installs it)")
    d, libs, _ = arm64_libs
    root = arm64_rootfs()
    cmd = qemu_command(root, ["python", "-m", "tests.kernel_runner", str(d / "cases.npz"),
                              str(d / "out.npz"), *libs])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    got, cases = np.load(d / "out.npz"), np.load(d / "cases.npz")
    errs = [check(got[str(i)], cases[f"{i}/ref"]) for i in range(len(libs))]
    print(f"\narm64 under qemu: relative errors {[f'{e:.1e}' for e in errs]}")


# ---- OpenCL (Mali / Adreno) through dlight, run on PoCL ------------------------------------------
def _gpu_module(f, n_alias: int):
    """A Relax function calling the kernel with W passed once per byte role."""
    from tvm import relax

    from compiler.stage import _tt

    p = f.params
    vs = [relax.Var(x.name, _tt(x.shape, str(x.dtype))) for x in p[:-1] if x.name[:2] != "Wd"
          and x.name[:2] != "Wm"]
    args = [a for v in vs for a in ([v] * n_alias if v.name == "W" else [v])]
    bb = relax.BlockBuilder()
    with bb.function("main", vs):
        with bb.dataflow():
            gv = bb.add_func(f, "qgemm")
            o = bb.emit_output(bb.emit(relax.call_tir(gv, args, _tt(p[-1].shape, "float32"))))
        bb.emit_func_output(o)
    return bb.get()


@pytest.mark.parametrize("gpu", ["mali", "adreno"])
def test_gpu_kernels_compile_to_opencl_and_match_on_pocl(gpu, tmp_path_factory):
    from compiler import build_inspect as ci
    from compiler.kernels.qgemm import gpu_aliases
    from tests.pocl_util import pocl_context, run_pocl

    arch = get_arch(gpu)
    cl, ctx, queue = pocl_context(tmp_path_factory.mktemp("pocl"))
    for fmt in FMTS:
        for M, N, K, tb, kw in [(24, 72, 64, True, {"bias": True}),
                                (24, 64, 72, False, {"epilogue": "add"})]:
            f = build_qgemm(M, N, K, fmt=fmt, trans_b=tb, arch=arch, **kw)
            assert "T.parallel" not in f.script() and len(f.params) == gpu_aliases(fmt) + 2 + 1
            b = ci.compile_with_schedule(_gpu_module(f, gpu_aliases(fmt)), arch)
            src = ci.opencl_sources(b.ex)
            assert src, f"{gpu} {fmt}: no OpenCL kernel (left on the host?)"
            kernels = ci.gpu_kernels(b.scheduled, src)
            prog = cl.Program(ctx, ci.combined_program(src)).build()
            ins, ref = case(M, N, K, fmt, tb, **kw)
            names = [x.name for x in f.params[:-1]]
            feed = dict(zip([n for n in names if n[:2] not in ("Wd", "Wm")], ins, strict=True))
            feed.update({n: feed["W"] for n in names if n[:2] in ("Wd", "Wm")})
            (gk,) = kernels.values()
            got = run_pocl(cl, ctx, queue, prog, gk, feed)
            check(got["C"], ref)
