"""Pipeline schedules as plain data: generators, passes, validation and a printable grid.

The IR
------
A `Schedule` maps each stage to its timeline: `dict[int, list[Action | None]]`. Slot t of every
timeline is the same unit of time (one F or one B, or one SEND/RECV), and `None` is a bubble, so
`format_grid` shows the pipeline diagonal. Generators place every action as soon as its inputs
exist (ASAP, unit-time actions); `add_comms` re-times the schedule the same way, keeping each
stage's order. The executor on a board only walks its own stage's timeline in order, skipping
`None`; it never re-derives the schedule.

An `Action` prints as stage, op, micro-batch and optional weight version: "1F0" (stage 1, forward
of micro-batch 0), "2B3", "0SEND_F1", "1RECV_B0", "0STEP", "0F5v1", "2STEPv2"; `Action.parse`
reads it back.

    F / B             forward / backward of one micro-batch (B produces the input gradient and
                      accumulates the weight gradient)
    SEND_F / RECV_F   activations of a micro-batch from stage s to s+1 (SEND on s, RECV on s+1)
    SEND_B / RECV_B   gradient of a micro-batch from stage s to s-1 (SEND on s, RECV on s-1)
    STEP              optimizer update of this stage's weights from the accumulated gradient

RECV blocks until the message is in (ZeroMQ has queued it meanwhile); SEND does not block.

CSV (`to_csv`/`from_csv`): line i is stage i's timeline, one cell per slot, empty = bubble.

Modes
-----
sync (`one_f_one_b` + `add_step`, or `gpipe` + `add_step`): PipeDream-Flush / torch Schedule1F1B.
All M micro-batches of a step accumulate gradients, then each stage runs one STEP after its last
B. Training is numerically the one-device training with batch = M micro-batches.

async (`async_1f1b`): PipeDream-2BW. See [Note: weight versions].

[Note: weight versions]
In async mode each F and B carries `version`, the weight version it uses; STEP carries the version
it produces. Micro-batches form groups of `update_every` = m >= n_stages. Group g uses version
max(0, g - 1) on every stage, in its forward and its backward (weight stashing). After the last
B of group g a stage runs STEP, producing version g + 1 = W(g) - lr * grad(group g on W(g - 1)):
the constant one-step staleness of 2BW. A version is live from the STEP that makes it until
both its last use and the STEP that makes the next version (it is that STEP's base), so at most
2 versions are live per stage (`live_versions`). There is no flush.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from enum import StrEnum
from typing import NamedTuple, NoReturn

from edgert.errors import ConfigError, ScheduleError


class Op(StrEnum):
    """What an action does; the value is its spelling in "1F0"."""

    F = "F"
    B = "B"
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"
    STEP = "STEP"


_COMPUTE = (Op.F, Op.B)
# comm op -> (peer stage offset, peer op, compute op it belongs to)
_COMMS = {
    Op.SEND_F: (1, Op.RECV_F, Op.F), Op.RECV_F: (-1, Op.SEND_F, Op.F),
    Op.SEND_B: (-1, Op.RECV_B, Op.B), Op.RECV_B: (1, Op.SEND_B, Op.B),
}
_ACTION_RE = re.compile(r"(\d+)(SEND_F|RECV_F|SEND_B|RECV_B|STEP|F|B)(\d+)?(?:v(\d+))?")


class Action(NamedTuple):
    """One thing a stage does in one slot."""

    stage: int
    op: Op
    mb: int | None = None       # micro-batch; None for STEP
    version: int | None = None  # async mode only, see [Note: weight versions]

    def __str__(self) -> str:
        mb = "" if self.mb is None else str(self.mb)
        version = "" if self.version is None else f"v{self.version}"
        return f"{self.stage}{self.op.value}{mb}{version}"

    @classmethod
    def parse(cls, text: str) -> Action:
        """Read "1F0", "0SEND_B2", "1STEP", "0F5v1" back into an Action."""
        m = _ACTION_RE.fullmatch(text.strip())
        if m is None:
            raise ScheduleError(
                f"cannot parse action {text!r}; expected stage, op, micro-batch and optional "
                f"version, e.g. '1F0', '2B3', '0SEND_F1', '1STEP', '0F5v1'")
        stage, op, mb, version = m.groups()
        if (op == Op.STEP) != (mb is None):
            raise ScheduleError(
                f"action {text!r}: F, B, SEND and RECV need a micro-batch ('1F0'), STEP takes none "
                f"('1STEP')")
        return cls(int(stage), Op(op), None if mb is None else int(mb),
                   None if version is None else int(version))


Schedule = dict[int, list[Action | None]]
Key = tuple[int, Op, int | None]    # (stage, op, mb): identifies an F, B or comm action


# ---- generators ---------------------------------------------------------------------------------

def _check_sizes(n_stages: int, n_mb: int) -> None:
    for name, v in (("n_stages", n_stages), ("n_mb", n_mb)):
        if type(v) is not int or v < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")


def gpipe(n_stages: int, n_mb: int) -> Schedule:
    """GPipe: every stage runs all forwards, then all backwards."""
    _check_sizes(n_stages, n_mb)
    return _align({
        s: [Action(s, Op.F, m) for m in range(n_mb)] + [Action(s, Op.B, m) for m in range(n_mb)]
        for s in range(n_stages)})


def _one_f_one_b_order(stage: int, n_stages: int, n_mb: int) -> list[Action]:
    """min(n_mb, n_stages - stage) warm-up forwards, then B/F pairs, then cool-down backwards."""
    warmup = min(n_mb, n_stages - stage)
    order = [Action(stage, Op.F, m) for m in range(warmup)]
    for m in range(n_mb):
        order.append(Action(stage, Op.B, m))
        if warmup + m < n_mb:
            order.append(Action(stage, Op.F, warmup + m))
    return order


def one_f_one_b(n_stages: int, n_mb: int) -> Schedule:
    """1F1B (PipeDream-Flush): stage s holds at most min(n_mb, n_stages - s) activations."""
    _check_sizes(n_stages, n_mb)
    return _align({s: _one_f_one_b_order(s, n_stages, n_mb) for s in range(n_stages)})


def async_1f1b(n_stages: int, n_mb_total: int, update_every: int | None = None) -> Schedule:
    """PipeDream-2BW: 1F1B without flush, a STEP every `update_every` (default n_stages) B's.

    See [Note: weight versions]. A last, partial group also ends with a STEP.
    """
    _check_sizes(n_stages, n_mb_total)
    m = n_stages if update_every is None else update_every
    if type(m) is not int or m < n_stages:
        raise ConfigError(
            f"update_every must be an integer >= n_stages={n_stages} (2BW needs m >= depth to keep "
            f"2 weight versions), got {m!r}")
    orders: dict[int, list[Action]] = {}
    for s in range(n_stages):
        order = orders[s] = []
        for a in _one_f_one_b_order(s, n_stages, n_mb_total):
            mb = a.mb if a.mb is not None else 0
            order.append(a._replace(version=max(0, mb // m - 1)))
            if a.op is Op.B and ((mb + 1) % m == 0 or mb == n_mb_total - 1):
                order.append(Action(s, Op.STEP, None, mb // m + 1))
    return _align(orders)


def _deps(a: Action, present: set[Key], n_stages: int) -> list[tuple[Key, int]]:
    """Actions on other stages that `a` waits for, with the minimum slot gap."""
    s, mb = a.stage, a.mb
    if a.op is Op.F and s > 0 and (s, Op.RECV_F, mb) not in present:
        return [((s - 1, Op.F, mb), 1)]
    if a.op is Op.B and s < n_stages - 1 and (s, Op.RECV_B, mb) not in present:
        return [((s + 1, Op.B, mb), 1)]
    if a.op in (Op.RECV_F, Op.RECV_B):
        offset, peer, _ = _COMMS[a.op]
        return [((s + offset, peer, mb), 0)]   # a transfer shows as SEND and RECV in one slot
    return []


def _align(orders: Mapping[int, Sequence[Action]]) -> Schedule:
    """Place each stage's actions, in order, at the earliest slot their inputs allow."""
    present = {(a.stage, a.op, a.mb) for order in orders.values() for a in order}
    slot: dict[Key, int] = {}
    placed: dict[int, list[tuple[int, Action]]] = {s: [] for s in orders}
    next_i = dict.fromkeys(orders, 0)
    progress = True
    while progress:
        progress = False
        for s, order in orders.items():
            while next_i[s] < len(order):
                a = order[next_i[s]]
                deps = _deps(a, present, len(orders))
                if any(k not in slot for k, _ in deps):
                    break
                t = max([placed[s][-1][0] + 1 if placed[s] else 0]
                        + [slot[k] + gap for k, gap in deps])
                slot[(a.stage, a.op, a.mb)] = t
                placed[s].append((t, a))
                next_i[s] += 1
                progress = True
    stuck = [str(orders[s][i]) for s, i in next_i.items() if i < len(orders[s])]
    if stuck:
        raise ScheduleError(
            f"cannot time the schedule: {', '.join(stuck)} wait for actions that never run; "
            f"every F/B needs its neighbour's F/B and every RECV its SEND")
    width = 1 + max((p[-1][0] for p in placed.values() if p), default=-1)
    out: Schedule = {s: [None] * width for s in orders}
    for s, actions in placed.items():
        for t, a in actions:
            out[s][t] = a
    return out


