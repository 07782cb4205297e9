"""edgert.runtime.read_params: tensor-by-tensor safetensors reading into aligned arrays.

The reference is the `safetensors` package's own writer and reader.
"""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from edgert.artifact import TensorMeta
from edgert.errors import ArtifactError
from edgert.runtime import read_params


def _write(tmp_path):
    rng = np.random.default_rng(0)
    # odd sizes put most tensors at offsets that are not multiples of 64 in the file
    arrays = {"a.weight": rng.standard_normal((7, 5)).astype(np.float32),
              "b.bias": rng.standard_normal(3).astype(np.float32),
              "c.table": rng.standard_normal((11, 13)).astype(np.float32),
              "d.ids": np.arange(6, dtype=np.int64).reshape(2, 3)}
    path = tmp_path / "params.safetensors"
    save_file(arrays, str(path))
    return path, arrays


def _metas(arrays, order):
    return [TensorMeta(n, tuple(arrays[n].shape), arrays[n].dtype.name) for n in order]


def test_reads_every_tensor_aligned_and_equal(tmp_path):
    path, arrays = _write(tmp_path)
    ref = load_file(str(path))
    order = ["c.table", "a.weight", "d.ids", "b.bias"]     # any order, a manifest's
    got = read_params(path, _metas(arrays, order))
    for name, a in zip(order, got, strict=True):
        np.testing.assert_array_equal(a, ref[name])
        assert a.dtype == ref[name].dtype and a.flags.c_contiguous and a.flags.writeable
        assert a.ctypes.data % 64 == 0, name            # TVM kernels need 64-byte alignment


def test_subset_and_errors(tmp_path):
    path, arrays = _write(tmp_path)
    (b,) = read_params(path, _metas(arrays, ["b.bias"]))
    np.testing.assert_array_equal(b, arrays["b.bias"])
    with pytest.raises(ArtifactError, match="tensor x.y missing"):
        read_params(path, [TensorMeta("x.y", (3,), "float32")])
    with pytest.raises(ArtifactError, match="a.weight missing or of shape"):
        read_params(path, [TensorMeta("a.weight", (5, 7), "float32")])
    with pytest.raises(ArtifactError, match="b.bias is F32, the manifest says float64"):
        read_params(path, [TensorMeta("b.bias", (3,), "float64")])
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-20])                          # the last tensor's tail is gone
    with pytest.raises(ArtifactError, match="truncated.*re-deploy the bundle"):
        read_params(cut, _metas(arrays, list(arrays)))
    cut.write_bytes(b"\x05\x00")
    with pytest.raises(ArtifactError, match="no safetensors header"):
        read_params(cut, _metas(arrays, ["b.bias"]))
