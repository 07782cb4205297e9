"""compiler.kernels.gemm against a float64 numpy reference (host CPU), plus arm64/GPU build checks.

Tolerances: float32 results must match to ||C - ref|| / ||ref|| <= 1e-5 and max|C - ref| <=
3e-5 * max|ref| (inputs ~N(0,1), K <= 384: float32 rounding of a K-term sum is ~1e-6 relative);
float64 builds (used by finite-difference checks) to 1e-12.
"""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
import tvm

from compiler.arch import get_arch
from compiler.kernels.gemm import build_gemm, config_space, default_config

HOST = get_arch("host")
TOL = {"float32": (1e-5, 3e-5), "float64": (1e-12, 1e-12)}


def _erf(x):
    return np.vectorize(math.erf)(x)


def _reference(ins, M, N, K, ta, tb, bias, epilogue):
    a, b = (x.astype(np.float64) for x in ins[:2])
    acc = (np.swapaxes(a, -1, -2) if ta else a) @ (np.swapaxes(b, -1, -2) if tb else b)
    rest = [x.astype(np.float64) for x in ins[2:]]
    if bias:
        acc = acc + rest.pop(0)
    if epilogue == "gelu":
        return acc * 0.5 * (1.0 + _erf(acc / math.sqrt(2.0)))
    if epilogue == "gelu_grad":
        u = rest[0]
        return acc * (0.5 * (1.0 + _erf(u / math.sqrt(2.0))) + u * np.exp(-0.5 * u * u) / math.sqrt(2 * math.pi))
    if epilogue == "add":
        return acc + rest[0]
    return acc


def _run(M, N, K, *, ta=False, tb=False, batch=(), bias=False, epilogue=None, dtype="float32", config=None,
         seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((*batch, *((K, M) if ta else (M, K)))).astype(dtype)
    b = rng.standard_normal((*batch, *((N, K) if tb else (K, N)))).astype(dtype)
    ins = [a, b]
    if bias:
        ins.append(rng.standard_normal(N).astype(dtype))
    if epilogue in ("gelu_grad", "add"):
        ins.append(rng.standard_normal((*batch, M, N)).astype(dtype))
    f = build_gemm(M, N, K, trans_a=ta, trans_b=tb, batch=batch, dtype=dtype, arch=HOST, config=config,
                   bias=bias, epilogue=epilogue)
    assert len(f.params) == len(ins) + 1
    lib = tvm.compile(f, target=HOST.tvm_target())
    out = tvm.runtime.tensor(np.full((*batch, M, N), np.nan, dtype))
    lib["main"](*[tvm.runtime.tensor(x) for x in ins], out)
    got, ref = out.numpy().astype(np.float64), _reference(ins, M, N, K, ta, tb, bias, epilogue)
    rel_norm, rel_max = TOL[dtype]
    assert np.isfinite(got).all()
    assert np.linalg.norm(got - ref) <= rel_norm * np.linalg.norm(ref)
    assert np.abs(got - ref).max() <= rel_max * np.abs(ref).max()
    return got


LAYOUTS = [(False, False), (False, True), (True, False), (True, True)]


@pytest.mark.parametrize("ta,tb", LAYOUTS)
@pytest.mark.parametrize("bias,epilogue", [(False, None), (True, None), (True, "gelu"), (False, "gelu_grad"),
                                           (False, "add"), (True, "add")])
def test_layouts_and_epilogues(ta, tb, bias, epilogue):
    # 40 x 72 x 56: M not a multiple of 12/14, N not a multiple of 48 -> padded tiles
    _run(40, 72, 56, ta=ta, tb=tb, bias=bias, epilogue=epilogue)


@pytest.mark.parametrize("M,N,K,ta,tb", [
    (8, 2, 384, False, True),     # classifier
    (8, 384, 384, False, True),   # pooler
    (2, 384, 8, True, False),     # classifier dW (dY^T X), N=384 / K=8
    (8, 384, 2, False, False),    # classifier dX (dY W)
    (1, 1, 1, False, False),
    (37, 53, 29, False, False),   # primes everywhere
    (37, 53, 29, True, True),
    (13, 17, 1000, False, True),  # long K, tiny tile
])
def test_odd_shapes(M, N, K, ta, tb):
    _run(M, N, K, ta=ta, tb=tb, bias=True)


def test_minilm_shape_nt_gelu():
    _run(1024, 1536, 384, tb=True, bias=True, epilogue="gelu")


def test_minilm_shape_tn():
    _run(384, 384, 1024, ta=True)


@pytest.mark.parametrize("batch,M,N,K,tb", [((6,), 128, 128, 32, True), ((2, 3), 128, 32, 128, False)])
def test_batched(batch, M, N, K, tb):
    _run(M, N, K, tb=tb, batch=batch)


@pytest.mark.parametrize("ta,tb,epilogue", [(False, True, "gelu"), (False, False, "gelu_grad"), (True, False, "add"),
                                            (True, True, None)])
def test_float64(ta, tb, epilogue):
    _run(24, 40, 33, ta=ta, tb=tb, bias=epilogue != "gelu_grad", epilogue=epilogue, dtype="float64")


def test_every_config_space_candidate_is_correct():
    M, N, K = 50, 96, 40
    space = config_space(M, N, K, trans_b=True, arch=HOST)
    assert 4 <= len(space) <= 40
    assert space[0] == default_config(M, N, K, trans_b=True, arch=HOST)
    for cfg in space[:: max(1, len(space) // 8)]:
        _run(M, N, K, tb=True, bias=True, config=cfg)


def test_default_configs_fit_registers():
    for (M, N, K), ta, tb in itertools.product([(1024, 1152, 384), (1536, 384, 1024), (8, 2, 384)], [False, True],
                                               [False, True]):
        c = default_config(M, N, K, trans_a=ta, trans_b=tb, arch=HOST)
        assert c["mr"] * c["nr"] + c["nr"] + 1 <= 32
        assert tb <= c["pack_b"]


def test_host_inner_loop_uses_zmm_fma():
    if HOST.vector_bits != 512:
        pytest.skip("AVX-512 host only")
    f = build_gemm(64, 96, 64, trans_b=True, arch=HOST)
    asm = tvm.compile(f, target=HOST.tvm_target()).mod.inspect_source("asm")
    assert len(re.findall(r"vfmadd231ps\s+[^\n]*%zmm", asm)) >= 24
    assert "expf" not in asm


def test_arm64_builds_with_neon_fmla():
    arm = get_arch("arm64")
    f = build_gemm(64, 48, 32, trans_b=True, arch=arm, bias=True, epilogue="gelu")
    asm = tvm.compile(f, target=arm.tvm_target()).mod.inspect_source("asm")
    assert len(re.findall(r"fmla\s+v\d+\.4s", asm)) >= 12


def test_gpu_returns_unscheduled_compute():
    f = build_gemm(64, 48, 32, trans_b=True, arch=get_arch("mali"), bias=True, epilogue="gelu")
    text = f.script()
    assert "T.parallel" not in text and "T.vectorized" not in text
    assert [p.name for p in f.params] == ["A", "B", "bias", "C"]
