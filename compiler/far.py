"""FAR (freeze and reconfigure): rank FFN nodes after priming, select learners, regroup weights.

Pure numpy (no TVM): the selection and the weight layout, both ways. Node n of layer l's FFN is
row n of `intermediate.dense.weight` [F, D] with entry n of its bias, and column n of
`output.dense.weight` [D, F]. `reconfigure` permutes each layer's nodes so the learners come first
and splits the three tensors into learner and frozen parts (names in model_spec.FAR_SPLIT);
`restore` is its exact inverse (concatenation, inverse permutation), used before export.
See docs/far.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from compiler.model_spec import FAR_SPLIT, StageSpec
from edgert.errors import ConfigError

_W_IN, _B_IN, _W_OUT = "intermediate.dense.weight", "intermediate.dense.bias", "output.dense.weight"
_AXIS = {_W_IN: 0, _B_IN: 0, _W_OUT: 1}   # the FFN-node axis of each dense tensor


@dataclass(frozen=True, slots=True)
class FarPlan:
    """Per layer, the FFN-node order with the `learners` learner nodes first.

    Examples
    --------
    >>> plan = FarPlan(2, {0: (3, 1, 0, 2)})
    >>> plan.learner_nodes(0)
    (3, 1)
    """

    learners: int
    perms: dict[int, tuple[int, ...]]
    # Parameters frozen besides the FFN nodes' frozen parts (FarConfig.freeze_embeddings: the
    # embeddings); each stage freezes those it owns (far_spec).
    freeze: tuple[str, ...] = ()

    def __post_init__(self):
        for li, p in self.perms.items():
            if sorted(p) != list(range(len(p))):
                raise ConfigError(f"FAR plan: layer {li}'s order is not a permutation of "
                                  f"0..{len(p) - 1}")
            if not 0 < self.learners < len(p):
                raise ConfigError(f"FAR plan: {self.learners} learners of {len(p)} FFN nodes; "
                                  f"the learner count must be in 1..{len(p) - 1}")

    def learner_nodes(self, layer: int) -> tuple[int, ...]:
        return self.perms[layer][:self.learners]

    def to_dict(self) -> dict:
        """JSON form (far_plan.json, a checkpoint's meta "far")."""
        d: dict = {"learners": self.learners,
                   "perms": {str(k): list(v) for k, v in self.perms.items()}}
        if self.freeze:
            d["freeze"] = list(self.freeze)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FarPlan:
        perms = {int(k): tuple(int(x) for x in v) for k, v in d["perms"].items()}
        return cls(int(d["learners"]), perms, tuple(str(n) for n in d.get("freeze", ())))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> FarPlan:
        return cls.from_dict(json.loads(Path(path).read_text()))


def learner_count(ffn: int, retention: float, align: int = 1) -> int:
    """round(retention * ffn) learners, rounded to a multiple of `align` (GEMM-friendly widths).

    >>> learner_count(1536, 0.4), learner_count(1536, 0.4, align=16)
    (614, 608)
    """
    if not 0 < retention < 1:
        raise ConfigError(f"FAR retention must be in (0, 1) (learner nodes / all nodes), "
                          f"got {retention}")
    r = round(retention * ffn / align) * align
    return min(max(r, align, 1), ffn - 1)


def node_scores(before: dict[str, np.ndarray], after: dict[str, np.ndarray],
                layers: range | list[int]) -> dict[int, np.ndarray]:
    """Per layer, the L1 norm of each FFN node's weight change over priming ([F] float64)."""
    out = {}
    for li in layers:
        pre = f"encoder.layer.{li}."
        d = {n: np.abs(np.asarray(after[pre + n], np.float64)
                       - np.asarray(before[pre + n], np.float64)) for n in _AXIS}
        out[li] = d[_W_IN].sum(axis=1) + d[_B_IN] + d[_W_OUT].sum(axis=0)
    return out


def select(scores: dict[int, np.ndarray], learners: int, how: str = "l1", seed: int = 0,
           freeze: tuple[str, ...] = ()) -> FarPlan:
    """The plan keeping the `learners` top-scoring nodes per layer ("l1"), or random ones
    ("random", the paper's control; seeded). Ties go to the lower node index; each group stays in
    node order. `freeze`: other parameters the plan freezes (FarPlan.freeze)."""
    if how not in ("l1", "random"):
        raise ConfigError(f"FAR selection must be 'l1' or 'random', got {how!r}")
    perms = {}
    for li, s in sorted(scores.items()):
        f = len(s)
        if how == "l1":
            top = np.argsort(-np.asarray(s), kind="stable")[:learners]
        else:
            top = np.random.default_rng([seed, li]).permutation(f)[:learners]
        keep = np.sort(top)
        rest = np.setdiff1d(np.arange(f), keep)
        perms[li] = tuple(int(x) for x in np.concatenate([keep, rest]))
    return FarPlan(learners, perms, tuple(freeze))


def reconfigure(tensors: dict[str, np.ndarray], plan: FarPlan,
                prefix: str = "") -> dict[str, np.ndarray]:
    """Dense layout -> FAR layout (learner/frozen parts) for every layer in the plan.

    Works on weights and on per-parameter state keyed `prefix + name` (e.g. AdamW moments "m/").
    Layers absent from `tensors` are skipped (a pipeline stage holds only some)."""
    out = dict(tensors)
    for li, perm in plan.perms.items():
        pre = f"{prefix}encoder.layer.{li}."
        if pre + _W_IN not in out:
            continue
        p = np.asarray(perm)
        for n, axis in _AXIS.items():
            t = np.take(np.asarray(out.pop(pre + n)), p, axis=axis)
            lo, hi = np.split(t, [plan.learners], axis=axis)
            learn, frozen = FAR_SPLIT[n]
            out[pre + learn], out[pre + frozen] = np.ascontiguousarray(lo), np.ascontiguousarray(hi)
    return out


def restore(tensors: dict[str, np.ndarray], plan: FarPlan,
            prefix: str = "") -> dict[str, np.ndarray]:
    """FAR layout -> dense layout (the exact inverse of `reconfigure`)."""
    out = dict(tensors)
    for li, perm in plan.perms.items():
        pre = f"{prefix}encoder.layer.{li}."
        if pre + FAR_SPLIT[_W_IN][0] not in out:
            continue
        inv = np.argsort(np.asarray(perm))
        for n, axis in _AXIS.items():
            learn, frozen = FAR_SPLIT[n]
            t = np.concatenate([out.pop(pre + learn), out.pop(pre + frozen)], axis=axis)
            out[pre + n] = np.ascontiguousarray(np.take(t, inv, axis=axis))
    return out


def far_spec(spec: StageSpec, plan: FarPlan, freeze: tuple[str, ...] = ()) -> StageSpec:
    """The reconfigured version of a stage: FAR-split FFNs with their frozen parts frozen, plus any
    of `freeze` and `plan.freeze` (e.g. the embeddings) that this stage owns."""
    freeze = (*plan.freeze, *freeze)
    frozen = [f"encoder.layer.{li}.{FAR_SPLIT[n][1]}" for li in range(spec.first, spec.last)
              for n in _AXIS]
    if spec.has_embeddings:
        frozen += [n for n in freeze if n.startswith("embeddings.")]
    if spec.has_head:
        frozen += [n for n in freeze if n.startswith(("pooler.", "classifier."))]
    return replace(spec, ffn_learners=plan.learners,
                   frozen=tuple(sorted(set(spec.frozen) | set(frozen))))
