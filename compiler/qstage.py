"""Stage graphs with quantized frozen weights: parameter types and kernel routing.

[Note: quantized frozen weights] A stage whose spec has ``base_dtype`` "q8_0" or "q4_1" holds the
tensors `compiler.quant_layout.stage_formats` names as raw GGUF blocks (uint8 [rows, cols/32 * bytes]),
everything else in float32 as before. The graph builders (compiler/stage.py,
compiler/decoder_stage.py) are unchanged apart from two hooks:

* `StageGraph.param_vars` types those parameters as uint8 blocks (`stored_types`);
* `Emitter.__call__` passes every kernel call through `route`: a call whose operand is a uint8
  tensor goes to the quantized kernel of the same operation (the float GEMM -> `build_qgemm` with
  the same shapes and epilogue, the token/word embedding gathers -> compiler/kernels/qembed.py),
  with the block format read off the tensor's row width. Any other kernel given a uint8 tensor is
  a compile error (no kernel would silently read blocks as floats).

The frozen weights' gradient kernels the graphs emit read only activations; the dead-code pass
(`compiler.build.prune`) removes them as before. On GPU arches a quantized operand is passed once
per byte role ([Note: byte aliases] in compiler/kernels/qgemm.py).
"""

from __future__ import annotations

from tvm import relax

from compiler.kernels import embed, gemm, lm, qembed, qgemm
from compiler.quant import format_of_row
from compiler.quant_layout import stored_params
from edgert.errors import ModelError


def stored_types(spec, dims) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (stored shape, "uint8") for the parameters a stage holds quantized."""
    return {n: (s, d) for n, s, d in stored_params(spec, dims) if d == "uint8"}


def _is_blocks(x) -> bool:
    ty = getattr(x, "ty", None)
    return isinstance(ty, relax.TensorType) and str(ty.dtype) == "uint8"


def _cols(x) -> int:
    return int(x.ty.shape.values[-1])


def route(E, builder, args: list, bargs: tuple, kw: dict):
    """(builder, args, bargs, kw) for a kernel call: unchanged unless an operand is quantized."""
    q = [i for i, a in enumerate(args) if _is_blocks(a)]
    if not q:
        return builder, args, bargs, kw
    if builder is gemm.build_gemm and q == [1] and not kw.get("trans_a"):
        _, N, K = bargs
        trans_b = bool(kw.get("trans_b"))
        fmt = format_of_row(_cols(args[1]), K if trans_b else N)
        new_kw = {k: v for k, v in kw.items() if k not in ("config", "trans_a")}
        return qgemm.build_qgemm, _aliased(E, args, fmt), bargs, {**new_kw, "fmt": fmt}
    if builder is lm.build_tok_embed_fwd and q == [1]:
        fmt = format_of_row(_cols(args[1]), bargs[3])
        return qembed.build_qtok_embed_fwd, _aliased(E, args, fmt), bargs, {**kw, "fmt": fmt}
    if builder is embed.build_embed_fwd and q == [2]:
        fmt = format_of_row(_cols(args[2]), bargs[3])
        return qembed.build_qembed_fwd, _aliased(E, args, fmt), bargs, {**kw, "fmt": fmt}
    raise ModelError(f"{builder.__module__}.{builder.__name__} has no quantized variant, but "
                     f"argument(s) {q} are quantized weights; keep that tensor in float32 "
                     "(compiler/quant.py stage_formats) or add the kernel")


def _aliased(E, args: list, fmt: str) -> list:
    """On GPU arches each quantized operand is passed once per byte role."""
    if E.arch.is_cpu:
        return list(args)
    n = qgemm.gpu_aliases(fmt)
    return [a for x in args for a in ([x] * n if _is_blocks(x) else [x])]
