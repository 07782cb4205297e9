"""Embedding gathers from a block-quantized (GGUF Q8_0 / Q4_1) table, dequantized per row.

* ``build_qtok_embed_fwd``: ids [B,T], word (blocks of [V, D]) -> x [B*T, D] = word[ids]
  (the decoder's token embedding; compiler/kernels/lm.py's float version).
* ``build_qembed_fwd``: ids, token_type [B,T], word (blocks), pos [P,D], type [NT,D] ->
  s [B*T, D] = word[ids] + pos[t] + type[token_type] (BERT; compiler/kernels/embed.py's).

Only the B*T gathered rows are dequantized (same arithmetic as compiler/gguf.py's decoders, see
compiler/kernels/qgemm.py). Token ids are clamped into the table (a second line of defence
behind the input validation: an out-of-vocabulary id must not read outside the table). The
tables are frozen in every mode that quantizes them, so there is no backward.
"""

from __future__ import annotations

from tvm import te, tirx

from compiler.arch import Arch
from compiler.kernels.elementwise import resolve_arch, sched_rows
from compiler.kernels.qgemm import _loader, dequant, gpu_aliases
from compiler.quant import BLOCK_BYTES, QK


def _table(V: int, D: int, fmt: str, arch: Arch) -> list[te.Tensor]:
    """W (+ its byte aliases on GPUs, see [Note: byte aliases] in qgemm.py)."""
    if D % QK:
        raise ValueError(f"a {fmt} embedding table needs rows of a multiple of {QK}, got {D}")
    roles = ["word"] + ([] if arch.is_cpu else
                        ["word_d0", "word_d1", "word_m0", "word_m1"][: gpu_aliases(fmt) - 1])
    return [te.placeholder((V, D // QK * BLOCK_BYTES[fmt]), "uint8", r) for r in roles]


def _row(ids, b, t, V: int):
    return te.min(te.max(tirx.Cast("int32", ids[b, t]), 0), V - 1)


def build_qtok_embed_fwd(B: int, T: int, V: int, D: int, *, fmt: str, dtype: str = "float32",
                         arch: Arch | None = None, config: dict | None = None) -> tirx.PrimFunc:
    """ids [B,T] int64, word blocks [V, D/32*bytes] -> x [B*T, D] = dequant(word)[ids[b, t]]."""
    arch = resolve_arch(arch)
    ids = te.placeholder((B, T), "int64", name="ids")
    Ws = _table(V, D, fmt, arch)
    load = _loader(Ws, ())
    x = te.compute((B * T, D), lambda r, d: dequant(load, _row(ids, r // T, r % T, V), d, fmt,
                                                    dtype), name="x")
    f = te.create_prim_func([ids, *Ws, x])
    return sched_rows(f, "x", arch, dtype) if arch.is_cpu else f


def build_qembed_fwd(B: int, T: int, V: int, D: int, P: int, NT: int, *, fmt: str,
                     dtype: str = "float32", arch: Arch | None = None,
                     config: dict | None = None) -> tirx.PrimFunc:
    """ids, token_type [B,T] int64, word blocks, pos [P,D], type [NT,D] -> s [B*T, D]
    = dequant(word)[ids[b,t]] + pos[t] + type[token_type[b,t]] (position ids 0..T-1)."""
    arch = resolve_arch(arch)
    if T > P:
        raise ValueError(f"sequence length {T} exceeds max positions {P}")
    ids = te.placeholder((B, T), "int64", name="ids")
    tt = te.placeholder((B, T), "int64", name="token_type")
    Ws = _table(V, D, fmt, arch)
    pos = te.placeholder((P, D), dtype, name="pos")
    typ = te.placeholder((NT, D), dtype, name="type")
    load = _loader(Ws, ())

    def f_s(r, d):
        b, t = r // T, r % T
        return (dequant(load, _row(ids, b, t, V), d, fmt, dtype) + pos[t, d]
                + typ[_row(tt, b, t, NT), d])

    s = te.compute((B * T, D), f_s, name="s")
    f = te.create_prim_func([ids, tt, *Ws, pos, typ, s])
    return sched_rows(f, "s", arch, dtype) if arch.is_cpu else f
