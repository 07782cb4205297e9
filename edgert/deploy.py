"""Bundle upload over the protocol: a file becomes DEPLOY_BEGIN, DEPLOY_CHUNK x n, DEPLOY_END
(`chunk_file`, on the controller), and the board rebuilds it with a `Reassembler`, which checks
order, offsets, sizes and both sha256s (frame by frame: edgert/protocol.py).

    for msg in chunk_file("build/stage0/stage.so", name="stage0/stage.so"):
        transport.send(board, msg)
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgert.errors import ConfigError, ProtocolError
from edgert.protocol import Kind, Message

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 1024 * 1024               # bytes per DEPLOY_CHUNK
DEFAULT_MAX_DEPLOY_BYTES = 2 * 1024 * 1024 * 1024   # bytes per uploaded file
_MAX_INT = 2**63 - 1                            # the largest integer a body field may hold
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
