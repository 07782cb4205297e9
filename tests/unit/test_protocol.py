"""Wire protocol: round trips, golden bytes, zero-copy, rejection of bad frames, chunked deploy."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from edgert.deploy import Reassembler, chunk_file
from edgert.errors import ConfigError, ProtocolError
from edgert.protocol import (
    DTYPES,
    MAGIC,
    Header,
    Kind,
    Message,
    TensorMeta,
    decode,
    encode,
    error_reply,
)

ARRAYS = {
    "x": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
    "ids": np.array([[101, 2023, 102]], dtype=np.int64),
    "mask": np.array([[True, True, False]]),
    "h": np.float16(1.5) * np.ones((2, 2), np.float16),
    "scalar": np.array(3.25),            # 0-d float64
    "empty": np.zeros((0, 5), np.int32),
    "u8": np.frombuffer(b"\x00\xffab", np.uint8),
}


def wire(msg: Message) -> list[bytes]:
    """What a socket delivers: every frame as fresh bytes."""
    return [bytes(f) for f in encode(msg)]


def act(**arrays: np.ndarray) -> Message:
    return Message.make(Kind.ACT, "r1", 7, step=0, stage=1, mb=2, arrays=arrays)


@pytest.mark.parametrize("kind", list(Kind))
@pytest.mark.parametrize("with_tensors", [False, True])
def test_roundtrip_every_kind(kind, with_tensors):
    arrays = ARRAYS if with_tensors or kind in (Kind.ACT, Kind.GRAD) else None
    msg = Message.make(kind, "run-ü", 3, step=5, stage=1, mb=0, body={"a": [1, 2.5, None]},
                       arrays=arrays)
    got = decode(wire(msg))
    assert got.header == msg.header
    assert got == msg
    out = got.arrays()
    assert list(out) == list(arrays or {})
    for name, a in (arrays or {}).items():
        assert out[name].dtype == a.dtype and out[name].shape == a.shape
        np.testing.assert_array_equal(out[name], a)


def test_golden_header_bytes():
    msg = Message.make(Kind.GRAD, "r1", 7, step=0, stage=1, mb=2, body={"lr": 0.001},
                       arrays={"dx": np.zeros((2, 3), np.float32)})
    frames = encode(msg)
    assert frames[0] == b"EDGERT/1" == MAGIC
    assert frames[1] == (
        b'{"kind":"grad","run":"r1","seq":7,"step":0,"stage":1,"mb":2,'
        b'"tensors":[{"name":"dx","dtype":"float32","shape":[2,3]}],"body":{"lr":0.001}}')
    assert bytes(frames[2]) == bytes(24)


def test_zero_copy_send_and_receive():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    frames = encode(act(x=x))
    assert isinstance(frames[2], memoryview)
    assert np.shares_memory(np.frombuffer(frames[2], np.uint8), x)     # send: no copy
    received = [bytearray(f) for f in frames]                           # a writable receive buffer
    y = decode(received).arrays()["x"]
    assert np.shares_memory(y, np.frombuffer(received[2], np.uint8))   # receive: a view
    received[2][0:4] = np.float32(42).tobytes()
    assert y[0, 0] == 42


def test_non_contiguous_and_big_endian_are_converted():
    x = np.arange(12, dtype=np.float64).reshape(3, 4)
    got = decode(wire(act(t=x.T, be=x.astype(">f8")))).arrays()
    np.testing.assert_array_equal(got["t"], x.T)
    np.testing.assert_array_equal(got["be"], x)


def test_sender_rejects_bad_dtype_and_body():
    with pytest.raises(ProtocolError, match=r"'c' has dtype complex64.*astype"):
        act(c=np.zeros(2, np.complex64))
    with pytest.raises(ProtocolError, match="body is not plain JSON"):
        encode(Message.make(Kind.STATS, "r", 0, body={"t": np.float32(1)}))
    with pytest.raises(ProtocolError, match="body is not plain JSON"):
        encode(Message.make(Kind.STATS, "r", 0, body={"t": float("nan")}))
    with pytest.raises(ProtocolError, match="1 tensors in the header but 0 buffers"):
        Message(Header(Kind.ACT, "r", 0, tensors=(TensorMeta("x", (1,), "uint8"),)))


def good() -> list[bytes]:
    return wire(act(x=np.ones((2, 3), np.float32)))


def with_header(**changes: object) -> list[bytes]:
    frames = good()
    obj = json.loads(frames[1])
    obj.update(changes)
    frames[1] = json.dumps(obj).encode()
    return frames


def with_tensor(**changes: object) -> list[bytes]:
    frames = good()
    obj = json.loads(frames[1])
    obj["tensors"][0].update(changes)
    frames[1] = json.dumps(obj).encode()
    return frames


@pytest.mark.parametrize(("frames", "match"), [
    ([MAGIC], r"got 1 frame\(s\); an edgert message has at least 2"),
    ([b"GARBAGE!", b"{}"], r"frame 0 is not an edgert MAGIC"),
    ([b"", b"{}"], r"frame 0 is not an edgert MAGIC"),
    ([b"EDGERT/2", b"{}"], r"peer speaks protocol EDGERT/2 but this side speaks EDGERT/1"),
    ([b"EDGERT/10", b"{}"], r"peer speaks protocol EDGERT/10"),
    ([MAGIC, b"\xff\xfe"], r"header frame is not UTF-8 JSON"),
    ([MAGIC, b'{"kind": "act",'], r"header frame is not UTF-8 JSON"),
    ([MAGIC, b'{"kind":"hb","run":"r","seq":1,"body":{"x":NaN}}'], r"not UTF-8 JSON.*NaN"),
    ([MAGIC, b"[1, 2]"], r"header must be a JSON object, got list"),
    ([MAGIC, b"[" * 100000], r"header frame is not UTF-8 JSON"),
    ([MAGIC, b'{"run":"r","seq":1}'], r"missing field 'kind'"),
])
def test_rejects_bad_frames(frames, match):
    with pytest.raises(ProtocolError, match=match):
        decode(frames)


@pytest.mark.parametrize(("changes", "match"), [
    ({"kind": "pickle"}, r"'kind' is 'pickle', not one of \['hello'"),
    ({"seq": -1}, r"'seq' must be an integer >= 0, got -1"),
    ({"seq": "1"}, r"'seq' must be an integer >= 0, got '1'"),
    ({"step": True}, r"'step' must be an integer >= -1, got True"),
    ({"mb": 2**70}, r"'mb' must be an integer"),
    ({"mb": -1}, r"act needs header field 'mb' >= 0 \(the micro-batch\)"),
    ({"run": 5}, r"'run' must be a string"),
    ({"body": [1]}, r"'body' must be a JSON object"),
    ({"tensors": {}}, r"'tensors' must be a list"),
    ({"extra": 1}, r"unknown field\(s\) \['extra'\].*bump the protocol version"),
])
def test_rejects_bad_header_fields(changes, match):
    with pytest.raises(ProtocolError, match=match):
        decode(with_header(**changes))


@pytest.mark.parametrize(("changes", "match"), [
    ({"dtype": "object"}, r"tensors\[0\] \('x'\).dtype is 'object'; allowed: bool"),
    ({"dtype": "float32 "}, r"dtype is 'float32 '"),
    ({"shape": [2, -3]}, r"shape must be a list of at most 8 non-negative integers"),
    ({"shape": [2, 3.0]}, r"shape must be a list"),
    ({"shape": "2,3"}, r"shape must be a list"),
    ({"shape": [1] * 9}, r"at most 8"),
    ({"shape": [2**40, 2**40]}, r"over max_tensor_bytes=268435456"),
    ({"name": ""}, r"tensors\[0\].name must be a non-empty string"),
    ({"extra": 1}, r"exactly name, dtype, shape"),
])
def test_rejects_bad_tensor_meta(changes, match):
    with pytest.raises(ProtocolError, match=match):
        decode(with_tensor(**changes))


def test_rejects_buffer_count_and_length():
    frames = good()
    with pytest.raises(ProtocolError, match=r"lists 1 tensor\(s\) but 0 tensor frame\(s\)"):
        decode(frames[:2])
    with pytest.raises(ProtocolError, match=r"lists 1 tensor\(s\) but 2 tensor frame\(s\)"):
        decode([*frames, b"x"])
    with pytest.raises(ProtocolError, match=r"frame 0 \('x', float32 \(2, 3\)\) has 20 bytes but "
                                            r"the header needs 24"):
        decode([*frames[:2], frames[2][:20]])
    with pytest.raises(ProtocolError, match="has 28 bytes but the header needs 24"):
        decode([*frames[:2], frames[2] + b"\0" * 4])


def test_rejects_duplicate_tensor_names():
    frames = good()
    obj = json.loads(frames[1])
    obj["tensors"] *= 2
    with pytest.raises(ProtocolError, match="repeats a name"):
        decode([frames[0], json.dumps(obj).encode(), frames[2], frames[2]])


def test_size_limits():
    frames = good()
    with pytest.raises(ProtocolError, match="over max_header_bytes=64; send large data as tensor"):
        decode(frames, max_header_bytes=64)
    with pytest.raises(ProtocolError, match=r"is 24 bytes, over max_tensor_bytes=16"):
        decode(frames, max_tensor_bytes=16)
    with pytest.raises(ProtocolError, match="over max_tensors=0"):
        decode(frames, max_tensors=0)
    decode(frames, max_header_bytes=len(frames[1]), max_tensor_bytes=24, max_tensors=1)


def test_decoder_keeps_serving_after_errors():
    """A bad message leaves no state behind; the next good one decodes."""
    for bad in ([b"EDGERT/9", b"{}"], [MAGIC, b"nope"], good()[:2]):
        with pytest.raises(ProtocolError) as e:
            decode(bad)
        reply = decode(wire(error_reply("r1", 9, e.value, ref_seq=7)))
        assert reply.kind is Kind.ERROR
        assert reply.header.body["type"] == "ProtocolError" and reply.header.body["ref_seq"] == 7
    assert decode(good()).arrays()["x"].sum() == 6


def test_dtype_whitelist_is_little_endian():
    assert all(d.byteorder in "<|" for d in DTYPES.values())


# ---- chunked deploy -----------------------------------------------------------------------------

@pytest.fixture
def bundle_file(tmp_path):
    p = tmp_path / "stage.so"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 2500, dtype=np.uint8).tobytes())
    return p


def upload(msgs: list[Message], r: Reassembler | None = None):
    r = r or Reassembler()
    out = None
    for m in msgs:
        out = r.feed(decode(wire(m)))
    return out


@pytest.mark.parametrize("chunk", [7, 1000, 2500, 4096])
def test_deploy_roundtrip(bundle_file, chunk):
    msgs = list(chunk_file(bundle_file, chunk, run="r1", seq=10))
    n = -(-2500 // chunk)
    assert [m.kind for m in msgs] == [Kind.DEPLOY_BEGIN, *[Kind.DEPLOY_CHUNK] * n, Kind.DEPLOY_END]
    assert [m.header.seq for m in msgs] == list(range(10, 10 + n + 2))
    begin = msgs[0].header.body
    assert begin["total_bytes"] == 2500 and begin["n_chunks"] == n
    assert begin["sha256"] == hashlib.sha256(bundle_file.read_bytes()).hexdigest()
    assert [m.header.body["offset"] for m in msgs[1:-1]] == [i * chunk for i in range(n)]
    f = upload(msgs)
    assert f is not None and f.name == "stage.so" and f.data == bundle_file.read_bytes()


def test_deploy_empty_file(tmp_path):
    p = tmp_path / "empty"
    p.write_bytes(b"")
    msgs = list(chunk_file(p, 16))
    assert len(msgs) == 2
    assert upload(msgs).data == b""


def corrupt_chunk(m: Message) -> Message:
    data = bytearray(m.buffers[0])
    data[0] ^= 0xFF
    return Message(m.header, (memoryview(data),))


def test_deploy_corrupted_chunk(bundle_file):
    msgs = list(chunk_file(bundle_file, 1000))
    msgs[2] = corrupt_chunk(msgs[2])
    r = Reassembler()
    with pytest.raises(ProtocolError, match=r"deploy_chunk 1 of stage\.so fails its sha256"):
        upload(msgs, r)
    assert r.in_progress is None
    assert upload(list(chunk_file(bundle_file, 1000)), r).data == bundle_file.read_bytes()


def test_deploy_out_of_order(bundle_file):
    msgs = list(chunk_file(bundle_file, 1000))
    msgs[1], msgs[2] = msgs[2], msgs[1]
    with pytest.raises(ProtocolError, match=r"got chunk 1 of stage\.so, expected chunk 0; send "
                                            r"chunks in order"):
        upload(msgs)


def test_deploy_missing_chunk(bundle_file):
    msgs = list(chunk_file(bundle_file, 1000))
    del msgs[3]
    with pytest.raises(ProtocolError, match=r"got 2/3 chunks, 2000/2500 bytes"):
        upload(msgs)


def with_body(m: Message, **changes: object) -> Message:
    h = m.header
    return Message(Header(h.kind, h.run, h.seq, h.step, h.stage, h.mb, h.tensors,
                          {**h.body, **changes}), m.buffers)


def test_deploy_wrong_sha(bundle_file):
    msgs = list(chunk_file(bundle_file, 1000))
    msgs[-1] = with_body(msgs[-1], sha256="0" * 64)
    with pytest.raises(ProtocolError, match=r"begin announced .* and deploy_end 000000000000"):
        upload(msgs)
    msgs = list(chunk_file(bundle_file, 1000))
    msgs[0] = with_body(msgs[0], sha256="ab" * 32)
    with pytest.raises(ProtocolError, match="upload it again"):
        upload(msgs)


@pytest.mark.parametrize(("changes", "match"), [
    ({"name": "../etc/passwd"}, "must be a relative path inside the bundle"),
    ({"name": "/abs"}, "must be a relative path"),
    ({"n_chunks": 2}, "send n_chunks = ceil"),
    ({"total_bytes": -1}, "'total_bytes' must be an integer >= 0"),
    ({"chunk_bytes": 0}, "'chunk_bytes' must be an integer >= 1"),
    ({"sha256": "xyz"}, "64 lowercase hex digits"),
])
def test_deploy_bad_begin(bundle_file, changes, match):
    msgs = list(chunk_file(bundle_file, 1000))
    with pytest.raises(ProtocolError, match=match):
        upload([with_body(msgs[0], **changes)])


def test_deploy_limits_and_sequence_errors(bundle_file):
    msgs = list(chunk_file(bundle_file, 1000))
    with pytest.raises(ProtocolError, match="over max_total_bytes=100"):
        upload(msgs, Reassembler(max_total_bytes=100))
    with pytest.raises(ProtocolError, match="deploy_chunk without a deploy_begin"):
        upload(msgs[1:])
    with pytest.raises(ProtocolError, match="deploy_end without a deploy_begin"):
        upload(msgs[-1:])
    with pytest.raises(ProtocolError, match="feed it DEPLOY_\\* only"):
        upload([Message.make(Kind.HEARTBEAT, "r", 0)])
    with pytest.raises(ProtocolError, match="offset 5, expected 0"):
        upload([msgs[0], with_body(msgs[1], offset=5)])
    r = Reassembler()       # a new DEPLOY_BEGIN restarts an unfinished upload
    upload(msgs[:2], r)
    assert r.in_progress == "stage.so"
    assert upload(msgs, r).data == bundle_file.read_bytes()
    with pytest.raises(ConfigError, match="chunk_bytes must be a positive integer"):
        next(chunk_file(bundle_file, 0))


def test_core_modules_import_neither_zmq_nor_tvm():
    """The pure core must load on a board without the compiler and be testable without sockets."""
    code = ("import sys, edgert.protocol, edgert.schedule, edgert.liveness; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('zmq', 'tvm')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
