"""Head-subset attention libraries for the backend scheduler (edgert/autotune).

A two-backend split of an attention layer at k runs heads [0, k) on one backend and [k, H) on the
other; this builds every kernel such a split needs, for every k, into one module (one compile, one
exported library), named as `edgert.autotune.measure.kernel_name` expects.
"""

from __future__ import annotations

import tvm

from compiler.kernels.attention import build_attention_bwd, build_attention_fwd
from edgert.autotune.measure import AttnShape, kernel_name


def build_split_library(shape: AttnShape, dropout: float, salt: int, arch) -> tvm.IRModule:
    """Forward and backward kernels for head ranges (0, k) and (H - k, H), k = 1..H."""
    funcs = {}
    for k in range(1, shape.H + 1):
        for heads in {(0, k), (shape.H - k, shape.H)}:
            for direction, build in (("fwd", build_attention_fwd), ("bwd", build_attention_bwd)):
                name = kernel_name(direction, *heads)
                f = build(shape.B, shape.T, shape.H, shape.d, dtype=shape.dtype, arch=arch,
                          dropout=dropout, salt=salt, heads=heads)
                funcs[name] = f.with_attr("global_symbol", name)
    return tvm.IRModule(funcs)
