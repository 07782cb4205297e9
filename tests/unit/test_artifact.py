"""Bundle manifest: round trip, hash verification and machine checks (no TVM needed)."""

from __future__ import annotations

import json
import platform

import pytest

from edgert.artifact import (
    FORMAT_VERSION, LIB_FILE, MANIFEST_FILE, PARAMS_FILE, Manifest, TensorMeta, load_manifest, sha256_file,
)
from edgert.errors import ArtifactError


def _bundle(tmp_path, **target):
    (tmp_path / LIB_FILE).write_bytes(b"lib" * 100)
    (tmp_path / PARAMS_FILE).write_bytes(b"params" * 100)
    tgt = {"preset": "host", "kind": "cpu", "elf_machine": platform.machine(), "cpu_flags": []}
    tgt.update(target)
    m = Manifest(
        model_id="m", checkpoint_sha256="0" * 64, dims={"hidden": 8}, stage={"index": 0, "num_stages": 1},
        target=tgt, tvm_version="", compiler_hash="x", dtype="float32",
        data_inputs=(TensorMeta("input_ids", (2, 4), "int64"),), outputs=(TensorMeta("loss", (1,), "float32"),),
        saved=(), params=(TensorMeta("w", (3, 8), "float32"),), entries=("stage_forward",),
        files={n: sha256_file(tmp_path / n) for n in (LIB_FILE, PARAMS_FILE)})
    (tmp_path / MANIFEST_FILE).write_text(m.to_json())
    return m


def test_roundtrip(tmp_path):
    m = _bundle(tmp_path)
    assert load_manifest(tmp_path) == m
    assert m.params[0].nbytes == 96 and m.is_first and m.is_last


def test_changed_file_is_refused(tmp_path):
    _bundle(tmp_path)
    with open(tmp_path / PARAMS_FILE, "r+b") as f:
        f.write(b"X")
    with pytest.raises(ArtifactError, match="params.safetensors has changed.*recompile or re-deploy"):
        load_manifest(tmp_path)


def test_missing_file_and_missing_manifest(tmp_path):
    _bundle(tmp_path)
    (tmp_path / LIB_FILE).unlink()
    with pytest.raises(ArtifactError, match="stage.so is missing"):
        load_manifest(tmp_path)
    with pytest.raises(ArtifactError, match="not a stage bundle.*edgert compile"):
        load_manifest(tmp_path / "nowhere")


def test_wrong_architecture_is_refused(tmp_path):
    other = "aarch64" if platform.machine() != "aarch64" else "x86_64"
    _bundle(tmp_path, elf_machine=other, preset="arm64")
    with pytest.raises(ArtifactError, match=f"compiled for {other}.*this machine is"):
        load_manifest(tmp_path)


def test_gpu_bundle_needs_opencl_runtime(tmp_path):
    _bundle(tmp_path, kind="gpu", preset="mali")
    with pytest.raises(ArtifactError, match="OpenCL.*USE_OPENCL=OFF"):
        load_manifest(tmp_path)


def test_missing_cpu_feature_is_refused(tmp_path):
    if platform.machine() != "x86_64":
        pytest.skip("x86 feature check")
    _bundle(tmp_path, cpu_flags=["avx512_imaginary"])
    with pytest.raises(ArtifactError, match="avx512_imaginary"):
        load_manifest(tmp_path)


def test_bad_json_and_future_format(tmp_path):
    _bundle(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ArtifactError, match="not a valid stage manifest"):
        load_manifest(tmp_path)
    d = json.loads(_bundle(tmp_path).to_json())
    d["format_version"] = FORMAT_VERSION + 1
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(d))
    with pytest.raises(ArtifactError, match="recompile"):
        load_manifest(tmp_path)
