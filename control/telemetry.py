"""Board telemetry on the controller: a SUB client per cluster, a pure reducer, liveness.

Boards push records (edgert/board.py, "Telemetry (push)") on a CURVE PUB socket whose endpoint
their HELLO reply names. `TelemetryClient` subscribes to every board with the controller's key
(a subscriber without a cluster key never completes the handshake and gets nothing), folds each
record into a `TelemetryState` with the pure `reduce`, and calls subscribers from its thread.

Liveness: a board whose last record arrived more than `SILENT_INTERVALS` of its own interval ago
(the record's `interval` field) is reported `alive: False`; one record brings it back.

Examples
--------
>>> s = reduce(TelemetryState(), {"board": "board0", "interval": 1.0, "rss": 50 << 20}, now=10.0)
>>> s.boards["board0"].latest["rss"] >> 20, alive(s, now=12.0), alive(s, now=13.5)
(50, {'board0': True}, {'board0': False})
>>> board_event({**s.boards["board0"].latest, "alive": True}, budget_mib=512)["rss_mib"]
50.0
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import zmq

from edgert.errors import ProtocolError
from edgert.protocol import Kind, decode
from edgert.transport import CONTROLLER, KeyRing, subscriber

log = logging.getLogger(__name__)

MIB = 1 << 20
SILENT_INTERVALS = 3        # missed records before a board counts as gone
HISTORY = 600               # records kept per board


# ---- pure state ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class BoardView:
    """What the controller knows about one board from its telemetry."""

    latest: dict[str, Any]
    history: tuple[dict[str, Any], ...]
    last_seen: float            # controller clock (monotonic s) when the latest record arrived
    received: int = 1

    @property
    def interval(self) -> float:
        return float(self.latest.get("interval") or 1.0)


@dataclass(frozen=True, slots=True)
class TelemetryState:
    boards: dict[str, BoardView] = field(default_factory=dict)
    keep: int = HISTORY


def reduce(state: TelemetryState, record: Mapping[str, Any], now: float) -> TelemetryState:
    """The state after one record from a board, received at controller time `now` (pure)."""
    name = record.get("board")
    if not isinstance(name, str) or not name:
        raise ProtocolError(f"telemetry record without a board name: {dict(record)!r}")
    rec = dict(record)
    old = state.boards.get(name)
    hist = (rec,) if old is None else (*old.history[-(state.keep - 1):], rec) if state.keep > 1 \
        else (rec,)
    view = BoardView(rec, hist, now, 1 if old is None else old.received + 1)
    return replace(state, boards={**state.boards, name: view})


def is_alive(view: BoardView, now: float) -> bool:
    return now - view.last_seen <= SILENT_INTERVALS * view.interval


def alive(state: TelemetryState, now: float) -> dict[str, bool]:
    """{board: alive} for every board that has sent at least one record."""
    return {n: is_alive(v, now) for n, v in state.boards.items()}


def board_event(record: Mapping[str, Any], budget_mib: float | None = None) -> dict[str, Any]:
    """Fields of a control.events "board" event from one telemetry record.

    `budget_mib` (e.g. the planner's budget for that board) wins over the record's own `budget`
    (the board's --budget-mib); `alive` is taken from the record (`TelemetryClient.snapshot`
    adds it), True if absent.
    """
    def mib(v: Any) -> float | None:
        return None if v is None else float(v) / MIB

    budget = budget_mib if budget_mib is not None else mib(record.get("budget"))
    return {"name": record.get("board"), "stage": record.get("stage"),
            "rss_mib": mib(record.get("rss")), "peak_rss_mib": mib(record.get("peak_rss")),
            "budget_mib": budget, "compute_s": record.get("compute_s"),
            "wait_s": record.get("wait_s"), "queue": record.get("queue"),
            "errors": record.get("errors"), "alive": bool(record.get("alive", True))}


def reachable(pub: str | None, router: str) -> str | None:
    """A board's PUB endpoint as the controller can reach it: a wildcard bind host (0.0.0.0, *,
    ::) is replaced by the host of the board's ROUTER endpoint that the controller connects to.

    >>> reachable("tcp://0.0.0.0:6001", "tcp://10.0.0.7:5555")
    'tcp://10.0.0.7:6001'
    """
    if not pub:
        return None
    scheme, _, rest = pub.partition("://")
    host, _, port = rest.rpartition(":")
    if host.strip("[]") in ("0.0.0.0", "*", "::", ""):
        rhost = router.partition("://")[2].rpartition(":")[0]
        return f"{scheme}://{rhost}:{port}"
    return pub


# ---- the client ---------------------------------------------------------------------------------

class TelemetryClient:
    """Subscribes to boards' telemetry in a background thread.

    Parameters
    ----------
    keys : KeyRing or None
        The cluster's keys; the client authenticates with `key_name`'s (default: controller).
    endpoints : dict
        {board name: PUB endpoint} (from each board's HELLO reply, body "telemetry").
    history : int
        Records kept per board.

    Examples
    --------
    >>> tc = TelemetryClient(cluster.keys, {"board0": ep})              # doctest: +SKIP
    >>> tc.subscribe(lambda name, rec: print(name, rec["rss"]))         # doctest: +SKIP
    >>> tc.wait_for(lambda s: "board0" in s.boards, timeout=5)          # doctest: +SKIP
    >>> tc.snapshot()["board0"]["alive"]                                # doctest: +SKIP
    True
    >>> tc.close()                                                      # doctest: +SKIP
    """

    def __init__(self, keys: KeyRing | None, endpoints: Mapping[str, str], *,
                 history: int = HISTORY, key_name: str = CONTROLLER,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.endpoints = dict(endpoints)
        self.clock = clock
        self._keys, self._key_name = keys, key_name
        self._state = TelemetryState(keep=history)
        self._lock = threading.Condition()
        self._subs: list[Callable[[str, dict[str, Any]], None]] = []
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="edgert-telemetry", daemon=True)
        self._thread.start()

    # -- reading
    @property
    def state(self) -> TelemetryState:
        with self._lock:
            return self._state

    def latest(self, board: str) -> dict[str, Any] | None:
        v = self.state.boards.get(board)
        return None if v is None else dict(v.latest)

    def history(self, board: str) -> list[dict[str, Any]]:
        v = self.state.boards.get(board)
        return [] if v is None else list(v.history)

    def alive(self) -> dict[str, bool]:
        """{board: alive} over every subscribed board (never heard from: False)."""
        got = alive(self.state, self.clock())
        return {b: got.get(b, False) for b in self.endpoints}

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """{board: latest record + alive} (boards not heard from yet: {"alive": False})."""
        st, now = self.state, self.clock()
        out = {}
        for b in self.endpoints:
            v = st.boards.get(b)
            out[b] = {"board": b, "alive": False} if v is None else \
                {**v.latest, "alive": is_alive(v, now)}
        return out

    def subscribe(self, fn: Callable[[str, dict[str, Any]], None]) -> None:
        """Call `fn(board, record)` from the client's thread for every record (one that raises is
        dropped: a broken watcher must not stop telemetry)."""
        with self._lock:
            self._subs.append(fn)

    def wait_for(self, pred: Callable[[TelemetryState], bool], timeout: float) -> bool:
        """Block until `pred(state)` holds (re-checked on every record) or `timeout` s pass."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not pred(self._state):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(min(left, 0.2))
        return True

    # -- the thread
    def _loop(self) -> None:
        socks: dict[zmq.Socket, str] = {}
        poller = zmq.Poller()
        try:     # sockets live and die in this thread (zmq sockets are not thread-safe)
            for board, ep in self.endpoints.items():
                s = subscriber(self._ctx, ep, self._keys, board, self._key_name)
                socks[s] = board
                poller.register(s, zmq.POLLIN)
            while not self._stop.is_set():
                for s, _ in poller.poll(100):
                    self._on_frames(socks[s], s.recv_multipart())
        except BaseException as e:  # noqa: BLE001 - kept for close() to report
            self._error = e
            log.warning("telemetry thread stopped: %s", e)
        finally:
            for s in socks:
                s.close(0)

    def _on_frames(self, board: str, frames: list[bytes]) -> None:
        try:
            msg = decode(frames)
        except ProtocolError as e:
            log.warning("telemetry from %s dropped: %s", board, e)
            return
        rec = dict(msg.header.body)
        if msg.kind is not Kind.STATS or rec.get("board") != board:
            log.warning("telemetry from %s dropped: a %s record for %r", board, msg.kind.value,
                        rec.get("board"))
            return
        with self._lock:
            self._state = reduce(self._state, rec, self.clock())
            subs = list(self._subs)
            self._lock.notify_all()
        for fn in subs:
            try:
                fn(board, rec)
            except Exception as e:  # noqa: BLE001 - see subscribe()
                log.warning("telemetry subscriber %r raised %s; dropped", fn, e)
                with self._lock:
                    if fn in self._subs:
                        self._subs.remove(fn)

    def close(self) -> None:
        """Stop the thread and close the sockets (idempotent)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(5.0)
        if self._thread.is_alive():     # term() would wait for its sockets forever
            log.warning("telemetry thread did not stop; leaving its ZeroMQ context open")
            return
        self._ctx.term()

    def __enter__(self) -> TelemetryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
