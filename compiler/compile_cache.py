"""The compile cache: where compiled libraries live and what their keys cover.

Compiled stage libraries (compiler/build.py) and head-split kernel libraries
(compiler/head_split.py) are cached in `cache_dir()/libs/<key>`, the key a sha256 over everything
that determines the code: stage spec, model dims, target record, kernel configs,
`compiler_hash()` and the TVM version.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from compiler.arch import Arch

_SRC = Path(__file__).resolve().parent


def compiler_hash() -> str:
    """sha256 over the compiler's own sources: a change to any kernel invalidates cached builds."""
    h = hashlib.sha256()
    for p in sorted(_SRC.rglob("*.py")):
        h.update(p.relative_to(_SRC).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get("EDGERT_CACHE", Path.home() / ".cache" / "edgert"))


def target_record(arch: Arch) -> dict:
    """The target as the manifest records it (and as cache keys cover it)."""
    flags = []
    if arch.name == "host" and arch.vector_bits == 512:
        flags = ["avx512f"]
    elif arch.name == "host" and arch.vector_bits == 256:
        flags = ["avx2"]
    return {"preset": arch.name, "kind": arch.kind, "tvm": arch.target, "host": arch.host,
            "elf_machine": arch.elf_machine, "vector_bits": arch.vector_bits,
            "threads": arch.threads, "cpu_flags": flags}
