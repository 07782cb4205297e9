"""The one wire format for every ZeroMQ message between the controller and the boards.

Only `encode` and `decode` know the frame layout. Sockets call
`send_multipart(encode(m), copy=False)` and
`decode([f.buffer for f in recv_multipart(copy=False)])`.
ROUTER identity frames are added and stripped by the transport, never here. No pickle on the wire.

Frames (protocol EDGERT/1)
--------------------------
    frame 0      MAGIC = b"EDGERT/1"   protocol name and version, ASCII
    frame 1      header                UTF-8 JSON object, at most max_header_bytes (default 256 KiB)
    frame 2 + i  tensor i              raw bytes of header.tensors[i]: little-endian, C order,
                                       exactly prod(shape) * itemsize bytes

Header (JSON; `encode` writes every key in this order, `decode` requires kind/run/seq):
    {"kind": "act", "run": "r1", "seq": 7, "step": 0, "stage": 1, "mb": 2,
     "tensors": [{"name": "x", "dtype": "float32", "shape": [4, 128, 384]}], "body": {}}

    kind     a `Kind` value                         seq    per-sender counter, >= 0
    run      run id; receivers drop other runs      step   optimizer step, -1 = none
    stage    pipeline stage, -1 = none              mb     micro-batch index, -1 = none
    tensors  one entry per tensor frame             body   small JSON object (no tensors)

dtypes: bool, int8, uint8, int16, uint16, int32, int64, float16, float32, float64. At most
MAX_NDIM dimensions, each a non-negative int. Unknown header keys are rejected.

Kinds (C = controller, B = board; s = stage)
--------------------------------------------
    hello         B->C   body: board, pid, caps               reply: profile request or OK
    profile       C->B   request; B->C result body: timings, memory
    deploy_begin  C->B   body: name, total_bytes, chunk_bytes, n_chunks, sha256
    deploy_chunk  C->B   body: name, index, offset, sha256; one uint8 tensor "data"
    deploy_end    C->B   body: name, n_chunks, total_bytes, sha256       reply: OK or ERROR
    load          C->B   body: bundle, stage, schedule (CSV, see schedule.py), mode ("sync"/"async")
    act           s->s+1 forward activations of (step, mb); needs step, stage, mb >= 0
    grad          s->s-1 gradient w.r.t. the stage input of (step, mb); needs step, stage, mb >= 0
    batch         C->s   side inputs of (step, mb) for a stage: ids, mask, labels
    step          C->B   apply the optimizer step `step` (sync mode); body: lr
    loss          s->C   loss of (step, mb), tensor "loss"
    checkpoint    C->B   save weights and optimizer state; body: path      reply: OK
    state         both   weights/optimizer tensors in or out; body: what ("params"/"optim")
    stats         B->C   counters and timings (STYLE's METRIC); body only
    hb            both   heartbeat; any message counts as one (see liveness.py)
    error         both   body: type, message, ref_seq (the seq of the message that failed)
    ok            both   acknowledgement; body: ref_seq
    shutdown      C->B   stop serving and exit
    fwdgrad       C->B   forward-gradient client (edgert/fwdgrad.py); body: op ("load": bundle;
                         "shard": tensors input_ids, attention_mask, labels; "round": names, seeds,
                         eps, rows + the trainable tensors)   reply: OK {derivs, loss, ...}

A bundle file is uploaded as DEPLOY_BEGIN, DEPLOY_CHUNK x n, DEPLOY_END (`chunk_file`), and the
board rebuilds it with a `Reassembler`, which checks order, offsets, sizes and both sha256s.

Versioning: bump VERSION on any incompatible change. A peer speaking another version gets a
ProtocolError naming both versions; anything else in frame 0 is reported as "not edgert".
A board that catches ProtocolError replies ERROR (`error_reply`) and keeps serving.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgert.errors import ConfigError, ProtocolError

log = logging.getLogger(__name__)

PREFIX = b"EDGERT/"
VERSION = 1
MAGIC = PREFIX + str(VERSION).encode("ascii")   # b"EDGERT/1"

DEFAULT_MAX_HEADER_BYTES = 256 * 1024           # bytes
DEFAULT_MAX_TENSOR_BYTES = 256 * 1024 * 1024    # bytes, per tensor frame
DEFAULT_MAX_TENSORS = 1024
DEFAULT_CHUNK_BYTES = 1024 * 1024               # bytes per DEPLOY_CHUNK
DEFAULT_MAX_DEPLOY_BYTES = 2 * 1024 * 1024 * 1024   # bytes per uploaded file
MAX_NDIM = 8
_MAX_INT = 2**63 - 1

# Wire dtypes, all little-endian: boards and hosts are little-endian, big-endian arrays are
# converted once on send.
DTYPES: dict[str, np.dtype[Any]] = {
    n: np.dtype(n).newbyteorder("<")
    for n in ("bool", "int8", "uint8", "int16", "uint16", "int32", "int64",
              "float16", "float32", "float64")
}

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
    LOSS = "loss"
    CHECKPOINT = "checkpoint"
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
    Kind.LOSS: ("step", "stage", "mb"),
    Kind.STEP: ("step",),
}
_FIELD_HELP = {"step": "the optimizer step", "stage": "the pipeline stage", "mb": "the micro-batch"}
_HEADER_KEYS = ("kind", "run", "seq", "step", "stage", "mb", "tensors", "body")


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """Name, wire dtype name and shape of one tensor frame."""

    name: str
    dtype: str                  # a key of DTYPES, e.g. "float32"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


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
    return TensorMeta(name, dt, tuple(int(d) for d in arr.shape)), buf


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
    meta = TensorMeta(name, dtype, tuple(shape))
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


# ---- chunked deploy -----------------------------------------------------------------------------

_SHA256 = re.compile(r"[0-9a-f]{64}")


def chunk_file(path: Path | str, chunk_bytes: int = DEFAULT_CHUNK_BYTES, *, run: str = "",
               name: str | None = None, seq: int = 0) -> Iterator[Message]:
    """Yield DEPLOY_BEGIN, DEPLOY_CHUNK..., DEPLOY_END for one file (seq counts up from `seq`)."""
    if type(chunk_bytes) is not int or chunk_bytes <= 0:
        raise ConfigError(f"chunk_bytes must be a positive integer, got {chunk_bytes!r}")
    path = Path(path)
    name = path.name if name is None else name
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        total = f.tell()
        n_chunks = -(-total // chunk_bytes)
        head = {"name": name, "total_bytes": total, "n_chunks": n_chunks, "sha256": digest}
        yield Message.make(Kind.DEPLOY_BEGIN, run, seq, body={**head, "chunk_bytes": chunk_bytes})
        f.seek(0)
        for index in range(n_chunks):
            data = f.read(chunk_bytes)
            body = {"name": name, "index": index, "offset": index * chunk_bytes,
                    "sha256": hashlib.sha256(data).hexdigest()}
            yield Message.make(Kind.DEPLOY_CHUNK, run, seq + 1 + index, body=body,
                               arrays={"data": np.frombuffer(data, np.uint8)})
    yield Message.make(Kind.DEPLOY_END, run, seq + 1 + n_chunks, body=head)


@dataclass(frozen=True, slots=True)
class DeployedFile:
    """A file rebuilt from a checked chunked upload."""

    name: str
    data: bytes
    sha256: str
    path: Path | None = None      # the spooled file (Reassembler(spool_dir=...)); data is empty


@dataclass(slots=True)
class _Transfer:
    name: str
    total: int
    chunk_bytes: int
    n_chunks: int
    sha256: str
    next_index: int = 0
    data: bytearray = field(default_factory=bytearray)
    hasher: Any = field(default_factory=hashlib.sha256)
    received: int = 0             # bytes
    out: Any = None               # open spool file, or None (in memory)
    path: Path | None = None


class Reassembler:
    """Rebuilds files from DEPLOY_* messages; any inconsistency raises ProtocolError and resets.

    A new DEPLOY_BEGIN abandons an unfinished upload, so a controller can always retry from scratch.
    """

    def __init__(self, *, max_total_bytes: int = DEFAULT_MAX_DEPLOY_BYTES,
                 spool_dir: Path | None = None) -> None:
        self.max_total_bytes = max_total_bytes
        # spool_dir: write each checked chunk to spool_dir/<name>.part at once, so a board never
        # holds a whole file in memory (a 90 MB parameter file was 2-3x that in RSS).
        self.spool_dir = spool_dir
        self._t: _Transfer | None = None

    @property
    def in_progress(self) -> str | None:
        """Name of the file being received, if any."""
        return None if self._t is None else self._t.name

    def feed(self, msg: Message) -> DeployedFile | None:
        """Consume one DEPLOY_* message; returns the file once DEPLOY_END checks out."""
        try:
            if msg.kind is Kind.DEPLOY_BEGIN:
                self._begin(msg.header.body)
                return None
            if msg.kind is Kind.DEPLOY_CHUNK:
                self._chunk(msg)
                return None
            if msg.kind is Kind.DEPLOY_END:
                return self._end(msg.header.body)
            raise ProtocolError(
                f"Reassembler got a {msg.kind.value} message; feed it DEPLOY_* only")
        except ProtocolError:
            self._drop()        # a failed upload never leaves half a file behind
            raise

    def _drop(self) -> None:
        t, self._t = self._t, None
        if t is not None and t.out is not None:
            t.out.close()
            t.path.unlink(missing_ok=True)

    def _begin(self, body: Mapping[str, Any]) -> None:
        if self._t is not None:
            log.warning("deploy of %s abandoned by a new DEPLOY_BEGIN", self._t.name)
            self._drop()
        name = _safe_name(body.get("name"))
        total = _body_int(body, "total_bytes", "deploy_begin", lo=0)
        chunk = _body_int(body, "chunk_bytes", "deploy_begin", lo=1)
        n_chunks = _body_int(body, "n_chunks", "deploy_begin", lo=0)
        sha = _body_sha(body, "deploy_begin")
        if total > self.max_total_bytes:
            raise ProtocolError(
                f"deploy_begin: {name} is {total} bytes, over max_total_bytes="
                f"{self.max_total_bytes}; shrink the bundle or raise the board's limit")
        if n_chunks != -(-total // chunk):
            raise ProtocolError(
                f"deploy_begin: n_chunks={n_chunks} but total_bytes={total} in chunks of {chunk} "
                f"needs {-(-total // chunk)}; send n_chunks = ceil(total_bytes / chunk_bytes)")
        self._t = _Transfer(name, total, chunk, n_chunks, sha)
        if self.spool_dir is not None:
            path = Path(self.spool_dir) / (name + ".part")
            path.parent.mkdir(parents=True, exist_ok=True)
            self._t.path, self._t.out = path, open(path, "wb", buffering=0)  # noqa: SIM115

    def _chunk(self, msg: Message) -> None:
        t, body = self._t, msg.header.body
        if t is None:
            raise ProtocolError("deploy_chunk without a deploy_begin; send DEPLOY_BEGIN first")
        if body.get("name") != t.name:
            raise ProtocolError(
                f"deploy_chunk for {body.get('name')!r} while {t.name!r} is being uploaded; finish "
                f"or restart that upload")
        index = _body_int(body, "index", "deploy_chunk", lo=0)
        if index != t.next_index:
            raise ProtocolError(
                f"deploy_chunk: got chunk {index} of {t.name}, expected chunk {t.next_index}; send "
                f"chunks in order, or restart the upload with DEPLOY_BEGIN")
        offset = _body_int(body, "offset", "deploy_chunk", lo=0)
        want = min(t.chunk_bytes, t.total - t.received)
        if offset != t.received:
            raise ProtocolError(
                f"deploy_chunk {index} of {t.name}: offset {offset}, expected {t.received}")
        metas = msg.header.tensors
        if len(metas) != 1 or metas[0].name != "data" or metas[0].dtype != "uint8":
            raise ProtocolError(f"deploy_chunk {index} must carry one uint8 tensor named 'data'")
        data = msg.buffers[0]
        if index >= t.n_chunks or data.nbytes != want:
            raise ProtocolError(
                f"deploy_chunk {index} of {t.name}: {data.nbytes} bytes, expected {want} "
                f"(chunk_bytes={t.chunk_bytes}, total_bytes={t.total}, n_chunks={t.n_chunks})")
        if hashlib.sha256(data).hexdigest() != _body_sha(body, "deploy_chunk"):
            raise ProtocolError(
                f"deploy_chunk {index} of {t.name} fails its sha256 (corrupted in transit); "
                f"restart the upload")
        if t.out is not None:
            t.out.write(data)
        else:
            t.data += data
        t.received += data.nbytes
        t.hasher.update(data)
        t.next_index += 1

    def _end(self, body: Mapping[str, Any]) -> DeployedFile:
        t = self._t
        if t is None:
            raise ProtocolError("deploy_end without a deploy_begin; send DEPLOY_BEGIN first")
        if body.get("name") != t.name or t.received != t.total or t.next_index != t.n_chunks:
            raise ProtocolError(
                f"deploy_end for {body.get('name')!r}: got {t.next_index}/{t.n_chunks} chunks, "
                f"{t.received}/{t.total} bytes of {t.name!r}; resend the missing chunks")
        got = t.hasher.hexdigest()
        end_sha = _body_sha(body, "deploy_end")
        if got != t.sha256 or end_sha != t.sha256:
            raise ProtocolError(
                f"deploy_end: {t.name} has sha256 {got[:12]}..., deploy_begin announced "
                f"{t.sha256[:12]}... and deploy_end {end_sha[:12]}...; the file changed during the "
                f"upload or was corrupted: upload it again")
        self._t = None
        if t.out is not None:
            t.out.close()
            return DeployedFile(t.name, b"", got, t.path)
        return DeployedFile(t.name, bytes(t.data), got)


def _body_int(body: Mapping[str, Any], key: str, kind: str, lo: int) -> int:
    v = body.get(key)
    if type(v) is not int or not lo <= v <= _MAX_INT:
        raise ProtocolError(f"{kind} body field {key!r} must be an integer >= {lo}, got {v!r}")
    return v


def _body_sha(body: Mapping[str, Any], kind: str) -> str:
    v = body.get("sha256")
    if not isinstance(v, str) or not _SHA256.fullmatch(v):
        raise ProtocolError(
            f"{kind} body field 'sha256' must be 64 lowercase hex digits, got {v!r}")
    return v


def _safe_name(v: Any) -> str:
    """A relative POSIX path inside the bundle directory: no '..', no absolute path."""
    if (not isinstance(v, str) or not v or v.startswith("/") or "\\" in v or "\0" in v
            or any(p in ("", ".", "..") for p in v.split("/"))):
        raise ProtocolError(
            f"deploy_begin body field 'name' must be a relative path inside the bundle (no '..', "
            f"no leading '/'), got {v!r}")
    return v
