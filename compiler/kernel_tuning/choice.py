"""Which measured candidate of a record the compiler uses (pure functions over a DB record)."""

from __future__ import annotations

MIN_GAIN = 0.05               # a tuned config must beat the default by 5% (confirmed) to be used:
                              # on a shared 2-core VM, re-checks of 2-4% wins were noise
CONFIRM_TOP = 3               # finalists re-timed against the default, interleaved


def _ok(rec: dict) -> list[dict]:
    return [c for c in rec["candidates"] if c["status"] == "ok"]


def default_ms(rec: dict) -> float | None:
    return next((c["ms"] for c in rec["candidates"] if c.get("default") and c["status"] == "ok"),
                None)


def best(rec: dict) -> dict | None:
    """The fastest verified candidate (ties: the earlier, i.e. the default)."""
    ok = _ok(rec)
    return min(ok, key=lambda c: c["ms"]) if ok else None


def finalists(rec: dict, k: int = CONFIRM_TOP) -> list[dict]:
    """Up to k fastest verified non-default candidates that timed faster than the default."""
    d = default_ms(rec)
    ok = sorted((c for c in _ok(rec) if not c.get("default")), key=lambda c: c["ms"])
    return [c for c in ok if d is not None and c["ms"] < d][:k]


def confirmed(rec: dict) -> bool:
    """Whether `confirm` is up to date (no candidate was measured after it)."""
    conf = rec.get("confirm")
    return bool(conf) and conf.get("measured") == len(rec["candidates"])


def decide(rec: dict, min_gain: float = MIN_GAIN) -> None:
    """`choice` = the re-timed finalist with the lowest median (over rounds) of its time relative
    to the default's in the same round, if that median is below 1 - `min_gain`. A ratio of two
    adjacent timings cancels most of a shared machine's load drift; the median ignores a round that
    a burst of load hit."""
    if (rec.get("choice") or {}).get("pinned"):
        return
    rec["choice"] = None
    conf = rec.get("confirm")
    if not conf or not conf["candidates"]:
        return
    top = min(conf["candidates"], key=lambda c: c["ratio"])
    if top["ratio"] < 1 - min_gain:
        rec["choice"] = {"config": top["config"], "ms": top["ms"], "default_ms": conf["default_ms"],
                         "ratio": top["ratio"]}
