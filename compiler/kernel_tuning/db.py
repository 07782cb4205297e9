"""The per-board tuning database (JSON) and the tuned configs it hands the compiler.
See [Note: tuning database] in __init__.py.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

from compiler.arch import Arch
from compiler.compile_cache import cache_dir
from compiler.kernel_tuning.workloads import Workload, canonical, source_hash
from edgert.errors import ConfigError

log = logging.getLogger(__name__)

SCHEMA = 1                    # bump when a record's meaning changes: old records are then ignored


def default_db_path() -> Path:
    return cache_dir() / "tuning" / f"{socket.gethostname()}.json"


def target_id(arch: Arch) -> str:
    """The target as canonical JSON: what a tuned config is valid for."""
    return canonical({"target": arch.target, "host": arch.host, "threads": arch.threads,
                   "vector_bits": arch.vector_bits})


class TuningDB:
    """The per-board JSON database (see [Note: tuning database])."""

    FORMAT = "edgert-tuning-db"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.records: list[dict] = []
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ConfigError(f"tuning database {self.path} is unreadable ({e}); delete it or "
                                  "pass another --db") from None
            if data.get("format") != self.FORMAT:
                raise ConfigError(f"{self.path} is not an edgert tuning database")
            self.records = list(data.get("records", []))

    @staticmethod
    def _id(rec: dict) -> tuple:
        return (rec.get("schema"), rec.get("tvm"), rec.get("target"), rec.get("dtype"),
                rec.get("source"), rec.get("workload"))

    def matching(self, arch: Arch, dtype: str = "float32") -> list[dict]:
        """Records valid for this target, dtype, TVM version, DB schema and kernel source."""
        import tvm

        want = (SCHEMA, tvm.__version__, target_id(arch), dtype)
        return [r for r in self.records if self._id(r)[:4] == want
                and r.get("source") == source_hash(r["module"])]

    def record(self, arch: Arch, wl: Workload) -> dict:
        """The record of `wl` on `arch` (created empty if new; its `keys` gain wl's keys)."""
        import tvm

        src = source_hash(wl.builder.__module__)
        want = (SCHEMA, tvm.__version__, target_id(arch), wl.dtype, src, wl.key)
        rec = next((r for r in self.records if self._id(r) == want), None)
        if rec is None:
            rec = {"schema": SCHEMA, "tvm": tvm.__version__, "target": target_id(arch),
                   "dtype": wl.dtype, "source": src, "module": wl.builder.__module__,
                   "workload": wl.key, "label": wl.label, "flops": wl.flops,
                   "keys": [], "candidates": [], "pending": None, "confirm": None, "choice": None,
                   "complete": False}
            self.records.append(rec)
        rec["keys"] = sorted(set(rec["keys"]) | set(wl.keys))
        return rec

    def pin(self, arch: Arch, wl: Workload, config: dict) -> None:
        """Make the compiler use `config` for `wl` on `arch` whatever the timings (kept by tune)."""
        self.record(arch, wl)["choice"] = {"config": dict(config), "ms": None, "default_ms": None,
                                           "pinned": True}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"format": self.FORMAT, "schema": SCHEMA,
                                   "host": socket.gethostname(), "records": self.records},
                                  indent=1), encoding="utf-8")
        os.replace(tmp, self.path)


def configs_for(db: TuningDB, arch: Arch, dtype: str = "float32") -> dict[str, dict]:
    """Emitter key -> tuned config, for every record of this target whose tuned config is used."""
    out: dict[str, dict] = {}
    for rec in db.matching(arch, dtype):
        if rec.get("choice"):
            out.update({k: rec["choice"]["config"] for k in rec["keys"]})
    return out


def board_configs(arch: Arch, db_path: str | Path | None = None) -> dict[str, dict]:
    """Tuned configs from `db_path` (must exist) or from this board's default DB (if it exists)."""
    path = Path(db_path) if db_path else default_db_path()
    if not path.is_file():
        if db_path:
            raise ConfigError(f"no tuning database at {path}: run `edgert tune --db {path}` first, "
                              "or drop --db")
        return {}
    configs = configs_for(TuningDB(path), arch)
    log.info("%d tuned kernel configs from %s", len(configs), path)
    return configs
