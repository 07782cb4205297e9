"""Reassembler(spool_dir=...): uploads written chunk by chunk to disk (board memory), same checks."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from edgert.errors import ProtocolError
from edgert.deploy import Reassembler, chunk_file
from edgert.protocol import Message, decode, encode


def _feed(r: Reassembler, msgs: list[Message]):
    out = None
    for m in msgs:
        out = r.feed(decode([bytes(f) for f in encode(m)]))
    return out


@pytest.fixture
def src(tmp_path):
    p = tmp_path / "params.safetensors"
    p.write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    return p


def test_spooled_upload_equals_the_file_and_holds_no_copy(src, tmp_path):
    spool = tmp_path / "board"
    r = Reassembler(spool_dir=spool)
    msgs = list(chunk_file(src, 1024, name="fwd/params.safetensors"))
    assert _feed(r, msgs[:3]) is None
    part = spool / "fwd" / "params.safetensors.part"
    assert part.stat().st_size == 2048                 # written as the chunks arrive
    f = _feed(r, msgs[3:])
    assert f.data == b"" and f.path == part
    assert part.read_bytes() == src.read_bytes()
    assert f.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()


def test_failed_or_abandoned_spool_leaves_no_part_file(src, tmp_path):
    spool = tmp_path / "board"
    r = Reassembler(spool_dir=spool)
    msgs = list(chunk_file(src, 1024))
    bad = bytearray(msgs[2].buffers[0])
    bad[0] ^= 0xFF
    with pytest.raises(ProtocolError, match="fails its sha256"):
        _feed(r, [*msgs[:2], Message(msgs[2].header, (memoryview(bad),))])
    assert not (spool / "params.safetensors.part").exists() and r.in_progress is None
    _feed(r, msgs[:2])                                   # a new BEGIN abandons this one
    _feed(r, msgs[:1])
    assert (spool / "params.safetensors.part").stat().st_size == 0
    with pytest.raises(ProtocolError, match="got 1/5 chunks"):
        _feed(r, [msgs[1], msgs[-1]])
    assert not (spool / "params.safetensors.part").exists()
    assert _feed(r, msgs).path.read_bytes() == src.read_bytes()
