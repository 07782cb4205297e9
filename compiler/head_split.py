"""Head-subset attention libraries and in-stage head-split emission (docs/head_split.md).

A two-backend split of an attention layer at k runs heads [0, k) on one backend and [k, H) on the
other. `build_split_library` builds every kernel such a split needs, for every k, into one module
(named by `edgert.contract.kernel_name`). With `StageGraph(head_split=True)` a
training stage calls the board instead of its own attention kernels (`emit_fwd` / `emit_bwd`):

    ctx, probs = call_dps_packed("edgert.attn.fwd", [qkv, maskf, seed, meta])
    dqkv       = call_dps_packed("edgert.attn.bwd", [qkv, probs, dctx, seed, meta])

meta = int64 [layer, salt]: the layer index (for the board's logs) and its dropout salt. The
board (edgert/head_split/executor.py) runs the kernels of `SPLIT_LIB`, built once per stage shape
with salt `LIB_SALT`, for every layer: it folds the layer's salt into the seed it passes (see
[Note: salt folding] there), so one library of all k serves every layer and any tuned k.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from compiler.arch import Arch
from compiler.compile_cache import cache_dir, compiler_hash, target_record
from compiler.kernels.attention import build_attention_bwd, build_attention_fwd
from edgert.contract import BWD_FUNC, FWD_FUNC, LIB_SALT, SPLIT_LIB, AttnShape, kernel_name
from edgert.errors import ConfigError

log = logging.getLogger(__name__)


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


def compile_split_library(shape: AttnShape, dropout: float, arch: Arch, *,
                          use_cache: bool = True) -> tuple[Path, float]:
    """The exported split library of a stage (salt LIB_SALT), from the compile cache if built
    before; returns (path, seconds spent compiling, 0 from the cache)."""
    if not arch.is_cpu:
        raise ConfigError(f"head split runs on CPU backends only; target {arch.name} is "
                          f"{arch.kind}: compile without --head-split")
    key_src = json.dumps({"split_lib": [shape.B, shape.T, shape.H, shape.d, shape.dtype],
                          "dropout": dropout, "salt": LIB_SALT, "target": target_record(arch),
                          "compiler": compiler_hash(), "tvm": tvm.__version__}, sort_keys=True)
    out = cache_dir() / "libs" / ("split-" + hashlib.sha256(key_src.encode()).hexdigest()[:24])
    lib = out / SPLIT_LIB
    if use_cache and lib.is_file():
        return lib, 0.0
    t0 = time.perf_counter()
    ex = tvm.compile(build_split_library(shape, dropout, LIB_SALT, arch),
                     target=arch.tvm_target())
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "attn_split.tmp.so"
    if arch.cross_cc:
        ex.export_library(str(tmp), cc=arch.cross_cc)
    else:
        ex.export_library(str(tmp))
    os.replace(tmp, lib)
    secs = time.perf_counter() - t0
    log.info("head-split library %s: %d kernels, %.1fs", shape, 2 * (2 * shape.H - 1), secs)
    return lib, secs


def stage_attn_shape(dims, spec, dtype: str) -> AttnShape:
    """The attention shape of a BERT stage's layers."""
    return AttnShape(spec.batch, spec.seq, dims.heads, dims.head_dim, dtype)


# ------------------------------------------------------------------------ stage-graph emission
def _tt(shape, dtype):
    return relax.TensorType([int(s) for s in shape], dtype)


def _meta(li: int, salt: int) -> relax.Constant:
    return relax.const(np.array([li, salt], "int64"))


def emit_fwd(g, qkv, maskf, seed, li: int, salt: int) -> list[relax.Expr]:
    """[ctx, probs] of layer li's attention, computed by the board's split executor."""
    s, d, dt = g.s, g.d, g.dtype
    outs = [_tt((g.M, d.hidden), dt), _tt((s.batch, d.heads, s.seq, s.seq), dt)]
    v = g.bb.emit(relax.call_dps_packed(FWD_FUNC, [qkv, maskf, seed, _meta(li, salt)], outs))
    return [g.bb.emit(relax.TupleGetItem(v, i)) for i in range(2)]


def emit_bwd(g, qkv, probs, dctx, seed, li: int, salt: int) -> list[relax.Expr]:
    """[dqkv] of layer li's attention, computed by the board's split executor."""
    out = _tt((g.M, 3 * g.d.hidden), g.dtype)
    return [g.bb.emit(relax.call_dps_packed(BWD_FUNC, [qkv, probs, dctx, seed, _meta(li, salt)],
                                            out))]
