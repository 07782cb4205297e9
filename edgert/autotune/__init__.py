"""On-device autotuning of attention-head splits between a board's backends (docs/head_split.md)."""

from __future__ import annotations

from typing import Any

from edgert.autotune.cache import CACHE_VERSION, CacheKey, SplitCache, tvm_version
from edgert.autotune.space import (HeadSplit, SearchResult, candidates, exhaustive, search_crossing,
                                   select, split_cost)

_MEASURE = ("AttnShape", "PinnedWorkers", "Timing", "TuneResult", "kernel_name", "time_fn",
            "tune_head_split")

__all__ = ["CACHE_VERSION", "CacheKey", "HeadSplit", "SearchResult", "SplitCache", "candidates",
           "exhaustive", "search_crossing", "select", "split_cost", "tvm_version", *_MEASURE]


def __getattr__(name: str) -> Any:
    # measure.py is imported lazily: it is also the worker's `python -m` entry point, and importing
    # it here first would make runpy warn about a module executed twice.
    if name in _MEASURE:
        from edgert.autotune import measure

        return getattr(measure, name)
    raise AttributeError(f"module 'edgert.autotune' has no attribute {name!r}")
