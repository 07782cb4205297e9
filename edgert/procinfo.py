"""This board process's memory and imports, as the PROFILE, STATS and telemetry replies report them.

psutil is imported on first use (the board's only dependency beyond numpy, pyzmq and TVM's
runtime).
"""

from __future__ import annotations

import resource
import sys

# Host-side packages a board must never load; PROFILE reports which are loaded so a test can
# check a running board.
WATCHED_MODULES = ("tvm", "tvm.relax", "torch", "compiler", "control", "tvm_ffi")


def peak_rss() -> int:
    """Bytes; VmHWM, because Linux carries ru_maxrss over exec (it would report the parent's)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_stats() -> dict[str, int]:
    """rss, peak_rss, mem_total, mem_available in bytes."""
    import psutil

    vm = psutil.virtual_memory()
    return {"rss": psutil.Process().memory_info().rss, "peak_rss": peak_rss(),   # bytes
            "mem_total": vm.total, "mem_available": vm.available}


def loaded_modules() -> dict[str, bool]:
    return {m: sys.modules.get(m) is not None for m in WATCHED_MODULES}
