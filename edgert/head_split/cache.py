"""Versioned on-disk cache of tuned head splits (JSON), keyed so a compiler or TVM change re-tunes.

File format (machine-written, one file per board, default ~/.cache/edgert/autotune.json):

    {"version": CACHE_VERSION,
     "entries": {"<CacheKey.encode()>": {"key": {...}, "split": {"cpu0": 5, "cpu1": 7},
                                         "cost_ms": 3.1, ...anything the tuner records}}}

A file of another CACHE_VERSION, or an unreadable one, is treated as empty and replaced on the next
`put` (tinygrad's versioned diskcache table). Writes go to a temporary file in the same directory
and are renamed over the old one, so a crash never leaves half a file; concurrent writers are
serialised by an flock on "<file>.lock" (read-modify-write).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from edgert.errors import ConfigError

log = logging.getLogger(__name__)
CACHE_VERSION = 1   # bump when the record format or the meaning of a measurement changes


def tvm_version() -> str:
    """The installed TVM's version, read from package metadata (does not import TVM)."""
    for dist in ("apache-tvm", "tvm"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(dist)
    return "unknown"


def default_path() -> Path:
    return Path(os.environ.get("EDGERT_CACHE", Path.home() / ".cache" / "edgert")) / "autotune.json"


@dataclass(frozen=True, slots=True)
class CacheKey:
    """What a tuned split depends on.

    board_id:    the board (profile name or hostname): latencies are per board
    backends:    the backend set, in head order (e.g. ("cpu0", "cpu1") or ("cpu", "mali"))
    source_hash: the bundle's / kernels' source hash: a recompile changes the kernels' speed
    tvm_version: TVM's runtime and code generator version
    workload:    the layer shape, e.g. "attn_fwd_bwd B8 T128 H12 d32 float32 p0.1"
    """

    board_id: str
    backends: tuple[str, ...]
    source_hash: str
    tvm_version: str
    workload: str

    def encode(self) -> str:
        return json.dumps([*asdict(self).values(), CACHE_VERSION], separators=(",", ":"))


class SplitCache:
    """get/put of tuned head splits in one JSON file."""

    def __init__(self, path: Path | str | None = None):
        self.path = Path(path) if path is not None else default_path()

    def get(self, key: CacheKey, *, retune: bool = False) -> dict[str, Any] | None:
        """The stored record for key, or None if absent (always None with retune=True)."""
        if retune:
            return None
        return self._load().get(key.encode())

    def put(self, key: CacheKey, record: dict[str, Any]) -> None:
        """Store (or replace) the record for key, atomically."""
        if "split" not in record:
            raise ConfigError("an autotune cache record needs a 'split' field")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked():
            entries = self._load()
            entries[key.encode()] = {"key": asdict(key), **record}
            self._write({"version": CACHE_VERSION, "entries": entries})

    def entries(self) -> list[dict[str, Any]]:
        """Every stored record (for reporting the chosen splits)."""
        return list(self._load().values())

    # ---- file I/O ---------------------------------------------------------------------------
    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("autotune cache %s is unreadable (%s); re-tuning", self.path, e)
            return {}
        if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
            log.info("autotune cache %s has version %s, want %s; re-tuning", self.path,
                     data.get("version") if isinstance(data, dict) else None, CACHE_VERSION)
            return {}
        entries = data.get("entries")
        return entries if isinstance(entries, dict) else {}

    def _write(self, data: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
