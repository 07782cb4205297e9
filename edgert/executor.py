"""Interprets one board's schedule timeline for one step against a Stage and a send function.

The schedule (edgert/schedule.py) is the only description of the pipeline: this module walks the
board's own timeline in order and never re-derives it. It is a resumable state machine rather than
a blocking loop: `StepRun.advance(inbox)` runs actions until one needs a message that has not
arrived (an ACT, a GRAD or a BATCH), then returns, so the board's single event loop keeps serving
heartbeats and requests while it waits, and a unit test can drive K boards in one thread.

    F mb        inputs: the activation ("hidden", edgert.contract.ACTIVATION) from the previous
                stage's ACT (RECV_F), the rest from BATCH;
                the last stage keeps the loss
    SEND_F mb   ACT(step, mb) {"hidden"} to the next board
    B mb        dout: GRAD from the next board (RECV_B), or the loss scale 1/M on the last stage;
                gradients accumulated with stage.accumulate in B order (= micro-batch order)
    SEND_B mb   GRAD(step, mb) {"hidden"} to the previous board
    STEP        stage.optimizer_step with the controller's hyper vector

[Note: seeds and hyper-parameters come from the controller]
The dropout seed vector of each micro-batch and AdamW's hyper vector are computed by the
controller (layouts and functions: edgert/contract.py, the same ones the single-process reference
uses) and sent in the STEP request, so a distributed step uses the numbers of the single-process
reference by construction, and the board owns no policy.

[Note: weight versions on a board] (async mode, schedule.async_1f1b)
Version v of the weights is the stage's live parameters until the STEP that makes v + 1. A STEP
first stashes a copy of the current parameters as version v if a later F or B of this step still
uses v, then updates in place. F and B of a version other than the newest run on its stash; a
stash is dropped after its last use, so at most 2 versions are live.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from edgert.contract import ACTIVATION
from edgert.errors import ScheduleError, TransportError
from edgert.protocol import Kind, Message
from edgert.schedule import Action, Op, format_grid
from edgert.transport import Peer

log = logging.getLogger(__name__)


class Stage(Protocol):
    """What the executor needs from a loaded stage (edgert.runtime.TvmStage satisfies it)."""

    manifest: Any               # .data_inputs (names), .is_first, .is_last, .dtype
    params: list[Any]

    def forward(self, data: list[Any], seed: np.ndarray) -> tuple[list[Any], list[Any]]: ...

    def backward(self, saved: list[Any], dout: Any, seed: np.ndarray
                 ) -> tuple[Any | None, list[Any]]: ...

    def accumulate(self, acc: list[Any], grads: list[Any]) -> list[Any]: ...

    def zeros_like_params(self) -> list[Any]: ...

    def optimizer_step(self, grads: list[Any], m: list[Any], v: list[Any],
                       hyper: np.ndarray) -> None: ...


Send = Callable[[Peer, Message], None]


def to_numpy(t: Any) -> np.ndarray:
    """A runtime tensor (DLPack) or array as a numpy view."""
    return t if isinstance(t, np.ndarray) else np.from_dlpack(t)


class Inbox:
    """ACT, GRAD and BATCH messages by (kind, step, mb), whatever order they arrive in."""

    KINDS = (Kind.ACT, Kind.GRAD, Kind.BATCH)

    def __init__(self) -> None:
        self._msgs: dict[tuple[Kind, int, int], Message] = {}

    def put(self, msg: Message) -> None:
        h = msg.header
        key = (h.kind, h.step, h.mb)
        if key in self._msgs:
            raise TransportError(f"duplicate {h.kind.value} for step {h.step} micro-batch "
                                 f"{h.mb}; the sender retried or the schedule is inconsistent")
        self._msgs[key] = msg

    def take(self, kind: Kind, step: int, mb: int) -> Message | None:
        return self._msgs.pop((kind, step, mb), None)

    def peek(self, kind: Kind, step: int, mb: int) -> Message | None:
        return self._msgs.get((kind, step, mb))

    def drop_before(self, step: int) -> int:
        """Forget messages of steps before `step` (after a failed step); returns how many."""
        old = [k for k in self._msgs if k[1] < step]
        for k in old:
            del self._msgs[k]
        return len(old)

    def __len__(self) -> int:
        return len(self._msgs)


@dataclass(frozen=True, slots=True)
class StepContext:
    """Where this board sits and whom it talks to; fixed from LOAD on."""

    stage: int
    n_stages: int
    n_mb: int                   # micro-batches per step request (async: the whole run)
    run: str = ""
    prev: Peer | None = None    # link to stage - 1
    next: Peer | None = None    # link to stage + 1
    group: int = 0              # micro-batches per optimizer update; 0 = n_mb (loss scale 1/group)
    keep_outputs: bool = False  # last stage: keep each F's outputs after the loss (e.g. logits)


@dataclass(frozen=True, slots=True)
class StepPlan:
    """One step's numbers from the controller. See [Note: seeds and hyper-parameters ...]."""

    step: int
    seeds: tuple[np.ndarray, ...]   # per micro-batch: the stage's int64 seed vector
    hyper: tuple[np.ndarray, ...]   # AdamW hyper vector of each STEP action, in order

    @classmethod
    def from_body(cls, step: int, body: dict[str, Any], n_mb: int) -> StepPlan:
        seeds, hyper = body.get("seeds"), body.get("hyper", [])
        if not isinstance(seeds, list) or len(seeds) != n_mb:
            raise ScheduleError(f"step {step}: body 'seeds' must list {n_mb} seed vectors (one "
                                f"per micro-batch), got {seeds!r}")
        if not isinstance(hyper, list):
            raise ScheduleError(f"step {step}: body 'hyper' must be a list of hyper vectors, "
                                f"one per STEP action")
        return cls(step, tuple(np.asarray(s, np.int64) for s in seeds),
                   tuple(np.asarray(h, np.float64) for h in hyper))


