"""Frozen weights in GGUF block formats (Q8_0, Q4_1): numpy quantizers (pure: numpy only, no TVM); which
tensors a stage stores quantized is compiler/quant_layout.py.

Block layouts (llama.cpp's ggml-common.h; decoded here, for compiler/gguf.py too), 32 weights of one row each:

    Q8_0  34 bytes: fp16 scale d, 32 x int8 q                     w = d * q
    Q4_1  20 bytes: fp16 scale d, fp16 min m, 16 bytes of nibbles  w = d * q + m,  q in 0..15
          (weight j < 16 is the low nibble of byte j, weight j + 16 its high nibble)

A quantized [N, K] weight (blocks along K, the row) is stored as its raw GGUF bytes, a uint8
array [N, K/32 * bytes_per_block]: exactly what a GGUF file holds, so SmolLM2's own Q4_1 blocks go
into a bundle untouched, and the kernels (compiler/kernels/qgemm.py) read the same bytes.

The quantizers follow llama.cpp's reference rounding (quantize_row_q8_0_ref / _q4_1_ref):

    Q8_0: d = max|x| / 127, q = round-half-away(x / d)    (x * (1/d) in float32), d stored as fp16
    Q4_1: d = (max - min) / 15, q = min(15, trunc((x - min) * (1/d) + 0.5)), d and min as fp16

(the quants are computed with the float32 d, then d is rounded to fp16: the reference's order).
tests/unit/test_quant.py checks them byte for byte against the `gguf` package's implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgert.errors import ConfigError, ModelError

QK = 32                                   # weights per block
BLOCK_BYTES = {"q8_0": 34, "q4_1": 20}    # bytes per block
GGUF_NAMES = {"q8_0": "Q8_0", "q4_1": "Q4_1"}
BASE_DTYPES = ("f32", "q8_0", "q4_1")
EMBED_FORMAT = "q8_0"   # token embeddings / LM head (See [Note: what is quantized])


def check_base_dtype(base_dtype: str) -> str:
    if base_dtype not in BASE_DTYPES:
        raise ConfigError(f"unknown base dtype {base_dtype!r}: use one of {list(BASE_DTYPES)} "
                          "(--base-dtype f32|q8_0|q4_1)")
    return base_dtype


def stored_shape(shape: tuple[int, ...], fmt: str) -> tuple[int, ...]:
    """The uint8 shape of a [..., K] float tensor stored in `fmt` (K must be a multiple of 32)."""
    *lead, k = (int(s) for s in shape)
    if k % QK:
        raise ModelError(f"a {fmt} tensor needs rows of a multiple of {QK} values, got {shape}")
    return (*lead, k // QK * BLOCK_BYTES[fmt])


def logical_cols(stored_cols: int, fmt: str) -> int:
    """K of a stored row of `stored_cols` bytes."""
    return stored_cols // BLOCK_BYTES[fmt] * QK


def format_of_row(stored_cols: int, k: int) -> str:
    """The block format of a stored row of `stored_cols` bytes holding `k` weights."""
    for fmt, bs in BLOCK_BYTES.items():
        if k % QK == 0 and stored_cols == k // QK * bs:
            return fmt
    raise ModelError(f"a uint8 row of {stored_cols} bytes is neither Q8_0 nor Q4_1 blocks of "
                     f"{k} weights")


# ---- block decoders (layouts from ggml-common.h) -------------------------------------------------
def f16_values(raw: np.ndarray) -> np.ndarray:
    return raw.copy().view(np.float16).astype(np.float32)


def decode_q4_1(data: np.ndarray) -> np.ndarray:
    """Q4_1: blocks of 32 = f16 scale d, f16 min m, 16 bytes of nibbles; x = d * q + m.

    Element j < 16 is the low nibble of byte j, element j + 16 its high nibble.
    """
    b = data.reshape(-1, 20)
    d, m = f16_values(b[:, 0:2]), f16_values(b[:, 2:4])
    qs = b[:, 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)   # (nblocks, 32)
    return q * d + m


def decode_q8_0(data: np.ndarray) -> np.ndarray:
    """Q8_0: blocks of 32 = f16 scale d, 32 int8; x = d * q."""
    b = data.reshape(-1, 34)
    return b[:, 2:].copy().view(np.int8).astype(np.float32) * f16_values(b[:, 0:2])



# ---- quantizers ----------------------------------------------------------------------------------
def _round_half_away(v: np.ndarray) -> np.ndarray:
    """C's roundf in float32 (exact: ``a - floor(a)`` is exact for |a| < 2^23; adding 0.5 first
    would round 0.49999997 up)."""
    a = np.abs(v)
    f = np.floor(a)
    return np.copysign(f + (a - f >= np.float32(0.5)), v)


def _blocks(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim < 1 or x.shape[-1] % QK:
        raise ModelError(f"cannot quantize a tensor of shape {x.shape}: the last dimension must "
                         f"be a multiple of {QK}")
    return x.reshape(-1, QK)


def _fp16_bytes(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16).reshape(-1, 1).view(np.uint8)


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """float [..., K] -> uint8 [..., K/32*34] (llama.cpp quantize_row_q8_0_ref)."""
    b = _blocks(x)
    d = np.abs(b).max(axis=1, keepdims=True) / np.float32(127)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    q = _round_half_away(b * inv).astype(np.int8)
    out = np.concatenate([_fp16_bytes(d), q.view(np.uint8)], axis=1)
    return out.reshape(stored_shape(np.shape(x), "q8_0"))


def quantize_q4_1(x: np.ndarray) -> np.ndarray:
    """float [..., K] -> uint8 [..., K/32*20] (llama.cpp quantize_row_q4_1_ref)."""
    b = _blocks(x)
    lo, hi = b.min(axis=1, keepdims=True), b.max(axis=1, keepdims=True)
    d = (hi - lo) / np.float32(15)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    q = np.minimum(np.trunc((b - lo) * inv + np.float32(0.5)), 15).astype(np.uint8)
    nib = q[:, :16] | (q[:, 16:] << np.uint8(4))
    out = np.concatenate([_fp16_bytes(d), _fp16_bytes(lo), nib], axis=1)
    return out.reshape(stored_shape(np.shape(x), "q4_1"))


def quantize(x: np.ndarray, fmt: str) -> np.ndarray:
    if fmt == "q8_0":
        return quantize_q8_0(x)
    if fmt == "q4_1":
        return quantize_q4_1(x)
    raise ConfigError(f"unknown block format {fmt!r}: use one of {list(BLOCK_BYTES)}")


def dequantize(blocks: np.ndarray, fmt: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """uint8 blocks -> float32; `shape` defaults to the logical shape implied by the stored one."""
    blocks = np.asarray(blocks, dtype=np.uint8)
    if shape is None:
        *lead, c = blocks.shape
        shape = (*lead, logical_cols(c, fmt))
    if fmt not in BLOCK_BYTES:
        raise ConfigError(f"unknown block format {fmt!r}: use one of {list(BLOCK_BYTES)}")
    out = (decode_q8_0 if fmt == "q8_0" else decode_q4_1)(blocks.reshape(-1))
    if out.size != int(np.prod(shape)):
        raise ModelError(f"{out.size} {fmt} values do not fill a {tuple(shape)} tensor")
    return np.ascontiguousarray(out.reshape(shape))


def rel_error(x: np.ndarray, blocks: np.ndarray, fmt: str) -> float:
    """Relative Frobenius error ||dequant(blocks) - x|| / ||x|| (float64; 0 for x = 0)."""
    x64 = np.asarray(x, dtype=np.float64)
    den = float(np.linalg.norm(x64))
    err = float(np.linalg.norm(dequantize(blocks, fmt, x64.shape).astype(np.float64) - x64))
    return err / den if den > 0 else err


@dataclass(frozen=True)
class QTensor:
    """A weight held as GGUF blocks: `fmt`, logical float `shape` [..., K], `blocks` uint8."""

    fmt: str
    shape: tuple[int, ...]
    blocks: np.ndarray

    def __post_init__(self) -> None:
        want = stored_shape(self.shape, self.fmt)
        if tuple(self.blocks.shape) != want or self.blocks.dtype != np.uint8:
            raise ModelError(f"{self.fmt} blocks of shape {self.blocks.shape} {self.blocks.dtype} "
                             f"do not hold a {self.shape} tensor (want uint8 {want})")

    @classmethod
    def from_float(cls, x: np.ndarray, fmt: str) -> QTensor:
        return cls(fmt, tuple(np.shape(x)), quantize(x, fmt))

    def dequantize(self) -> np.ndarray:
        return dequantize(self.blocks, self.fmt, self.shape)

    @property
    def nbytes(self) -> int:
        return int(self.blocks.nbytes)

    @property
    def size(self) -> int:
        """Number of weights (the logical tensor's size)."""
        return int(np.prod(self.shape))


def cat_rows(parts: list) -> QTensor | np.ndarray:
    """Row-wise concatenation (fused QKV, gate/up). Blocks of one format stay blocks (exact: the
    blocks run along the rows); anything else is concatenated as float32."""
    fmts = {p.fmt if isinstance(p, QTensor) else None for p in parts}
    if len(fmts) == 1 and None not in fmts:
        shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
        return QTensor(fmts.pop(), shape, np.concatenate([p.blocks for p in parts]))
    return np.concatenate([p.dequantize() if isinstance(p, QTensor) else p for p in parts])


def to_stored(name: str, value, shape: tuple[int, ...], fmt: str | None
              ) -> tuple[np.ndarray, float | None]:
    """A parameter of logical `shape` in the form a stage stores it: (array, error).

    ``fmt`` None: the values as float (a QTensor is dequantized), error None. Otherwise uint8
    `fmt` blocks: a QTensor already in `fmt`, or a uint8 array of the stored shape (what a running
    stage returns), is used as is (no re-quantization; error 0.0 for the QTensor, None for the
    bare blocks); float values, or blocks of another format, are quantized and the relative
    Frobenius error against the given values is returned."""
    if fmt is None:
        return (value.dequantize() if isinstance(value, QTensor) else value), None
    if isinstance(value, QTensor):
        if value.fmt == fmt and value.shape == tuple(shape):
            return np.ascontiguousarray(value.blocks), 0.0
        value = value.dequantize()
    elif isinstance(value, np.ndarray) and value.dtype == np.uint8:
        if value.shape != stored_shape(shape, fmt):
            raise ModelError(f"parameter {name}: uint8 blocks of shape {value.shape}, a {fmt} "
                             f"{tuple(shape)} tensor is stored as {stored_shape(shape, fmt)}")
        return np.ascontiguousarray(value), None
    x = np.asarray(value, dtype=np.float32)
    if x.shape != tuple(shape):
        raise ModelError(f"parameter {name} has shape {x.shape}, the stage expects {tuple(shape)}")
    b = quantize(x, fmt)
    return b, rel_error(x, b, fmt)
