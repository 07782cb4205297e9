"""The one wire format for every ZeroMQ message between the controller and the boards.

Only `encode` and `decode` know the frame layout. Sockets call
`send_multipart(encode(m), copy=False)` and
`decode([f.buffer for f in recv_multipart(copy=False)])`.
ROUTER identity frames are added and stripped by the transport, never here. No pickle on the wire.
Bundle uploads (DEPLOY_*) are built and checked by edgert/deploy.py.

Frames (protocol EDGERT/1)
--------------------------
    frame 0      MAGIC = b"EDGERT/1"   protocol name and version, ASCII
    frame 1      header                UTF-8 JSON object, at most max_header_bytes (default 256 KiB)
    frame 2 + i  tensor i              raw bytes of header.tensors[i]: little-endian, C order,
                                       exactly prod(shape) * itemsize bytes

Header (JSON; `encode` writes every key in this order, `decode` requires kind/run/seq):
    {"kind": "act", "run": "r1", "seq": 0, "step": 3, "stage": 1, "mb": 2,
     "tensors": [{"name": "hidden", "dtype": "float32", "shape": [512, 384]}], "body": {}}

    kind     a `Kind` value                         seq    per-sender counter, >= 0 (ACT and GRAD
    run      run id; receivers drop other runs             send 0: they are keyed by step and mb)
    step     optimizer step, -1 = none              stage  pipeline stage, -1 = none
    mb       micro-batch index, -1 = none           body   small JSON object (no tensors)
    tensors  one entry per tensor frame: name, dtype, shape (edgert.contract.TensorMeta)

dtypes: edgert.contract.DTYPES (bool, int8, uint8, int16, uint16, int32, int64, float16, float32,
float64). At most MAX_NDIM dimensions, each a non-negative int. Unknown header keys are rejected.
ACT, GRAD and BATCH need step, stage, mb >= 0; STEP needs step >= 0.

Kinds, frame by frame (C = controller, B = board, s = the board of stage s). Every reply body
carries ref_seq = the request's seq; any request may get ERROR instead of its reply.
memory = rss, peak_rss, mem_total, mem_available (bytes).

    kind          from -> to  request: body (+ tensors)          reply: kind body (+ tensors)
    hello         C -> B      {}                                 hello: board, pid, protocol,
                                                                 caps {modes, loaded}, telemetry
                                                                 (its STATS PUB endpoint or null)
    profile       C -> B      {}                                 profile: board, cores, threads,
                                                                 memory, budget, runtime, modules,
                                                                 stage, backends, head_split
    deploy_begin  C -> B      name, total_bytes, chunk_bytes,    none
                              n_chunks, sha256
    deploy_chunk  C -> B      name, index, offset, sha256        none
                              + one uint8 tensor "data"
    deploy_end    C -> B      name, total_bytes, n_chunks,       ok: name, sha256, bytes
                              sha256
    load          C -> B      bundle, stage, n_stages, n_mb,     ok: footprint, head_split, memory
                              group, mode ("sync" | "async"),
                              schedule (CSV, schedule.py), run,
                              peers {board: endpoint}, prev,
                              next [, head_split_k,
                              head_split_retune]
    batch         C -> s      header step, stage, mb; tensors:   none (queued for the step)
                              stage s's data inputs other than
                              the activation (int64)
    step          C -> B      header step; seeds (one seed       ok: step, losses {mb: loss}
                              vector per micro-batch, see        (the last stage's; else {}),
                              contract.seed_vec), hyper (one     seconds, compute_s, wait_s,
                              AdamW vector per STEP action,      max_versions, memory; sent when
                              see contract.HYPER)                the board's timeline has run
    act           s -> s+1    header step, stage = s, mb;        none
                              tensor "hidden" (contract.ACTIVATION)
    grad          s -> s-1    header step, stage = s, mb;        none
                              tensor "hidden": d loss / d input of stage s
    state         C -> B      op "get" | "set", what "params" |  get: state {what, step}
                              "optim"; set: the tensors, named   + the tensors;
                              as in the manifest ("m/<name>",    set: ok {what, step}
                              "v/<name>" for optim) and step
    stats         C -> B      {}                                 stats: board, steps, errors,
                                                                 last_errors, step_s, compute_s,
                                                                 queue_depth, running,
                                                                 head_split, memory
                  B -> PUB    the board's telemetry record (edgert/board.py), pushed every
                              telemetry_s seconds and after each step
    fwdgrad       C -> B      op "load" {bundle} | "shard"       ok: load {params, batch, seq};
                              + tensors input_ids,               shard {rows}; round {derivs,
                              attention_mask, labels | "round"   loss, seconds, evals}; each
                              {names, seeds, eps, rows} + the    + memory (edgert/fwdgrad.py)
                              trainable tensors
    shutdown      C -> B      {}                                 ok: board; then the board exits
    hb            B -> C      {}: every heartbeat_s to each client of the board's ROUTER; any
                              message counts as one (liveness.py)
    error         B -> C,     type, message, ref_seq (the seq of the message that failed); the
                  B -> B      board keeps serving, and never answers an ERROR it receives
    ok            B -> C      the "ok:" replies above: ref_seq + the fields listed; a board
                              ignores an OK it receives

Versioning: bump VERSION on any incompatible change. A peer speaking another version gets a
ProtocolError naming both versions; anything else in frame 0 is reported as "not edgert".
A board that catches ProtocolError replies ERROR (`error_reply`) and keeps serving.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt

from edgert.contract import DTYPES, TensorMeta
from edgert.errors import ProtocolError

__all__ = ["DTYPES", "MAGIC", "Header", "Kind", "Message", "TensorMeta", "decode", "encode",
           "error_reply"]

PREFIX = b"EDGERT/"
VERSION = 1
MAGIC = PREFIX + str(VERSION).encode("ascii")   # b"EDGERT/1"

DEFAULT_MAX_HEADER_BYTES = 256 * 1024           # bytes
DEFAULT_MAX_TENSOR_BYTES = 256 * 1024 * 1024    # bytes, per tensor frame
DEFAULT_MAX_TENSORS = 1024
MAX_NDIM = 8
_MAX_INT = 2**63 - 1

Buffer = bytes | bytearray | memoryview   # zmq.Frame.buffer is a memoryview


class Kind(StrEnum):
    """Message kinds; the value is what goes on the wire."""

    HELLO = "hello"
    PROFILE = "profile"
    DEPLOY_BEGIN = "deploy_begin"
    DEPLOY_CHUNK = "deploy_chunk"
    DEPLOY_END = "deploy_end"
    LOAD = "load"
    ACT = "act"
    GRAD = "grad"
    BATCH = "batch"
    STEP = "step"
    STATE = "state"
    STATS = "stats"
    HEARTBEAT = "hb"
    ERROR = "error"
    OK = "ok"
    SHUTDOWN = "shutdown"
    FWDGRAD = "fwdgrad"


# Header fields a kind needs >= 0, with what they mean (for the error message).
_NEEDS: dict[Kind, tuple[str, ...]] = {
    Kind.ACT: ("step", "stage", "mb"),
    Kind.GRAD: ("step", "stage", "mb"),
    Kind.BATCH: ("step", "stage", "mb"),
    Kind.STEP: ("step",),
}
_FIELD_HELP = {"step": "the optimizer step", "stage": "the pipeline stage", "mb": "the micro-batch"}
_HEADER_KEYS = ("kind", "run", "seq", "step", "stage", "mb", "tensors", "body")


@dataclass(frozen=True, slots=True)
class Header:
    """Everything in frame 1; see the module docstring for field meanings."""

    kind: Kind
    run: str
    seq: int
    step: int = -1
    stage: int = -1
    mb: int = -1
    tensors: tuple[TensorMeta, ...] = ()
    body: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Message:
    """A header plus one byte buffer per tensor (zero-copy views, never copies)."""

    header: Header
    buffers: tuple[memoryview, ...] = ()

    def __post_init__(self) -> None:
        if len(self.buffers) != len(self.header.tensors):
            raise ProtocolError(
                f"{self.header.kind.value} message: {len(self.header.tensors)} tensors in the "
                f"header but {len(self.buffers)} buffers; build messages with Message.make")
        for meta, buf in zip(self.header.tensors, self.buffers, strict=True):
            if buf.nbytes != meta.nbytes:
                raise ProtocolError(
                    f"tensor {meta.name!r} ({meta.dtype} {meta.shape}) needs {meta.nbytes} bytes, "
                    f"its buffer has {buf.nbytes}")

    @property
    def kind(self) -> Kind:
        return self.header.kind

    @classmethod
    def make(cls, kind: Kind, run: str, seq: int, *, step: int = -1, stage: int = -1,
             mb: int = -1, body: Mapping[str, Any] | None = None,
             arrays: Mapping[str, npt.ArrayLike] | None = None) -> Message:
        """Build a message; C-contiguous little-endian arrays are referenced, not copied."""
        metas: list[TensorMeta] = []
        bufs: list[memoryview] = []
        for name, value in (arrays or {}).items():
            meta, buf = _as_wire(name, value)
            metas.append(meta)
            bufs.append(buf)
        header = Header(kind, run, seq, step, stage, mb, tuple(metas), dict(body or {}))
        return cls(header, tuple(bufs))

    def arrays(self) -> dict[str, npt.NDArray[Any]]:
        """Tensors by name, as numpy views over the frames (no copy; read-only if the frame is)."""
        return {
            m.name: np.frombuffer(b, dtype=DTYPES[m.dtype]).reshape(m.shape)
            for m, b in zip(self.header.tensors, self.buffers, strict=True)
        }


def _as_wire(name: str, value: npt.ArrayLike) -> tuple[TensorMeta, memoryview]:
    """Describe an array and view its bytes; copies only if it is strided or big-endian."""
    arr = np.asarray(value)
    dt = arr.dtype.name
    if dt not in DTYPES:
        raise ProtocolError(
            f"tensor {name!r} has dtype {dt}, which the wire does not carry; allowed: "
            f"{', '.join(DTYPES)}. Cast it first, e.g. arr.astype('float32')")
    arr = np.asarray(arr, dtype=DTYPES[dt], order="C")   # keeps 0-d, unlike ascontiguousarray
    buf = arr.reshape(-1).view(np.uint8).data    # (nbytes,) uint8 memoryview, same memory
    return TensorMeta(name, tuple(int(d) for d in arr.shape), dt), buf


def encode(msg: Message) -> list[bytes | memoryview]:
    """Frames for `send_multipart(..., copy=False)`: MAGIC, JSON header, one buffer per tensor."""
    h = msg.header
    obj = {
        "kind": h.kind.value, "run": h.run, "seq": h.seq, "step": h.step, "stage": h.stage,
        "mb": h.mb,
        "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in h.tensors],
        "body": dict(h.body),
    }
    try:
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ProtocolError(
            f"{h.kind.value} message: body is not plain JSON ({e}); send numbers, strings, lists "
            f"and dicts in the body (no NaN) and tensors via arrays=") from e
    return [MAGIC, text.encode("utf-8"), *msg.buffers]


def decode(frames: Sequence[Buffer], *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
           max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES,
           max_tensors: int = DEFAULT_MAX_TENSORS) -> Message:
    """Validate received frames and return a Message whose buffers view the frames (zero-copy).

    Raises ProtocolError naming the offending frame or field and what the peer should send.
    """
    if len(frames) < 2:
        raise ProtocolError(
            f"got {len(frames)} frame(s); an edgert message has at least 2 (MAGIC, JSON header)")
    _check_magic(memoryview(frames[0]))
    obj = _parse_json(memoryview(frames[1]), max_header_bytes)
    header = _header_from_json(obj, max_tensors, max_tensor_bytes)
    n = len(frames) - 2
    if n != len(header.tensors):
        raise ProtocolError(
            f"{header.kind.value} header lists {len(header.tensors)} tensor(s) but {n} tensor "
            f"frame(s) followed; send exactly one frame per entry of 'tensors'")
    bufs = tuple(_tensor_frame(i, m, frames[2 + i]) for i, m in enumerate(header.tensors))
    return Message(header, bufs)


def _check_magic(frame: memoryview) -> None:
    got = bytes(frame[:32])
    if got == MAGIC:
        return
    if got.startswith(PREFIX) and got[len(PREFIX):].isdigit():
        raise ProtocolError(
            f"peer speaks protocol {got.decode('ascii')} but this side speaks {MAGIC.decode()}; "
            f"run the same edgert version on the controller and every board")
    raise ProtocolError(
        f"frame 0 is not an edgert MAGIC (got {got[:16]!r}, expected {MAGIC!r}); the peer is not "
        f"an edgert endpoint, or routing frames were not stripped by the transport")


def _parse_json(frame: memoryview, max_header_bytes: int) -> dict[str, Any]:
    if frame.nbytes > max_header_bytes:
        raise ProtocolError(
            f"header frame is {frame.nbytes} bytes, over max_header_bytes={max_header_bytes}; "
            f"send large data as tensor frames, not in the JSON body")
    try:
        obj = json.loads(bytes(frame).decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"header frame is not UTF-8 JSON ({e}); send json.dumps(...)") from e
    if not isinstance(obj, dict):
        raise ProtocolError(f"header must be a JSON object, got {type(obj).__name__}")
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _header_from_json(obj: dict[str, Any], max_tensors: int, max_tensor_bytes: int) -> Header:
    unknown = sorted(set(obj) - set(_HEADER_KEYS))
    if unknown:
        raise ProtocolError(
            f"header has unknown field(s) {unknown}; {MAGIC.decode()} headers have only "
            f"{list(_HEADER_KEYS)} (a peer with new fields must bump the protocol version)")
    for key in ("kind", "run", "seq"):
        if key not in obj:
            raise ProtocolError(
                f"header is missing field {key!r}; every message needs kind, run, seq")
    raw_kind = obj["kind"]
    try:
        kind = Kind(raw_kind)
    except ValueError:
        raise ProtocolError(
            f"header field 'kind' is {raw_kind!r}, not one of {[k.value for k in Kind]}") from None
    if not isinstance(obj["run"], str):
        raise ProtocolError(f"header field 'run' must be a string, got {obj['run']!r}")
    ints = {k: _int_field(obj, k, lo=-1) for k in ("step", "stage", "mb")}
    ints["seq"] = _int_field(obj, "seq", lo=0)
    for key in _NEEDS.get(kind, ()):
        if ints[key] < 0:
            raise ProtocolError(
                f"{kind.value} needs header field {key!r} >= 0 ({_FIELD_HELP[key]}), "
                f"got {ints[key]}")
    tensors = _tensors_field(obj.get("tensors", []), max_tensors, max_tensor_bytes)
    body = obj.get("body", {})
    if not isinstance(body, dict):
        raise ProtocolError(f"header field 'body' must be a JSON object, got {type(body).__name__}")
    return Header(kind, obj["run"], ints["seq"], ints["step"], ints["stage"], ints["mb"], tensors,
                  body)


def _int_field(obj: Mapping[str, Any], key: str, lo: int) -> int:
    v = obj.get(key, -1 if lo < 0 else None)
    if type(v) is not int or not lo <= v <= _MAX_INT:
        raise ProtocolError(f"header field {key!r} must be an integer >= {lo}, got {v!r}")
    return v


def _tensors_field(raw: Any, max_tensors: int, max_tensor_bytes: int) -> tuple[TensorMeta, ...]:
    if not isinstance(raw, list):
        raise ProtocolError(f"header field 'tensors' must be a list, got {type(raw).__name__}")
    if len(raw) > max_tensors:
        raise ProtocolError(
            f"header lists {len(raw)} tensors, over max_tensors={max_tensors}; split the message")
    metas = tuple(_tensor_meta(i, t, max_tensor_bytes) for i, t in enumerate(raw))
    names = [m.name for m in metas]
    if len(set(names)) != len(names):
        raise ProtocolError(f"header field 'tensors' repeats a name: {names}; names must be unique")
    return metas


def _tensor_meta(i: int, t: Any, max_tensor_bytes: int) -> TensorMeta:
    where = f"tensors[{i}]"
    if not isinstance(t, dict) or set(t) != {"name", "dtype", "shape"}:
        raise ProtocolError(f"{where} must be an object with exactly name, dtype, shape; got {t!r}")
    name, dtype, shape = t["name"], t["dtype"], t["shape"]
    if not isinstance(name, str) or not name:
        raise ProtocolError(f"{where}.name must be a non-empty string, got {name!r}")
    if dtype not in DTYPES:
        raise ProtocolError(
            f"{where} ({name!r}).dtype is {dtype!r}; allowed: {', '.join(DTYPES)}")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(
            type(d) is int and 0 <= d <= _MAX_INT for d in shape):
        raise ProtocolError(
            f"{where} ({name!r}).shape must be a list of at most {MAX_NDIM} non-negative "
            f"integers, got {shape!r}")
    meta = TensorMeta(name, tuple(shape), dtype)
    if meta.nbytes > max_tensor_bytes:
        raise ProtocolError(
            f"{where} ({name!r}, {dtype} {tuple(shape)}) is {meta.nbytes} bytes, over "
            f"max_tensor_bytes={max_tensor_bytes}; send smaller micro-batches or raise the limit "
            f"on the receiving board")
    return meta


def _tensor_frame(i: int, meta: TensorMeta, frame: Buffer) -> memoryview:
    try:
        buf = memoryview(frame)
        if buf.format != "B" or buf.ndim != 1:
            buf = buf.cast("B")
    except TypeError as e:
        raise ProtocolError(f"tensor frame {i} ({meta.name!r}) is not a contiguous buffer") from e
    if buf.nbytes != meta.nbytes:
        raise ProtocolError(
            f"tensor frame {i} ({meta.name!r}, {meta.dtype} {meta.shape}) has {buf.nbytes} bytes "
            f"but the header needs {meta.nbytes} = prod(shape) * itemsize; send the array's raw "
            f"C-order bytes")
    return buf


def error_reply(run: str, seq: int, exc: BaseException, ref_seq: int = -1) -> Message:
    """The ERROR a board sends for a request it could not serve (then it keeps serving)."""
    body = {"type": type(exc).__name__, "message": str(exc), "ref_seq": ref_seq}
    return Message.make(Kind.ERROR, run, seq, body=body)
