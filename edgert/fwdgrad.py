"""Board side of forward-gradient (FwdLLM-style) training: perturbed inferences, scalars out.

A board that is a forward-gradient client holds one whole-model bundle (a single stage) and its own
shard of the training data. Each round the controller sends the current trainable values, a list of
perturbation seeds and epsilon; for every seed the board regenerates the perturbation v (so
perturbations travel as seeds, never as tensors), evaluates the mean loss over its local batches at
theta + eps v and theta - eps v, and returns the central difference

    d = (L(theta + eps v) - L(theta - eps v)) / (2 eps)      (one float per seed)

No backward pass, no gradients, no optimizer state: the controller (control/fwdgrad.py) forms the
estimate mean_i d_i v_i, aggregates the clients and updates. Needs numpy and TVM's runtime only.

[Note: perturbation from seed] `perturbation(seed, n)` is the one definition of the perturbation of
a seed over the flat trainable vector (trainable tensors in the order the request names them,
each flattened in C order). The controller and every board call this same function.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edgert.errors import BoardError


def perturbation(seed: int, n: int) -> np.ndarray:
    """The perturbation v ~ N(0, I_n) of `seed`, float32 (see [Note: perturbation from seed]).

    >>> v = perturbation(7, 5)
    >>> bool(np.array_equal(v, perturbation(7, 5))), v.dtype.name
    (True, 'float32')
    """
    return np.random.default_rng(int(seed)).standard_normal(int(n), dtype=np.float32)


class ForwardClient:
    """Perturbed-loss evaluation on one loaded whole-model stage (edgert.runtime.TvmStage)."""

    def __init__(self, stage: Any) -> None:
        m = stage.manifest
        if not (m.is_first and m.is_last):
            raise BoardError(f"fwdgrad needs a whole-model bundle (stage 0 of 1), got stage "
                             f"{m.index} of {m.stage['num_stages']}; compile it with --stages 1")
        self.stage = stage
        self.index = {t.name: i for i, t in enumerate(m.params)}
        self.batch = int(m.stage["batch"])
        self.seq = int(m.stage["seq"])
        # the bundle's data inputs, in order: BERT input_ids, token_type_ids, attention_mask,
        # labels [B]; a decoder input_ids, attention_mask, labels [B, T]
        self.data_names = [t.name for t in m.data_inputs]
        self.shard: dict[str, np.ndarray] | None = None
        self.evals = 0                        # forward passes run

    # ---- data -----------------------------------------------------------------------------------
    def set_shard(self, arrays: Mapping[str, np.ndarray]) -> int:
        """Keep this client's training shard (rows = sentences); returns its row count."""
        need = [k for k in self.data_names if k != "token_type_ids"]
        missing = [k for k in need if k not in arrays]
        if missing:
            raise BoardError(f"fwdgrad shard: missing tensors {missing}; this bundle takes "
                             f"{', '.join(self.data_names)} (token_type_ids optional)")
        ids = np.asarray(arrays["input_ids"])
        n = ids.shape[0]
        if ids.ndim != 2 or ids.shape[1] != self.seq or n < self.batch:
            raise BoardError(f"fwdgrad shard: input_ids has shape {ids.shape}; the bundle takes "
                             f"sequences of {self.seq} tokens and at least {self.batch} rows")
        shard = {k: np.asarray(arrays[k]) for k in need}
        if "token_type_ids" in self.data_names:
            tt = arrays.get("token_type_ids")
            shard["token_type_ids"] = np.zeros_like(ids) if tt is None else np.asarray(tt)
        for k, a in shard.items():
            if a.shape[0] != n:
                raise BoardError(f"fwdgrad shard: {k} has {a.shape[0]} rows, input_ids {n}")
        self.shard = {k: np.ascontiguousarray(a, np.int64) for k, a in shard.items()}
        return n

    def _batches(self, rows: Sequence[int]) -> list[dict[str, np.ndarray]]:
        if self.shard is None:
            raise BoardError("fwdgrad round: this board has no data shard; send op 'shard' first")
        n = self.shard["input_ids"].shape[0]
        idx = np.asarray(rows, np.int64)
        if (idx.ndim != 1 or len(idx) == 0 or len(idx) % self.batch or idx.min() < 0
                or idx.max() >= n):
            raise BoardError(f"fwdgrad round: rows must be a non-empty multiple of the batch size "
                             f"{self.batch} of indices in [0, {n}), got {len(idx)} rows")
        return [{k: a[idx[i:i + self.batch]] for k, a in self.shard.items()}
                for i in range(0, len(idx), self.batch)]

    # ---- evaluation -----------------------------------------------------------------------------
    def loss(self, batches: list[dict[str, np.ndarray]]) -> float:
        """Mean loss over full batches at the current parameters, dropout off."""
        total = 0.0
        for b in batches:
            lossv, _ = self.stage.loss([b[k] for k in self.data_names])     # stage_loss: no saved activations
            total += float(np.from_dlpack(lossv)[0])
            self.evals += 1
        return total / len(batches)

    def _views(self, names: Sequence[str]) -> list[np.ndarray]:
        unknown = [n for n in names if n not in self.index]
        if unknown:
            raise BoardError(f"fwdgrad: {unknown[:3]} are not parameters of this bundle; name "
                             f"trainable tensors as in its manifest")
        # Writable views of the resident tensors: writing them changes what the next forward reads.
        return [np.from_dlpack(self.stage.params[self.index[n]]) for n in names]

    def set_values(self, values: Mapping[str, np.ndarray]) -> None:
        """Write trainable values into the resident parameters (shape-checked)."""
        views = self._views(list(values))
        for (name, a), view in zip(values.items(), views, strict=True):
            if tuple(np.shape(a)) != view.shape:
                raise BoardError(f"fwdgrad: {name} has shape {np.shape(a)}, the bundle "
                                 f"{view.shape}")
            view[...] = a

    def round(self, names: Sequence[str], seeds: Sequence[int], eps: float,
              rows: Sequence[int]) -> dict[str, Any]:
        """Directional derivatives of the local loss along each seed's perturbation.

        Returns {"derivs": [d_i], "loss": mean of the 2k perturbed losses, "seconds"}; the
        parameters are restored to their values before the call.
        """
        if not (isinstance(eps, float | int) and eps > 0):
            raise BoardError(f"fwdgrad round: eps must be a number > 0, got {eps!r}")
        t0 = time.perf_counter()
        batches = self._batches(rows)
        views = self._views(names)
        base = [v.copy() for v in views]
        sizes = [v.size for v in views]
        bounds = np.cumsum([0, *sizes])
        derivs, losses = [], []
        try:
            for s in seeds:
                v = perturbation(int(s), int(bounds[-1]))
                lp = []
                for sign in (1.0, -1.0):
                    for view, b0, a, z in zip(views, base, bounds[:-1], bounds[1:], strict=True):
                        # theta +- eps v in float64, rounded once to the parameter dtype
                        view[...] = (b0 + sign * eps * v[a:z].astype(np.float64).reshape(b0.shape))
                    lp.append(self.loss(batches))
                derivs.append((lp[0] - lp[1]) / (2.0 * eps))
                losses += lp
        finally:
            for view, b0 in zip(views, base, strict=True):
                view[...] = b0
        return {"derivs": derivs, "loss": float(np.mean(losses)) if losses else float("nan"),
                "seconds": time.perf_counter() - t0, "evals": 2 * len(seeds) * len(batches)}