# ---- passes -------------------------------------------------------------------------------------

def add_step(s: Schedule) -> Schedule:
    """Sync mode: a STEP on each stage right after its last action (the flush)."""
    last = {st: max((t for t, a in enumerate(line) if a is not None), default=-1)
            for st, line in s.items()}
    width = 2 + max(last.values(), default=-1)
    out: Schedule = {}
    for st, line in s.items():
        if any(a is not None and (a.op is Op.STEP or a.version is not None) for a in line):
            raise ScheduleError(f"stage {st} already has STEPs or weight versions; add_step is "
                                f"for sync schedules from gpipe/one_f_one_b")
        out[st] = [*line[:last[st] + 1], Action(st, Op.STEP)]
        out[st] += [None] * (width - len(out[st]))
    return out


def add_comms(s: Schedule, stage_to_board: Callable[[int], int] | None = None) -> Schedule:
    """Insert SEND/RECV between neighbouring stages on different boards, then re-time ASAP.

    A RECV goes right before the F/B that consumes it, a SEND right after the F/B that produces
    it. `stage_to_board` defaults to one stage per board.
    """
    board = stage_to_board or (lambda st: st)
    n = len(s)
    orders: dict[int, list[Action]] = {}
    for st, line in s.items():
        order = orders[st] = []
        for a in line:
            if a is None:
                continue
            if a.op in _COMMS:
                raise ScheduleError(f"{a}: the schedule already has comms; run add_comms once")
            fwd = a.op is Op.F
            src, dst = (st - 1, st + 1) if fwd else (st + 1, st - 1)   # feeds a / a feeds
            compute = a.op in _COMPUTE
            if compute and 0 <= src < n and board(src) != board(st):
                order.append(Action(st, Op.RECV_F if fwd else Op.RECV_B, a.mb))
            order.append(a)
            if compute and 0 <= dst < n and board(dst) != board(st):
                order.append(Action(st, Op.SEND_F if fwd else Op.SEND_B, a.mb))
    return _align(orders)


