"""Run checkpoints: round trip, atomic writes, pruning, and falling back from a corrupt one."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from control import checkpoint as ckpt
from edgert.errors import ConfigError


def _state(seed: int):
    rng = np.random.default_rng(seed)
    params = {"a.weight": rng.standard_normal((4, 3)).astype(np.float32),
              "b.bias": rng.standard_normal(5).astype(np.float32),
              "frozen": rng.standard_normal(2).astype(np.float32)}
    opt = {f"{k}/{n}": rng.standard_normal(params[n].shape).astype(np.float32)
           for k in ("m", "v") for n in ("a.weight", "b.bias")}       # "frozen" has no moments
    return params, opt


STAGES = [["a.weight"], ["b.bias", "frozen"]]


def test_round_trip_and_meta(tmp_path):
    params, opt = _state(0)
    c = ckpt.write(tmp_path, 4, STAGES, params, opt, {"data": {"position": 8}})
    assert c.path.name == "step-4" and c.step == 4 and c.meta["data"]["position"] == 8
    got_p, got_o = ckpt.verify(c.path).load()
    assert got_p.keys() == params.keys() and got_o.keys() == opt.keys()
    for k, v in {**params, **opt}.items():
        np.testing.assert_array_equal({**got_p, **got_o}[k], v)
    assert set(c.meta["files"]) == {"stage0.safetensors", "stage1.safetensors"}


def test_keeps_the_newest_and_clears_stale_temp_dirs(tmp_path):
    (tmp_path / ".tmp-step-9-1").mkdir()          # what a crash mid-write leaves
    for s in (2, 4, 6):
        ckpt.write(tmp_path, s, STAGES, *_state(s), {}, keep=2)
    assert ckpt.list_steps(tmp_path) == [4, 6]
    assert not list(tmp_path.glob(".tmp-*"))
    with pytest.raises(ConfigError, match="keep"):
        ckpt.write(tmp_path, 8, STAGES, *_state(8), {}, keep=0)


@pytest.mark.parametrize("damage", ["truncate", "flip", "meta"])
def test_corrupt_newest_falls_back_to_previous_with_a_warning(tmp_path, caplog, damage):
    ckpt.write(tmp_path, 2, STAGES, *_state(2), {})
    ckpt.write(tmp_path, 4, STAGES, *_state(4), {})
    f = tmp_path / "step-4" / "stage1.safetensors"
    data = bytearray(f.read_bytes())
    if damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        data[-3] ^= 0xFF
        f.write_bytes(bytes(data))
    else:
        (tmp_path / "step-4" / "meta.json").write_text("{")
    warnings: list[str] = []
    with caplog.at_level(logging.WARNING, logger="control.checkpoint"):
        c = ckpt.latest(tmp_path, warn=warnings.append)
    assert c is not None and c.step == 2
    assert len(warnings) == 1 and "step-4" in warnings[0] and "falling back" in warnings[0]
    want = {"truncate": "truncated", "flip": "sha256", "meta": "meta.json"}[damage]
    assert want in warnings[0] and want in caplog.text
    np.testing.assert_array_equal(c.load()[0]["b.bias"], _state(2)[0]["b.bias"])


def test_no_valid_checkpoint(tmp_path):
    assert ckpt.latest(tmp_path / "missing") is None
    ckpt.write(tmp_path, 1, STAGES, *_state(1), {})
    (tmp_path / "step-1" / "stage0.safetensors").unlink()
    assert ckpt.latest(tmp_path) is None
