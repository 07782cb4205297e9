"""The shared-memory arena of a split attention layer: one mmap'ed file (/dev/shm) that the board
process and both pinned workers view as named numpy buffers.

The whole layer's tensors (mask, seed, qkv, dctx, ctx, dqkv, probs) come first; then each worker's
part buffers ("w0.qkv", ...), of which a worker running n heads uses a prefix (`part_shapes`).
"""

from __future__ import annotations

import mmap
import os

import numpy as np

from edgert.contract import SEED_DTYPE, SEED_SHAPE, AttnShape

ALIGN = 64   # bytes; TVM kernels assume 64-byte aligned buffers


def layout(s: AttnShape) -> dict[str, tuple[int, tuple[int, ...], str]]:
    """name -> (byte offset, full shape, dtype) of every buffer in the arena."""
    B, T, H, d, M = s.B, s.T, s.H, s.d, s.M
    specs: list[tuple[str, tuple[int, ...], str]] = [
        ("mask", (B, T), s.dtype), ("seed", SEED_SHAPE, SEED_DTYPE),
        ("qkv", (M, 3 * H * d), s.dtype), ("dctx", (M, H * d), s.dtype),   # layer in
        ("ctx", (M, H * d), s.dtype), ("dqkv", (M, 3 * H * d), s.dtype),   # layer out
        ("probs", (B, H, T, T), s.dtype)]   # fwd out, bwd in (ops "fwd"/"bwd")
    for w in ("w0", "w1"):
        specs += [(f"{w}.{name}", shp, s.dtype) for name, shp in (
            ("qkv", (M, 3 * H * d)), ("dctx", (M, H * d)), ("ctx", (M, H * d)),
            ("probs", (B, H, T, T)), ("dqkv", (M, 3 * H * d)))]
    out, off = {}, 0
    for name, shape, dt in specs:
        out[name] = (off, shape, dt)
        off += -(-int(np.prod(shape)) * np.dtype(dt).itemsize // ALIGN) * ALIGN
    return out


def part_shapes(s: AttnShape, n: int) -> dict[str, tuple[int, ...]]:
    """Shapes of a worker's buffers when it runs n heads (a prefix of each buffer)."""
    M, d = s.M, s.d
    return {"qkv": (M, 3 * n * d), "dctx": (M, n * d), "ctx": (M, n * d),
            "probs": (s.B, n, s.T, s.T), "dqkv": (M, 3 * n * d)}


class Arena:
    """Named numpy views into one mmap'ed file shared by the parent and both workers."""

    def __init__(self, path: str, shape: AttnShape, create: bool):
        self.path, self.layout = path, layout(shape)
        size = max(off + int(np.prod(s)) * np.dtype(dt).itemsize
                   for off, s, dt in self.layout.values())
        fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)

    def view(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        off, full, dt = self.layout[name]
        shape = shape or full
        return np.frombuffer(self._mm, dt, int(np.prod(shape)), off).reshape(shape)