# ---- validation ---------------------------------------------------------------------------------

def validate(s: Schedule, n_stages: int, n_mb: int, *,
             in_flight_limit: Callable[[int], int] | None = None, max_versions: int = 2) -> None:
    """Raise ScheduleError, with the grid and the failing slot marked, unless `s` is consistent.

    Checks: each F and B exactly once per (stage, mb); F(s, mb) after F(s-1, mb); B(s, mb) after
    B(s+1, mb) and F(s, mb); every SEND paired with its RECV in order; sync STEP after the last B;
    async versions per [Note: weight versions] with at most `max_versions` live; and, if given,
    at most `in_flight_limit(stage)` micro-batches in flight on each stage.
    """
    _check_sizes(n_stages, n_mb)
    pos = _positions(s, n_stages, n_mb)
    _check_dataflow(s, pos, n_stages)
    _check_comms(s, pos)
    if any(a is not None and a.version is not None for line in s.values() for a in line):
        _check_versions(s, max_versions)
    else:
        _check_sync_steps(s, pos, n_mb)
    if in_flight_limit is not None:
        for st, line in s.items():
            limit = in_flight_limit(st)
            counts = _in_flight_counts(line)
            over = next((t for t, c in enumerate(counts) if c > limit), None)
            if over is not None:
                _fail(s, over, f"stage {st} holds {counts[over]} micro-batches' activations at "
                               f"slot {over}, over its limit of {limit}; start fewer forwards "
                               f"before the first backward")


def _fail(s: Schedule, slot: int | None, msg: str) -> NoReturn:
    raise ScheduleError(f"{msg}\n{format_grid(s, error_step=slot)}")