class OptimizerState:
    """AdamW moments of one stage, kept on the board across steps."""

    def __init__(self, stage: Stage) -> None:
        self.m = stage.zeros_like_params()
        self.v = stage.zeros_like_params()
        self.steps = 0
        self.stash: dict[int, list[Any]] = {}    # async: version -> parameters
        self.version = 0                         # async: newest version


@dataclass(slots=True)
class StepResult:
    step: int
    losses: dict[int, float] = field(default_factory=dict)   # mb -> loss (last stage only)
    compute_s: float = 0.0      # s in forward/backward/accumulate/optimizer
    wait_s: float = 0.0         # s blocked on messages (wall time between advance calls)
    seconds: float = 0.0        # s from start to done
    max_versions: int = 1       # weight versions held at once (async)
    outputs: dict[int, list[Any]] = field(default_factory=dict)  # mb -> outputs[1:] (keep_outputs)


class StepRun:
    """One step of one board's timeline; call `advance` whenever a message arrives."""

    def __init__(self, line: Sequence[Action | None], stage: Stage, opt: OptimizerState,
                 ctx: StepContext, plan: StepPlan, send: Send) -> None:
        self.actions = [(t, a) for t, a in enumerate(line) if a is not None]
        self.line = list(line)
        self.stage, self.opt, self.ctx, self.plan, self.send = stage, opt, ctx, plan, send
        self.pc = 0                                  # index into self.actions
        self.result = StepResult(plan.step)
        self._hidden: dict[int, np.ndarray] = {}     # mb -> received activation
        self._dout: dict[int, Any] = {}              # mb -> received output gradient
        self._saved: dict[int, list[Any]] = {}       # mb -> forward's saved tensors
        self._out: dict[int, Any] = {}               # mb -> tensor to SEND (act or grad)
        self._acc: list[Any] | None = None
        self._n_steps = 0                            # STEP actions run so far in this request
        self._t0 = time.perf_counter()
        self.blocked_on: str | None = None
        self.blocked_since = time.monotonic()

    @property
    def done(self) -> bool:
        return self.pc >= len(self.actions)

    @property
    def grads(self) -> list[Any] | None:
        """Gradients accumulated since the last STEP (a timeline without STEP: gradient checks)."""
        return self._acc

    def advance(self, inbox: Inbox) -> bool:
        """Run actions until one waits for a message; True once the whole timeline has run."""
        while not self.done:
            slot, a = self.actions[self.pc]
            try:
                t = time.perf_counter()
                ran = self._HANDLERS[a.op](self, a, inbox)
            except Exception:
                log.error("stage %d step %d: %s failed at slot %d\n%s", self.ctx.stage,
                          self.plan.step, a, slot, self.grid(slot))
                raise
            if not ran:
                if self.blocked_on is None:
                    self.blocked_since = time.monotonic()
                self.blocked_on = str(a)
                return False
            self.result.compute_s += time.perf_counter() - t
            self.blocked_on = None
            self.pc += 1
        self.result.seconds = time.perf_counter() - self._t0
        self.result.wait_s = max(0.0, self.result.seconds - self.result.compute_s)
        return True

    def grid(self, slot: int | None = None) -> str:
        if slot is None and not self.done:
            slot = self.actions[self.pc][0]
        return format_grid({self.ctx.stage: self.line}, error_step=slot)

    def fail_if_stuck(self, timeout: float, now: float) -> None:
        """Raise TransportError if blocked longer than `timeout` s on the same action."""
        if self.blocked_on is not None and now - self.blocked_since > timeout:
            raise TransportError(
                f"stage {self.ctx.stage} step {self.plan.step}: waited {timeout:.0f} s for the "
                f"message {self.blocked_on} needs; a neighbouring board is stuck or gone (check "
                f"its log and STATS)\n{self.grid()}")

    # ---- actions; each returns False if it must wait for a message ----------------------------
    def _recv_f(self, a: Action, inbox: Inbox) -> bool:
        msg = inbox.take(Kind.ACT, self.plan.step, _mb(a))
        if msg is None:
            return False
        self._hidden[_mb(a)] = np.array(_tensor(msg, ACTIVATION))   # own it: frames are read-only
        return True

    def _forward(self, a: Action, inbox: Inbox) -> bool:
        mb, m = _mb(a), self.stage.manifest
        names = [t.name for t in m.data_inputs]
        side = [n for n in names if n != ACTIVATION]
        batch = inbox.peek(Kind.BATCH, self.plan.step, mb) if side else None
        if side and batch is None:
            return False
        if ACTIVATION in names and mb not in self._hidden:
            raise ScheduleError(f"{a} needs the previous stage's activations but no RECV_F{mb} "
                                f"ran before it; build the schedule with add_comms")
        arrays = batch.arrays() if batch is not None else {}
        data = []
        for n in names:
            if n == ACTIVATION:
                data.append(self._hidden.pop(mb))
            elif n in arrays:
                data.append(np.array(arrays[n]))
            else:
                raise ScheduleError(f"step {self.plan.step} mb {mb}: BATCH lacks {n!r}; stage "
                                    f"{self.ctx.stage} takes {names}")
        if batch is not None:
            inbox.take(Kind.BATCH, self.plan.step, mb)
        with self._weights(a):
            outs, saved = self.stage.forward(data, self.plan.seeds[mb])
        self._saved[mb] = saved
        if m.is_last:
            self.result.losses[mb] = float(to_numpy(outs[0]).reshape(-1)[0])
            if self.ctx.keep_outputs:
                self.result.outputs[mb] = list(outs[1:])
        else:
            self._out[mb] = outs[0]
        return True

    def _send_f(self, a: Action, inbox: Inbox) -> bool:
        return self._send(Kind.ACT, self.ctx.next, a)

    def _recv_b(self, a: Action, inbox: Inbox) -> bool:
        msg = inbox.take(Kind.GRAD, self.plan.step, _mb(a))
        if msg is None:
            return False
        self._dout[_mb(a)] = np.array(_tensor(msg, ACTIVATION))
        return True

    def _backward(self, a: Action, inbox: Inbox) -> bool:
        mb, m = _mb(a), self.stage.manifest
        if m.is_last:
            group = self.ctx.group or self.ctx.n_mb
            dout: Any = np.array([1.0 / group], dtype=m.dtype)   # loss scale 1/M
        elif mb in self._dout:
            dout = self._dout.pop(mb)
        else:
            raise ScheduleError(f"{a} needs the next stage's gradient but no RECV_B{mb} ran "
                                f"before it; build the schedule with add_comms")
        with self._weights(a):
            dinput, grads = self.stage.backward(self._saved.pop(mb), dout, self.plan.seeds[mb])
        self._acc = grads if self._acc is None else self.stage.accumulate(self._acc, grads)
        if dinput is not None:
            self._out[mb] = dinput
        self._release(a)
        return True

    def _send_b(self, a: Action, inbox: Inbox) -> bool:
        return self._send(Kind.GRAD, self.ctx.prev, a)

    def _step(self, a: Action, inbox: Inbox) -> bool:
        if self._acc is None:
            raise ScheduleError(f"{a}: no gradients accumulated; STEP must follow the B's")
        if self._n_steps >= len(self.plan.hyper):
            raise ScheduleError(f"step {self.plan.step}: the request carried "
                                f"{len(self.plan.hyper)} hyper vector(s) but the schedule has "
                                f"more STEPs ({a} is STEP #{self._n_steps + 1})")
        opt = self.opt
        if a.version is not None:       # See [Note: weight versions on a board]
            if self._used_later(opt.version):
                opt.stash[opt.version] = [_clone(p) for p in self.stage.params]
            opt.version = a.version
            self.result.max_versions = max(self.result.max_versions, 1 + len(opt.stash))
        self.stage.optimizer_step(self._acc, opt.m, opt.v, self.plan.hyper[self._n_steps])
        self._n_steps += 1
        opt.steps += 1
        self._acc = None
        return True

    _HANDLERS: dict[Op, Callable[[StepRun, Action, Inbox], bool]] = {
        Op.RECV_F: _recv_f, Op.F: _forward, Op.SEND_F: _send_f,
        Op.RECV_B: _recv_b, Op.B: _backward, Op.SEND_B: _send_b, Op.STEP: _step,
    }

    def _send(self, kind: Kind, peer: Peer | None, a: Action) -> bool:
        if peer is None:
            raise ScheduleError(f"{a}: stage {self.ctx.stage} has no link to send to; the LOAD "
                                f"request must name the neighbouring board")
        arr = np.ascontiguousarray(to_numpy(self._out.pop(_mb(a))))
        self.send(peer, Message.make(kind, self.ctx.run, 0, step=self.plan.step,
                                     stage=self.ctx.stage, mb=_mb(a), arrays={ACTIVATION: arr}))
        return True

    # ---- weight versions (async) ---------------------------------------------------------------
    def _used_later(self, version: int) -> bool:
        """Does an F or B after the current action run on `version`?"""
        return any(x.version == version and x.op in (Op.F, Op.B)
                   for _, x in self.actions[self.pc + 1:])

    def _weights(self, a: Action) -> _Swap:
        if a.version is None or a.version == self.opt.version:
            return _Swap(self.stage, None)
        stash = self.opt.stash.get(a.version)
        if stash is None:
            raise ScheduleError(f"{a}: weight version {a.version} is neither live (newest is "
                                f"{self.opt.version}) nor stashed")
        return _Swap(self.stage, stash)

    def _release(self, a: Action) -> None:
        if a.version is not None and a.version != self.opt.version and not self._used_later(
                a.version):
            self.opt.stash.pop(a.version, None)


class _Swap:
    """Temporarily run a stage on stashed parameters (async mode)."""

    def __init__(self, stage: Stage, params: list[Any] | None) -> None:
        self.stage, self.params, self.saved = stage, params, None

    def __enter__(self) -> None:
        if self.params is not None:
            self.saved = self.stage.params
            self.stage.params = self.params

    def __exit__(self, *exc: object) -> None:
        if self.saved is not None:
            self.stage.params = self.saved


def _clone(p: Any) -> Any:
    """A copy of one parameter tensor that later in-place updates do not touch."""
    if isinstance(p, np.ndarray):
        return p.copy()
    from edgert.runtime import to_dev   # a TVM tensor: the board has the runtime loaded

    return to_dev(np.array(np.from_dlpack(p)))


def _mb(a: Action) -> int:
    if a.mb is None:
        raise ScheduleError(f"{a} needs a micro-batch index")
    return a.mb


def _tensor(msg: Message, name: str) -> np.ndarray:
    arrays = msg.arrays()
    if name not in arrays:
        raise TransportError(f"{msg.kind.value} step {msg.header.step} mb {msg.header.mb} carries "
                             f"{list(arrays)}, expected a tensor named {name!r}")
    return arrays[name]