def serve_request(client: ForwardClient | None, body: Mapping[str, Any],
                  arrays: Mapping[str, np.ndarray], load: Any) -> tuple[ForwardClient | None,
                                                                          dict[str, Any]]:
    """One FWDGRAD request on a board: returns (the client afterwards, the reply body).

    ops: "load" {bundle} -> loads a whole-model bundle with `load(bundle)` (no optimizer state);
    "shard" + tensors -> keeps the client's data; "round" {names, seeds, eps, rows} + the
    trainable tensors (the global values to evaluate at) -> {derivs, loss, seconds, evals}.
    """
    op = body.get("op")
    if op == "load":
        client = ForwardClient(load(body.get("bundle")))
        return client, {"params": len(client.index), "batch": client.batch, "seq": client.seq}
    if client is None:
        raise BoardError(f"fwdgrad {op!r}: no forward-gradient model loaded; send op 'load' first")
    if op == "shard":
        return client, {"rows": client.set_shard(arrays)}
    if op == "round":
        names, seeds = body.get("names"), body.get("seeds")
        if not isinstance(names, list) or not isinstance(seeds, list) or not all(
                type(s) is int for s in seeds):
            raise BoardError("fwdgrad round: body needs 'names' (trainable tensor names) and "
                             "'seeds' (a list of integers)")
        missing = [n for n in names if n not in arrays]
        if missing:
            raise BoardError(f"fwdgrad round: send the value of every trainable tensor; missing "
                             f"{missing[:3]} ({len(missing)} in all)")
        client.set_values({n: arrays[n] for n in names})
        return client, client.round(names, seeds, body.get("eps"), body.get("rows", []))
    raise BoardError(f"fwdgrad: op {op!r} is not served; use 'load', 'shard' or 'round'")
