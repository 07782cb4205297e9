"""One pinned head-split worker process: the child side of `PinnedWorkers` (workers.py).

Started by `PinnedWorkers`, not by hand:
    python -m edgert.head_split.worker '<json config>'
config: {lib, arena, shape [B, T, H, d, dtype], core, prefix}. The worker pins itself to `core`,
loads TVM's runtime with a 1-thread pool and the kernels of `lib` by name (contract.kernel_name),
views the arena, prints one JSON "ready" line, then reads one JSON command per line on stdin and
answers one JSON line on stdout:
    {"op": "fwd" | "bwd", "h0", "h1"}   one direction of a stage's layer for heads [h0, h1)
    {"op": "attn", "h0", "h1", "io", "reps", "warmup"}   fwd + bwd timed reps times
    {"op": "ping"}   a round trip;   {"op": "exit"}
Replies: {"ms": [...]} or {"error": "..."}.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from edgert.contract import AttnShape, kernel_name
from edgert.head_split.arena import Arena, part_shapes
from edgert.head_split.timing import time_fn


def serve(cfg: dict[str, Any]) -> None:
    """Pin this process, load the library, then answer commands from stdin until "exit"."""
    os.sched_setaffinity(0, {int(cfg["core"])})   # before the runtime starts its pool
    from edgert.runtime import load_runtime, to_dev

    rt = load_runtime(threads=1, block_torch=True)
    shape = AttnShape(*cfg["shape"])
    arena, w = Arena(cfg["arena"], shape, create=False), cfg["prefix"]
    lib = rt.load_module(cfg["lib"])
    seed, mask = to_dev(arena.view("seed")), to_dev(arena.view("mask"))
    fns: dict[tuple[int, int], tuple[Any, Any, list[Any]]] = {}

    def prepared(h0: int, h1: int) -> tuple[Any, Any, list[Any]]:
        if (h0, h1) not in fns:   # zero-copy runtime tensors over the arena views
            t = {n: to_dev(arena.view(f"{w}.{n}", s))
                 for n, s in part_shapes(shape, h1 - h0).items()}
            fns[(h0, h1)] = (lib[kernel_name("fwd", h0, h1)], lib[kernel_name("bwd", h0, h1)],
                             [t["qkv"], t["ctx"], t["probs"], t["dctx"], t["dqkv"]])
        return fns[(h0, h1)]

    @functools.cache
    def io(h0: int, h1: int) -> dict[str, Callable[[], None]]:
        """This worker's copies between the whole layer's buffers and its heads' part: gathers of
        its q|k|v, dctx and probs columns, scatters of its ctx, probs and dqkv columns."""
        n, M, d = h1 - h0, shape.M, shape.d
        sh = part_shapes(shape, n)
        cols = slice(h0 * d, h1 * d)
        full = {name: arena.view(name) for name in ("qkv", "dctx", "ctx", "dqkv", "probs")}
        part = {name: arena.view(f"{w}.{name}", sh[name]) for name in full}
        q3, pq3 = full["qkv"].reshape(M, 3, -1), part["qkv"].reshape(M, 3, n * d)
        g3, pg3 = full["dqkv"].reshape(M, 3, -1), part["dqkv"].reshape(M, 3, n * d)

        def put(dst: np.ndarray, src: np.ndarray) -> Callable[[], None]:
            return lambda: np.copyto(dst, src)

        return {"qkv": put(pq3, q3[:, :, cols]), "dctx": put(part["dctx"], full["dctx"][:, cols]),
                "probs_in": put(part["probs"], full["probs"][:, h0:h1]),
                "ctx": put(full["ctx"][:, cols], part["ctx"]), "dqkv": put(g3[:, :, cols], pg3),
                "probs_out": put(full["probs"][:, h0:h1], part["probs"])}

    def part(op: str, h0: int, h1: int) -> float:
        """fwd: ctx, probs of heads [h0, h1) from the arena's qkv; bwd: dqkv from qkv, probs,
        dctx. Gathers its columns and scatters its results itself; returns ms."""
        t0 = time.perf_counter()
        f, b, (qkv, ctx, probs, dctx, dqkv) = prepared(h0, h1)
        c = io(h0, h1)
        if op == "fwd":
            c["qkv"]()
            f(qkv, mask, seed, ctx, probs)
            c["ctx"]()
            c["probs_out"]()
        else:
            c["qkv"]()
            c["dctx"]()
            c["probs_in"]()
            b(qkv, probs, dctx, seed, dqkv)
            c["dqkv"]()
        return (time.perf_counter() - t0) * 1e3

    print(json.dumps({"ready": True, "core": cfg["core"],
                      "affinity": sorted(os.sched_getaffinity(0))}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["op"] == "exit":
                break
            if cmd["op"] == "ping":
                reply: dict[str, Any] = {"ms": []}
            elif cmd["op"] in ("fwd", "bwd"):   # one direction of a stage's layer: see run_part
                reply = {"ms": [part(cmd["op"], cmd["h0"], cmd["h1"])]}
            else:
                f, b, (qkv, ctx, probs, dctx, dqkv) = prepared(cmd["h0"], cmd["h1"])
                c = io(cmd["h0"], cmd["h1"]) if cmd["io"] else {}
                gather = _seq(c.get("qkv", _nop), c.get("dctx", _nop))
                scatter = _seq(c.get("ctx", _nop), c.get("dqkv", _nop))

                def step() -> None:   # noqa: B023 below: called within this iteration only
                    gather()                             # noqa: B023
                    f(qkv, mask, seed, ctx, probs)       # noqa: B023
                    b(qkv, probs, dctx, seed, dqkv)      # noqa: B023
                    scatter()                            # noqa: B023

                reply = {"ms": list(time_fn(step, warmup=cmd["warmup"], n=cmd["reps"]).samples)}
        except Exception as e:  # noqa: BLE001 - reported to the parent, which raises BoardError
            reply = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(reply), flush=True)


def _nop() -> None:
    pass


def _seq(*fns: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        for f in fns:
            f()

    return run


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m edgert.head_split.worker '<json config>'")
    serve(json.loads(sys.argv[1]))
