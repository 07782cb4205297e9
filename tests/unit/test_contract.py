"""edgert/contract.py: the names and layouts the compiler, the boards and the controller share."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgert import contract as C
from edgert.artifact import Manifest


@pytest.mark.parametrize("dtype", sorted(C.DTYPES))
@pytest.mark.parametrize("shape", [(), (0, 5), (3,), (2, 3, 4)])
def test_tensor_meta_nbytes_is_numpys(dtype, shape):
    assert C.TensorMeta("t", shape, dtype).nbytes == np.empty(shape, dtype).nbytes


def test_manifest_json_keeps_name_shape_dtype():
    meta = C.TensorMeta("hidden", (8, 384), "float32")
    m = Manifest("m", "", {}, {"index": 0, "num_stages": 1}, {}, "", "", "float32",
                 (meta,), (), (), (), ())
    d = json.loads(m.to_json())["data_inputs"][0]
    assert list(d) == ["name", "shape", "dtype"] and C.TensorMeta.from_dict(d) == meta
    assert Manifest.from_json(m.to_json()).data_inputs == (meta,)


def test_adamw_hyper_is_laid_out_as_HYPER():
    h = C.adamw_hyper(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=3,
                      grad_scale=0.5)
    named = dict(zip(C.HYPER, h.tolist(), strict=True))
    assert h.dtype == np.float64 and len(h) == len(C.HYPER) == 8
    assert named == {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01,
                     "bias_correction1": 1 - 0.9 ** 3, "bias_correction2": 1 - 0.999 ** 3,
                     "grad_scale": 0.5}


def test_seed_vector_and_step_seeds():
    assert C.seed_vec(7, True).tolist() == [7, 1] and C.seed_vec(7, False).tolist() == [7, 0]
    assert C.seed_vec(7, True).dtype == C.SEED_DTYPE and C.seed_vec(7, True).shape == C.SEED_SHAPE
    seeds = {C.step_seed(0, s, mb) for s in range(1, 50) for mb in range(4)}
    assert len(seeds) == 196 and all(0 < x < 2**31 for x in seeds)   # distinct, positive int32
    assert C.step_seed(3, 5, 1) == C.step_seed(3, 5, 1) != C.step_seed(4, 5, 1)


def test_footprint_counts_trained_params_four_times():
    assert C.footprint_bytes(params=100, trained=60, saved_per_mb=10, in_flight=3) == 100 + 180 + 30
    assert C.kernel_name("fwd", 0, 12) == "attn_fwd_0_12"
    assert C.AttnShape(8, 128, 12, 32).M == 1024