def _positions(s: Schedule, n_stages: int, n_mb: int) -> dict[Key, int]:
    """Slot of every F, B and comm action; checks rows, ranges, duplicates and completeness."""
    if sorted(s) != list(range(n_stages)):
        _fail(s, None, f"schedule has stages {sorted(s)}, expected 0..{n_stages - 1}")
    pos: dict[Key, int] = {}
    for st, line in s.items():
        for t, a in enumerate(line):
            if a is None:
                continue
            if a.stage != st:
                _fail(s, t, f"{a} is in stage {st}'s timeline; a stage runs only its own actions")
            if a.op is Op.STEP:
                if a.mb is not None:
                    _fail(s, t, f"{a}: STEP takes no micro-batch; write '{st}STEP'")
                continue
            if a.mb is None or not 0 <= a.mb < n_mb:
                _fail(s, t, f"{a} at slot {t}: micro-batch must be in 0..{n_mb - 1}")
            key = (st, a.op, a.mb)
            if key in pos:
                _fail(s, t, f"{a} runs twice (slots {pos[key]} and {t}); each runs exactly once")
            pos[key] = t
    for st in range(n_stages):
        for mb in range(n_mb):
            for op in _COMPUTE:
                if (st, op, mb) not in pos:
                    _fail(s, None, f"{Action(st, op, mb)} is missing; every stage runs F and B "
                                   f"of every micro-batch exactly once")
    return pos


def _in_time_order(pos: Mapping[Key, int]) -> list[tuple[Key, int]]:
    """So that errors name the earliest offending slot."""
    return sorted(pos.items(), key=lambda kv: (kv[1], kv[0][0]))


def _check_dataflow(s: Schedule, pos: Mapping[Key, int], n_stages: int) -> None:
    for (st, op, mb), t in _in_time_order(pos):
        needs: list[tuple[Key, str]] = []
        if op is Op.F and st > 0:
            needs.append(((st - 1, Op.F, mb), "the previous stage's activations"))
        if op is Op.B:
            needs.append(((st, Op.F, mb), "its own forward"))
            if st < n_stages - 1:
                needs.append(((st + 1, Op.B, mb), "the next stage's gradient"))
        for key, what in needs:
            if pos[key] >= t:
                _fail(s, t, f"{Action(st, op, mb)} at slot {t} needs {what} but "
                            f"{Action(*key)} runs at slot {pos[key]}; move it later")


def _check_comms(s: Schedule, pos: Mapping[Key, int]) -> None:
    for (st, op, mb), t in _in_time_order(pos):
        if op not in _COMMS:
            continue
        offset, peer_op, compute = _COMMS[op]
        a, peer = Action(st, op, mb), (st + offset, peer_op, mb)
        if peer not in pos:
            _fail(s, t, f"{a} has no matching {Action(*peer)}; every SEND needs its RECV")
        sending = op in (Op.SEND_F, Op.SEND_B)
        t_compute = pos[(st, compute, mb)]
        if (t_compute >= t) if sending else (t >= t_compute):
            _fail(s, t, f"{a} at slot {t} must come {'after' if sending else 'before'} "
                        f"{Action(st, compute, mb)} at slot {t_compute}")
        if (pos[peer] < t) if sending else (pos[peer] > t):
            _fail(s, t, f"{a} at slot {t} and {Action(*peer)} at slot {pos[peer]}: a RECV "
                        f"cannot run before its SEND")


def _check_sync_steps(s: Schedule, pos: Mapping[Key, int], n_mb: int) -> None:
    steps = {st: [t for t, a in enumerate(line) if a is not None and a.op is Op.STEP]
             for st, line in s.items()}
    if not any(steps.values()):
        return
    for st, ts in steps.items():
        if len(ts) != 1:
            _fail(s, ts[1] if ts else None, f"stage {st} has {len(ts)} STEPs; a sync schedule "
                                            f"has one per stage (use add_step)")
        last_b = max(pos[(st, Op.B, mb)] for mb in range(n_mb))
        if ts[0] < last_b:
            _fail(s, ts[0], f"stage {st} STEPs at slot {ts[0]} before its last B at slot "
                            f"{last_b}; sync mode updates once all gradients are accumulated")


