"""What the stage planner models (pure): a model's per-layer costs, the boards and the links.

`bert_costs` turns a BERT classifier's shapes into one `LayerCost` per unit (embeddings, each
encoder layer, the head): FLOPs, parameter bytes, what the forward saves for the backward and what
crosses a link, matching what compiler/stage.py builds. A `BoardSpec` is what the planner knows of
a board (memory budget, modelled or measured speed, an optional second processor for attention
heads); `Links` the bandwidth and latency between boards. control/partition.py searches splits
over them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from compiler.model_spec import EMBED_PARAMS, HEAD_PARAMS, LAYER_PARAMS, ModelDims
from edgert.errors import ConfigError

MIB = 1 << 20

# Sustained GFLOP/s of the compiled training kernels on the reference host (2-core Cascade Lake VM):
# bench/results/train_step.json layer_ms.edgert_fwd_bwd = 131.97 ms for one MiniLM layer at
# B=8, T=128, whose fwd+bwd matmul work is 3 x 3.825 GFLOP (see `bert_costs`) -> 87 GFLOP/s.
# `host_gflops()` recomputes it from a bench file.
HOST_GFLOPS = 87.0
# Memory bandwidth for the parameter-sized traffic (dense gradients, accumulation, AdamW). Modelled,
# not measured: a typical figure for a small board's LPDDR4; pass a board's own figure if known.
HOST_MEM_GBPS = 10.0
# Bytes of parameter-sized traffic: per micro-batch the backward writes a dense gradient and
# `grad_accumulate` reads it and read-modify-writes the accumulator (4 x); per optimizer step
# AdamW reads weight, grad, m, v and writes weight, m, v (7 x), shared by the step's micro-batches.
GRAD_TRAFFIC, ADAM_TRAFFIC = 4, 7




@dataclass(frozen=True, slots=True)
class LayerCost:
    """One unit of the model (embeddings, an encoder layer, or the head) for one micro-batch.

    flops:       forward + backward FLOPs (matmuls; a train step is ~3 x the forward)
    split_flops: the part of `flops` a head split can move to a second processor (the fused QKV
                 projection and the attention core, which run per head; see
                 compiler/kernels/attention.py)
    param_bytes: parameters (x4 on the board: weights, gradients, Adam m and v)
    saved_bytes: tensors the forward saves for the backward (held per in-flight micro-batch)
    out_bytes:   the forward's output (what crosses a link; the gradient coming back is as big)
    """

    name: str
    flops: float
    param_bytes: int
    saved_bytes: int
    out_bytes: int
    split_flops: float = 0.0
    heads: int = 0


@dataclass(frozen=True, slots=True)
class ModelCosts:
    """Units [embeddings, layer 0 .. L-1, head] + what every stage saves once (the float mask)."""

    units: tuple[LayerCost, ...]
    stage_saved_bytes: int = 0
    what: str = ""

    @property
    def layers(self) -> int:
        return len(self.units) - 2


def _nbytes(shape: tuple[int, ...], itemsize: int = 4) -> int:
    return math.prod(shape) * itemsize


def bert_costs(dims: ModelDims, batch: int, seq: int, dtype_bytes: int = 4,
               split_qkv: bool = True) -> ModelCosts:
    """Costs of a BERT classifier from its shapes, matching what compiler/stage.py builds and saves.

    Saved tensors per layer (`StageGraph._layer_fwd`): x, qkv, probs [B,H,T,T], ctx, xhat1, rstd1,
    h1, u, g, xhat2, rstd2; embeddings: ids, tt (int64), xhat, rstd; head: cls, pooled, pooled_d,
    probs, labels (int64); every stage: maskf [B,T]. Outputs: hidden [B*T, D], or loss + logits.
    `split_qkv`: a head split also moves those heads' QKV projection columns (else only the
    attention core, as edgert/head_split's two-backend split does).
    """
    B, T, D, F, H, C = batch, seq, dims.hidden, dims.ffn, dims.heads, dims.num_labels
    M, f = B * T, dtype_bytes

    def params(table) -> int:
        return sum(_nbytes(fn(dims), f) for _, fn in table)

    emb_saved = 2 * _nbytes((B, T), 8) + _nbytes((M, D), f) + _nbytes((M,), f)
    layer_saved = (5 * _nbytes((M, D), f)          # x, ctx, xhat1, h1, xhat2
                   + _nbytes((M, 3 * D), f)        # qkv
                   + _nbytes((B, H, T, T), f)      # probs
                   + 2 * _nbytes((M,), f)          # rstd1, rstd2
                   + 2 * _nbytes((M, F), f))       # u, g
    head_saved = 3 * _nbytes((B, D), f) + _nbytes((B, C), f) + _nbytes((B,), 8)
    hidden_out = _nbytes((M, D), f)
    head_out = _nbytes((1,), f) + _nbytes((B, C), f)
    # Forward matmul FLOPs (as bench/torch_baseline.count_flops); fwd + bwd = 3 x forward.
    qkv, attn = 2 * M * D * 3 * D, 2 * (2 * B * T * T * D)
    layer_fwd = qkv + attn + 2 * M * D * D + 2 * (2 * M * D * F)
    split = attn + (qkv if split_qkv else 0)
    head_fwd = 2 * B * D * D + 2 * B * D * C
    units = (
        LayerCost("embeddings", 0.0, params(EMBED_PARAMS), emb_saved, hidden_out),
        *(LayerCost(f"layer{i}", 3.0 * layer_fwd, params(LAYER_PARAMS), layer_saved, hidden_out,
                    split_flops=3.0 * split, heads=H) for i in range(dims.layers)),
        LayerCost("head", 3.0 * head_fwd, params(HEAD_PARAMS), head_saved, head_out),
    )
    return ModelCosts(units, stage_saved_bytes=_nbytes((B, T), f),
                      what=f"BERT L={dims.layers} D={D} H={H} F={F}, micro-batch {B} x {T}, "
                           f"{8 * f}-bit")


def host_gflops(bench: dict, dims: ModelDims, batch: int = 8, seq: int = 128) -> float:
    """Sustained GFLOP/s from a bench/results/train_step.json dict (its layer fwd+bwd time)."""
    ms = float(bench["layer_ms"]["edgert_fwd_bwd"])
    return bert_costs(dims, batch, seq).units[1].flops / (ms * 1e6)


# ---- boards and links ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BoardSpec:
    """What the planner knows about one board (not the board daemon, edgert/board.py).

    budget_bytes: memory a stage may use (None: unlimited)
    gflops, mem_gbps: modelled speed (compute; parameter-sized memory traffic). A board throttled to
                 1/4 speed has gflops / 4 (FTPipeHD's computing-power ratio cp = 4).
    unit_ms:     measured fwd + bwd ms per micro-batch of every unit [embeddings, layers.., head] on
                 this board; when given it replaces the model (it should include everything).
    accel_gflops: a second processor (e.g. the board's GPU) that can take some attention heads of
                 every layer (the QKV projection columns and attention core of those heads) while
                 the CPU does the rest; the planner picks the head count that minimises layer time.
    accel_sync_ms: per-layer cost of a head split (moving q/k/v columns and ctx between processors).
    """

    name: str
    budget_bytes: int | None = None
    gflops: float = HOST_GFLOPS
    mem_gbps: float = HOST_MEM_GBPS
    unit_ms: tuple[float, ...] | None = None
    accel_gflops: float | None = None
    accel_sync_ms: float = 0.0

    def unit_times(self, costs: ModelCosts, n_micro: int) -> tuple[list[float], list[int]]:
        """(ms, heads moved to the accelerator) per unit."""
        if self.unit_ms is not None and len(self.unit_ms) != len(costs.units):
            raise ConfigError(
                f"board {self.name}: unit_ms has {len(self.unit_ms)} entries, the model has "
                f"{len(costs.units)} units (embeddings, {costs.layers} layers, head)")
        ms, heads = [], []
        for u, c in enumerate(costs.units):
            if self.unit_ms is not None:
                t = float(self.unit_ms[u])
                cpu_split = t * (c.split_flops / c.flops) if c.flops > 0 else 0.0
            else:
                traffic = c.param_bytes * (GRAD_TRAFFIC + ADAM_TRAFFIC / n_micro)
                t = c.flops / (self.gflops * 1e6) + traffic / (self.mem_gbps * 1e6)
                cpu_split = c.split_flops / (self.gflops * 1e6)
            h_best = 0
            if self.accel_gflops and c.heads and c.split_flops > 0:
                serial = t - cpu_split
                acc_split = c.split_flops / (self.accel_gflops * 1e6)
                for h in range(1, c.heads + 1):
                    th = (serial + max(cpu_split * (c.heads - h), acc_split * h) / c.heads
                          + self.accel_sync_ms)
                    if th < t:
                        t, h_best = th, h
            ms.append(t)
            heads.append(h_best)
        return ms, heads


@dataclass(frozen=True, slots=True)
class Links:
    """Bandwidth (bytes/s) and latency (s) between boards, indexed like the `boards` list given to
    `plan`; scalars apply to every pair; bandwidth None = free links."""

    bandwidth: float | Sequence[Sequence[float]] | None = None
    latency_s: float | Sequence[Sequence[float]] = 0.0

    def time_ms(self, a: int, b: int, nbytes: int) -> float:
        """Activation forward + its gradient back (FTPipeHD's 2 x out_size / bw), plus latency."""
        bw = self.bandwidth[a][b] if hasattr(self.bandwidth, "__getitem__") else self.bandwidth
        lat = self.latency_s[a][b] if hasattr(self.latency_s, "__getitem__") else self.latency_s
        t = 0.0 if bw is None or math.isinf(bw) else 2 * nbytes / bw
        return 1e3 * (t + 2 * lat)


def in_flight(stage: int, n_stages: int, n_micro: int, schedule: str = "1f1b") -> int:
    """Micro-batches whose activations a stage holds at once (= edgert.schedule.max_in_flight)."""
    if schedule == "1f1b":
        return min(n_stages - stage, n_micro)
    if schedule == "gpipe":
        return n_micro
    raise ConfigError(f"schedule {schedule!r}: the planner models '1f1b' and 'gpipe'")
