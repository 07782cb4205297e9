"""Peer liveness: a pure heartbeat state machine with an injected clock (no sockets, no sleeps).

The Paranoid Pirate pattern (zguide ch. 4, `ppworker.py`/`ppqueue.py`), made pure:

- Any message received from a peer counts as a heartbeat (`on_traffic`).
- Send a heartbeat to a peer we have sent nothing to for `interval` seconds (`due_heartbeats`);
  any other message sent resets that timer (`on_sent`).
- A peer silent for `interval * liveness` seconds is dead (`expired`), as `HEARTBEAT_LIVENESS = 3`
  missed intervals are in the zguide.
- After an expiry the transport closes the socket with linger=0 and reconnects after
  `reconnect_delay(peer)`: 1 s, 2 s, 4 s, ... capped at 32 s (`INTERVAL_INIT`/`INTERVAL_MAX`),
  back to 1 s as soon as the peer is heard from again.

Every method takes `now` in seconds from `time.monotonic()` at the call site, so tests drive time
by hand. The constants are fields of RuntimeConfig, which passes them to the constructor.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from edgert.errors import ConfigError

P = TypeVar("P", bound=Hashable)   # a peer id: a ROUTER identity (bytes), a board index, ...


@dataclass(slots=True)
class _Peer:
    last_heard: float   # s, monotonic
    last_sent: float    # s, monotonic


class Liveness(Generic[P]):
    """Tracks when each peer was last heard from and last sent to."""

    def __init__(self, interval: float = 1.0, liveness: int = 3, *, backoff_initial: float = 1.0,
                 backoff_max: float = 32.0) -> None:
        if not (math.isfinite(interval) and interval > 0):
            raise ConfigError(f"heartbeat interval must be a positive number of seconds, "
                              f"got {interval!r}")
        if type(liveness) is not int or liveness < 1:
            raise ConfigError(f"heartbeat liveness must be an integer >= 1 (missed intervals "
                              f"before a peer is dead), got {liveness!r}")
        if not 0 < backoff_initial <= backoff_max:
            raise ConfigError(f"reconnect backoff needs 0 < backoff_initial <= backoff_max, got "
                              f"{backoff_initial!r} and {backoff_max!r}")
        self.interval = interval           # s between heartbeats
        self.liveness = liveness           # missed intervals before expiry
        self.backoff_initial = backoff_initial   # s
        self.backoff_max = backoff_max           # s
        self._peers: dict[P, _Peer] = {}
        self._backoff: dict[P, float] = {}  # next reconnect delay per peer, s; kept across expiry

    @property
    def timeout(self) -> float:
        """Seconds of silence after which a peer is dead."""
        return self.interval * self.liveness

    def peers(self) -> list[P]:
        """Peers currently considered alive."""
        return list(self._peers)

    def add(self, peer: P, now: float) -> None:
        """Start watching a peer we connected to; it has `timeout` seconds to say something."""
        self._peers[peer] = _Peer(last_heard=now, last_sent=now)

    def remove(self, peer: P) -> None:
        """Stop watching a peer that said goodbye."""
        self._peers.pop(peer, None)
        self._backoff.pop(peer, None)

    def on_traffic(self, peer: P, now: float) -> None:
        """Any message from `peer` proves it alive; unknown peers start being watched."""
        state = self._peers.get(peer)
        if state is None:
            self.add(peer, now)
        else:
            state.last_heard = max(state.last_heard, now)
        self._backoff.pop(peer, None)

    def on_sent(self, peer: P, now: float) -> None:
        """We sent `peer` a message, so it needs no heartbeat for another interval."""
        state = self._peers.get(peer)
        if state is not None:
            state.last_sent = max(state.last_sent, now)

    def due_heartbeats(self, now: float) -> list[P]:
        """Peers to send a HEARTBEAT now; they are marked as sent, so the caller must send them."""
        due = [p for p, s in self._peers.items() if now - s.last_sent >= self.interval]
        for p in due:
            self._peers[p].last_sent = now
        return due

    def expired(self, now: float) -> list[P]:
        """Peers silent for `timeout` seconds; they are dropped, so each is reported once."""
        dead = [p for p, s in self._peers.items() if now - s.last_heard >= self.timeout]
        for p in dead:
            del self._peers[p]
        return dead

    def next_deadline(self, now: float) -> float:
        """Seconds until the next heartbeat or expiry is due (a poll timeout); inf with no peers."""
        times = [min(s.last_sent + self.interval, s.last_heard + self.timeout)
                 for s in self._peers.values()]
        return max(0.0, min(times) - now) if times else math.inf

    def reconnect_delay(self, peer: P) -> float:
        """Seconds to wait before reconnecting to `peer`; doubles on each call, up to the cap."""
        delay = self._backoff.get(peer, self.backoff_initial)
        self._backoff[peer] = min(delay * 2, self.backoff_max)
        return delay