def _check_versions(s: Schedule, max_versions: int) -> None:
    used_by: dict[int, Action] = {}    # mb -> first action seen using its version
    for st, line in s.items():
        newest = 0
        for t, a in enumerate(line):
            if a is None or a.op in _COMMS:
                continue
            if a.op is Op.STEP:
                if a.version != newest + 1:
                    _fail(s, t, f"{a} should produce version {newest + 1}; each STEP makes the "
                                f"next version")
                newest += 1
            elif a.version is None or a.version > newest:
                _fail(s, t, f"{a} uses version {a.version}, but stage {st} has made versions "
                            f"0..{newest} so far")
            elif a.mb is not None:
                first = used_by.setdefault(a.mb, a)
                if first.version != a.version:
                    _fail(s, t, f"{a} and {first} use different versions; a micro-batch uses one "
                                f"stashed version in its forward and backward on every stage")
        counts = _live_counts(line)
        over = next((t for t, c in enumerate(counts) if c > max_versions), None)
        if over is not None:
            _fail(s, over, f"stage {st} keeps {counts[over]} weight versions live at slot {over}, "
                           f"over {max_versions}; update less often (update_every >= n_stages)")


# ---- metrics ------------------------------------------------------------------------------------

def _in_flight_counts(line: Sequence[Action | None]) -> list[int]:
    counts, n = [], 0
    for a in line:
        n += 1 if a is not None and a.op is Op.F else -1 if a is not None and a.op is Op.B else 0
        counts.append(n)
    return counts


def max_in_flight(s: Schedule, stage: int) -> int:
    """Most micro-batches whose activations `stage` holds at once (forward done, backward not)."""
    return max(_in_flight_counts(s[stage]), default=0)


def _live_counts(line: Sequence[Action | None]) -> list[int]:
    """Live weight versions per slot; see [Note: weight versions]."""
    birth, last_use = {0: -1}, {}
    for t, a in enumerate(line):
        if a is not None and a.version is not None:
            if a.op is Op.STEP:
                birth[a.version] = t
            else:
                last_use[a.version] = t
    end = {v: max(last_use.get(v, b), birth.get(v + 1, len(line))) for v, b in birth.items()}
    return [sum(birth[v] <= t <= end[v] for v in birth) for t in range(len(line))]


def live_versions(s: Schedule, stage: int) -> int:
    """Most weight versions `stage` must keep at once (1 for sync schedules)."""
    return max(_live_counts(s[stage]), default=1)


def bubble_fraction(s: Schedule) -> float:
    """Share of stage-slots up to the last action not running F or B (comms, STEP are idle)."""
    width = max((t + 1 for line in s.values() for t, a in enumerate(line) if a is not None),
                default=0)
    busy = sum(a is not None and a.op in _COMPUTE for line in s.values() for a in line)
    return 1.0 - busy / (len(s) * width) if width else 0.0


def ideal_efficiency(n_stages: int, n_mb: int) -> float:
    """1 - bubble of GPipe/1F1B with equal stages: n_mb / (n_mb + n_stages - 1)."""
    _check_sizes(n_stages, n_mb)
    return n_mb / (n_mb + n_stages - 1)


# ---- printing -----------------------------------------------------------------------------------

def format_grid(s: Schedule, error_step: int | None = None) -> str:
    """Stages as rows, slots as columns, '.' for bubbles; a '^' line marks `error_step`."""
    n_slots = max((len(line) for line in s.values()), default=0)
    cells = {st: ["." if a is None else str(a) for a in line] for st, line in s.items()}
    w = max([len(str(n_slots - 1))] + [len(c) for row in cells.values() for c in row])
    label = max([len("slot")] + [len(f"stage {st}") for st in s])
    lines = ["slot".ljust(label) + "  " + " ".join(str(t).ljust(w) for t in range(n_slots))]
    for st in sorted(cells):
        lines.append(f"stage {st}".ljust(label) + "  " + " ".join(c.ljust(w) for c in cells[st]))
    if error_step is not None:
        lines.append(" " * (label + 2 + error_step * (w + 1)) + "^" * w
                     + f" error at slot {error_step}")
    return "\n".join(line.rstrip() for line in lines)


def to_csv(s: Schedule) -> str:
    """One line per stage, one cell per slot, empty cells for bubbles."""
    n_slots = max((len(line) for line in s.values()), default=0)
    rows = []
    for st in sorted(s):
        line = s[st] + [None] * (n_slots - len(s[st]))
        rows.append(",".join("" if a is None else str(a) for a in line))
    return "\n".join(rows) + "\n"


def from_csv(text: str) -> Schedule:
    """Inverse of `to_csv`: line i is stage i."""
    rows = text.rstrip("\n").split("\n")
    return {st: [Action.parse(c) if c.strip() else None for c in row.split(",")]
            for st, row in enumerate(rows)}
