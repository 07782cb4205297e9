"""What the compiler, the board runtime and the controller must agree on, defined once.

The lowest layer owns every shared name and layout: `compiler/` and `control/` import them from
here instead of repeating a string or an index. Pure (stdlib + numpy), so a board reads it with
nothing else installed. The other contracts have their own modules: the bundle (entry-point names,
manifest: edgert/artifact.py), the wire format (edgert/protocol.py) and the pipeline schedule
(edgert/schedule.py).

    ACTIVATION           the tensor that flows between stages
    TensorMeta, DTYPES   a tensor's name, shape and dtype (manifests and message headers)
    seed vector          a stage's dropout input: seed_vec, step_seed
    AdamW hyper vector   the floats `optimizer_step` reads: HYPER, adamw_hyper
    footprint            the bytes a loaded stage needs: footprint_bytes, estimate_footprint
    attention split      AttnShape and the names a head-split stage and its library use
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

# ---- tensor names -------------------------------------------------------------------------------
# The activation between stages: a middle stage's forward input and output, and the one tensor
# of ACT and GRAD messages (the gradient w.r.t. it travels under the same name).
ACTIVATION = "hidden"

# ---- tensor metadata ----------------------------------------------------------------------------
# The dtypes a manifest or a message may name, all little-endian: boards and hosts are
# little-endian, and big-endian arrays are converted once, on send.
DTYPES: dict[str, np.dtype[Any]] = {
    n: np.dtype(n).newbyteorder("<")
    for n in ("bool", "int8", "uint8", "int16", "uint16", "int32", "int64",
              "float16", "float32", "float64")
}


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """Name, shape and dtype (a key of DTYPES) of one tensor: a stage's input, output, saved
    tensor or parameter in a manifest, or one tensor frame of a message."""

    name: str
    shape: tuple[int, ...]
    dtype: str                  # e.g. "float32"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorMeta:
        return cls(d["name"], tuple(d["shape"]), d["dtype"])


# ---- dropout seed vector ------------------------------------------------------------------------
# Every stage function takes `seed`: int64 (2,) = (seed, dropout on/off). Off (0) gives the
# inference numerics exactly (every dropout factor is 1), so one bundle trains and evaluates.
SEED_SHAPE = (2,)
SEED_DTYPE = "int64"


def seed_vec(seed: int, dropout: bool) -> np.ndarray:
    """The stages' `seed` input: (seed, dropout on/off). Off gives inference numerics exactly."""
    return np.array([seed, 1 if dropout else 0], np.int64)


def step_seed(run_seed: int, step: int, mb: int) -> int:
    """The dropout seed of one micro-batch: the same on every board and after a resume."""
    x = (run_seed * 0x9E3779B1 + step * 0x85EBCA77 + mb * 0xC2B2AE3D + 1) & 0x7FFFFFFF
    return x or 1


# ---- AdamW hyper-parameter vector ---------------------------------------------------------------
# `optimizer_step(*params, *grads, *m, *v, hyper)` reads these, in this order, cast to the stage's
# dtype (compiler/kernels/optim.py, inplace.py); the gradient is multiplied by grad_scale first.
HYPER = ("lr", "beta1", "beta2", "eps", "weight_decay", "bias_correction1", "bias_correction2",
         "grad_scale")


def adamw_hyper(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                step: int, grad_scale: float = 1.0) -> np.ndarray:
    """The hyper vector (float64, laid out as HYPER) of optimizer step `step` (1-based)."""
    return np.array([lr, beta1, beta2, eps, weight_decay, 1 - beta1 ** step, 1 - beta2 ** step,
                     grad_scale], np.float64)


# ---- memory footprint of a loaded stage ---------------------------------------------------------
def footprint_bytes(params: int, trained: int, saved_per_mb: int, in_flight: int) -> int:
    """Bytes of a loaded stage: every parameter once, the trained ones 3 more times (gradients,
    Adam m and v), and the saved activations of each micro-batch in flight."""
    return params + 3 * trained + saved_per_mb * in_flight


def estimate_footprint(m: Any, in_flight: int) -> dict[str, int]:
    """`footprint_bytes` of a compiled stage (`m`: an edgert.artifact.Manifest), with its parts.
    The board refuses a stage over its budget with it; the controller and the planner charge the
    same."""
    params = sum(t.nbytes for t in m.params)
    trained = sum(t.nbytes for t in m.trainable)
    saved = sum(t.nbytes for t in m.saved) + sum(t.nbytes for t in m.outputs)   # per micro-batch
    return {"params": params, "trained": trained, "saved_per_mb": saved, "in_flight": in_flight,
            "total": footprint_bytes(params, trained, saved, in_flight)}


# ---- attention head split (docs/head_split.md) --------------------------------------------------
# A stage compiled with head_split=True calls two global packed functions instead of its own
# attention kernels; the board registers them (edgert/head_split/executor.py):
#     FWD_FUNC(qkv, maskf, seed, meta, ctx_out, probs_out)
#     BWD_FUNC(qkv, probs, dctx, seed, meta, dqkv_out)
# meta = int64 [layer, salt]. The bundle carries SPLIT_LIB: the head-subset kernels of every split
# point, compiled once per shape with dropout salt LIB_SALT and named by `kernel_name`.
FWD_FUNC, BWD_FUNC = "edgert.attn.fwd", "edgert.attn.bwd"
SPLIT_LIB = "attn_split.so"
LIB_SALT = 0


@dataclass(frozen=True, slots=True)
class AttnShape:
    """Attention layer shape: B sequences of T tokens, H heads of d, float dtype."""

    B: int
    T: int
    H: int
    d: int
    dtype: str = "float32"

    @property
    def M(self) -> int:
        return self.B * self.T


def kernel_name(direction: str, h0: int, h1: int) -> str:
    """Name of the fwd/bwd attention kernel for heads [h0, h1) in a split library."""
    return f"attn_{direction}_{h0}_{h1}"
