"""The forward-gradient server and its round loop (`edgert fwdgrad`, `edgert lm --fwdgrad`).

`FwdGradRun` holds the server state and runs one round: it asks the clients
(control/federated.py) for directional derivatives along seeded perturbations, aggregates them
(control/fwdgrad.py) and steps SGD. `drive` is the one round loop every forward-gradient job uses,
with events, checkpoints and resume. (Backprop jobs step through control/loop.py instead.)

The server state of a forward-gradient run is small: the trainable values (ServerSGD's float64
theta), the SGD momentum buffer, the previous round's global estimate (the cosine sampler's
reference direction) and the number of rounds done. Everything else -- each round's seeds
(`draw_seeds(run_seed, round, client, k)`), each client's rows (seeded epoch orders), the shards --
is derived from the run's seeds, so a run resumed from a checkpoint continues exactly as the
uninterrupted run would (tests/integration/test_fwdgrad_run.py checks it bitwise).

A checkpoint (control/checkpoint.py: atomic, sha256-verified, `latest` falls back to the previous
one when the newest is corrupt) stores the three flat float64 vectors as one "stage":
``theta``, ``m/theta`` (momentum buffer) and ``v/theta`` (previous estimate), and in meta.json the
trainable names and shapes, the run's settings (a resume with other settings is refused), the
per-round logs and the held-out curve so far.

Events (control/events.py, the schema the dashboard and run reports read) go to
``<out>/events.jsonl``: ``state`` (starting/running/finished, total_steps = rounds), ``plan``
(mode "fwdgrad", the clients, reason "start" or "resume"), one ``step`` per round (step = rounds
done, loss = the clients' mean perturbed training loss, step_s, seq_per_s = training examples per
second, lr, plus k, passes, rel_var, bytes_down, bytes_up), ``eval`` (held-out loss/accuracy at
round 0, every eval_every rounds and at the end), ``board`` (each board's RSS after every round,
board clients only) and ``checkpoint``.

Examples
--------
>>> drive(srv, rounds=20, events=EventLog(out / "events.jsonl"), evaluate=ev,     # doctest: +SKIP
...       ckpt_root=out / "checkpoints", checkpoint_every=5, settings={"seed": 0})
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from control import checkpoint
from control.events import EventLog
from control.fwdgrad import FwdGradConfig, ServerSGD, flatten, gather, unflatten
from edgert.errors import ConfigError

KIND = "fwdgrad"


def _rows(n: int, per_round: int, round_: int, seed: int, client: int) -> list[int]:
    """The shard rows a client uses in a round: consecutive slices of seeded epoch orders."""
    out: list[int] = []
    pos = round_ * per_round
    while len(out) < per_round:
        epoch, off = divmod(pos, n)
        order = np.random.default_rng([seed, client, epoch]).permutation(n)
        take = min(per_round - len(out), n - off)
        out += order[off:off + take].tolist()
        pos += take
    return out


@dataclass
class RoundLog:
    """What one round did (one `step` event each)."""

    round: int
    k: int                        # perturbations per client
    passes: int
    rel_var: float
    loss: float                   # mean perturbed training loss (weighted over clients)
    seconds: float
    bytes_down: int               # bytes, controller -> boards
    bytes_up: int                 # bytes, boards -> controller


@dataclass
class FwdGradRun:
    """The server: global trainable values, the previous gradient (for the sampler), SGD."""

    clients: Any                  # control.federated: InProcessClients | BoardClients
    names: list[str]
    values: dict[str, np.ndarray]         # trainable tensors, float32, by name
    cfg: FwdGradConfig
    rows_per_round: int = 8
    log: list[RoundLog] = field(default_factory=list)
    prev: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.values = {n: np.array(self.values[n], np.float32) for n in self.names}
        self.opt = ServerSGD(flatten(self.values, self.names), self.cfg.lr, self.cfg.momentum)

    @property
    def n(self) -> int:
        return self.opt.theta.size

    def round(self, r: int) -> RoundLog:
        t0 = time.perf_counter()
        d0, u0 = self.clients.bytes_down, self.clients.bytes_up
        sizes = self.clients.sizes
        rows = [_rows(n, self.rows_per_round, r, self.cfg.seed, c) for c, n in enumerate(sizes)]
        losses: list[tuple[float, float]] = []

        def evaluate(seeds_per_client: list[list[int]]) -> list[list[float]]:
            res = self.clients.evaluate(self.values, self.names, seeds_per_client, self.cfg.eps,
                                        rows)
            losses.extend((x["loss"], w) for x, w in zip(res, sizes, strict=True) if x["derivs"])
            return [list(x["derivs"]) for x in res]

        got = gather(evaluate, [float(s) for s in sizes], self.n, self.cfg, r, self.prev)
        g = got.gradient
        self.prev = g
        theta = self.opt.step(g)
        self.values = unflatten(theta, self.values, self.names)
        loss = sum(lo * w for lo, w in losses) / sum(w for _, w in losses)
        rec = RoundLog(r, got.k, got.passes, got.estimate.relative_variance(), loss,
                       time.perf_counter() - t0, self.clients.bytes_down - d0,
                       self.clients.bytes_up - u0)
        self.log.append(rec)
        return rec


def save(root: Path | str, srv: FwdGradRun, rounds_done: int, settings: dict[str, Any],
         curve: list[dict[str, Any]], keep: int = 2) -> checkpoint.Checkpoint:
    """Checkpoint the server state after `rounds_done` rounds (see the module docstring)."""
    prev = srv.prev if srv.prev is not None else np.full(srv.n, np.nan)
    meta = {"kind": KIND, "round": rounds_done, "names": list(srv.names),
            "shapes": [list(np.shape(srv.values[n])) for n in srv.names],
            "has_prev": srv.prev is not None, "settings": settings,
            "log": [asdict(x) for x in srv.log], "curve": curve}
    return checkpoint.write(root, rounds_done, [["theta"]], {"theta": srv.opt.theta},
                            {"m/theta": srv.opt.buf, "v/theta": np.asarray(prev, np.float64)},
                            meta, keep=keep)


def restore(srv: FwdGradRun, ck: checkpoint.Checkpoint, settings: dict[str, Any]
            ) -> tuple[int, list[dict[str, Any]]]:
    """Load checkpoint `ck` into `srv`; return (rounds done, held-out curve so far).

    Raises ConfigError when the checkpoint is not a forward-gradient one or belongs to a run with
    other trainable tensors or settings."""
    meta = ck.meta
    where = f"checkpoint {ck.path}"
    if meta.get("kind") != KIND:
        raise ConfigError(f"{where} is not a forward-gradient checkpoint: use another --out "
                          f"directory (or pass resume=False / --no-resume to start afresh)")
    if meta.get("names") != list(srv.names):
        raise ConfigError(f"{where} trains other tensors ({len(meta.get('names', []))} names) than "
                          f"this run ({len(srv.names)}, method changed?): use another --out "
                          f"directory or --no-resume")
    old = meta.get("settings", {})
    diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if diff:
        raise ConfigError(f"{where} was written by a run with other settings ({', '.join(diff)}): "
                          f"resume with the same settings, or use another --out / --no-resume")
    params, opt = ck.load(dense=False)
    theta = np.asarray(params["theta"], np.float64)
    if theta.shape != srv.opt.theta.shape:
        raise ConfigError(f"{where} holds {theta.size} trainable values, this run {srv.n}")
    srv.opt.theta = theta.copy()
    srv.opt.buf = np.asarray(opt["m/theta"], np.float64).copy()
    srv.prev = np.asarray(opt["v/theta"], np.float64).copy() if meta["has_prev"] else None
    srv.values = unflatten(srv.opt.theta, srv.values, srv.names)
    srv.log = [RoundLog(**x) for x in meta.get("log", [])]
    return int(meta["round"]), list(meta.get("curve", []))


def drive(srv: FwdGradRun, *, rounds: int, events: EventLog,
          evaluate: Callable[[dict[str, np.ndarray]], dict[str, float]],
          ckpt_root: Path | str | None, checkpoint_every: int = 5, resume: bool = True,
          eval_every: int = 0, settings: dict[str, Any] | None = None,
          board_stats: Callable[[], list[dict[str, Any]]] | None = None,
          progress: bool | Callable[[int, RoundLog], None] = False,
          client_names: list[str] | None = None) -> list[dict[str, Any]]:
    """Run rounds up to `rounds` (continuing from the newest good checkpoint under `ckpt_root`
    with `resume`), emitting events and checkpointing every `checkpoint_every` rounds and at the
    end; return the held-out curve [{round, seconds, **evaluate(values)}, ...].

    `evaluate(values)` is the held-out evaluation (plain numbers); `board_stats()` returns one
    {name, rss_mib, peak_rss_mib} per board (None: in-process clients, no board events);
    `settings` (plain JSON values) must equal the checkpoint's for a resume; `progress`: a line
    per round on stderr, or `progress(round, log)` after each round.
    """
    if checkpoint_every < 0:
        raise ConfigError(f"checkpoint_every must be >= 0 rounds (0 = never), got "
                          f"{checkpoint_every}")
    settings = json.loads(json.dumps(settings or {}))     # as meta.json will hold them
    start, curve = 0, []
    ck = checkpoint.latest(ckpt_root, warn=lambda t: events.emit("alert", level="warning", text=t)
                           ) if (resume and ckpt_root is not None) else None
    if ck is not None:
        start, curve = restore(srv, ck, settings)
        events.emit("alert", level="info", text=f"resumed from {ck.path} after round {start}")
    events.emit("state", state="starting", step=start, total_steps=rounds)
    names = client_names or [f"client{c}" for c in range(len(srv.clients.sizes))]
    events.emit("plan", mode=KIND, boards=names,
                reason="resume" if ck is not None else "start", micro_batches=1,
                shard_sizes=list(srv.clients.sizes), trainable=srv.n)
    events.emit("state", state="running", step=start, total_steps=rounds)
    train_s = curve[-1]["seconds"] if curve else 0.0
    if not curve and rounds > 0:
        ev = evaluate(srv.values)
        curve.append({"round": 0, "seconds": 0.0, **ev})
        events.emit("eval", step=0, **ev)
    examples = srv.rows_per_round * len(srv.clients.sizes)
    for r in range(start, rounds):
        rec = srv.round(r)
        train_s += rec.seconds               # rounds only: held-out evaluation is not counted
        events.emit("step", step=r + 1, loss=rec.loss, step_s=rec.seconds,
                    seq_per_s=examples / rec.seconds if rec.seconds > 0 else None,
                    lr=srv.opt.lr, k=rec.k, passes=rec.passes, rel_var=rec.rel_var,
                    bytes_down=rec.bytes_down, bytes_up=rec.bytes_up, total_steps=rounds)
        for b in (board_stats() if board_stats else []):
            events.emit("board", stage=0, alive=True, **b)
        if r + 1 == rounds or (eval_every and (r + 1) % eval_every == 0):
            ev = evaluate(srv.values)
            curve.append({"round": r + 1, "seconds": train_s, **ev})
            events.emit("eval", step=r + 1, **ev)
        if ckpt_root is not None and checkpoint_every and (
                (r + 1) % checkpoint_every == 0 or r + 1 == rounds):
            t0 = time.perf_counter()
            c = save(ckpt_root, srv, r + 1, settings, curve)
            events.emit("checkpoint", step=r + 1, path=str(c.path),
                        seconds=time.perf_counter() - t0)
        if callable(progress):
            progress(r, rec)
        elif progress:
            print(f"  round {r + 1}/{rounds}: k {rec.k} x {len(srv.clients.sizes)}, loss "
                  f"{rec.loss:.4f}, rel.var {rec.rel_var:.0f}, {rec.seconds:.1f}s", file=sys.stderr)
    events.emit("state", state="finished", step=max(start, rounds), total_steps=rounds)
    return curve
