"""Heartbeat liveness state machine, driven by a hand-moved clock (no sleeps, no sockets)."""

from __future__ import annotations

import math

import pytest

from edgert.errors import ConfigError
from edgert.liveness import Liveness


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0        # s; any start works, as with time.monotonic()

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_silent_peer_expires_after_liveness_intervals(clock):
    lv: Liveness[bytes] = Liveness(interval=1.0, liveness=3)
    lv.add(b"board-1", clock.now)
    assert lv.expired(clock.advance(2.9)) == []
    assert lv.expired(clock.advance(0.1)) == [b"board-1"]
    assert lv.expired(clock.advance(10)) == []          # reported once
    assert lv.peers() == []


def test_any_traffic_counts_as_heartbeat(clock):
    lv: Liveness[int] = Liveness(interval=1.0, liveness=3)
    lv.on_traffic(1, clock.now)                           # unknown peers start being watched
    for _ in range(10):
        lv.on_traffic(1, clock.advance(2.5))              # ACT/GRAD traffic, never a HEARTBEAT
        assert lv.expired(clock.now) == []
    assert lv.expired(clock.advance(3.0)) == [1]


def test_due_heartbeats_every_interval_unless_we_sent_something(clock):
    lv: Liveness[str] = Liveness(interval=1.0, liveness=3)
    lv.add("a", clock.now)
    lv.add("b", clock.now)
    assert lv.due_heartbeats(clock.advance(0.5)) == []
    assert lv.due_heartbeats(clock.advance(0.5)) == ["a", "b"]
    assert lv.due_heartbeats(clock.now) == []             # marked as sent
    lv.on_sent("a", clock.advance(0.6))                   # a real message to "a"
    assert lv.due_heartbeats(clock.advance(0.4)) == ["b"]
    assert lv.due_heartbeats(clock.advance(0.6)) == ["a"]


def test_next_deadline_is_a_poll_timeout(clock):
    lv: Liveness[str] = Liveness(interval=1.0, liveness=3)
    assert lv.next_deadline(clock.now) == math.inf
    lv.add("a", clock.now)
    assert lv.next_deadline(clock.advance(0.25)) == pytest.approx(0.75)
    lv.due_heartbeats(clock.advance(0.75))
    lv.due_heartbeats(clock.advance(1.0))
    assert lv.next_deadline(clock.advance(0.75)) == pytest.approx(0.25)   # expiry at 3.0 s
    assert lv.next_deadline(clock.advance(5)) == 0.0


def test_reconnect_backoff_doubles_to_32s_and_resets_on_traffic(clock):
    lv: Liveness[str] = Liveness()
    lv.add("up", clock.now)
    assert lv.expired(clock.advance(3)) == ["up"]
    delays = [lv.reconnect_delay("up") for _ in range(8)]
    assert delays == [1, 2, 4, 8, 16, 32, 32, 32]
    assert lv.reconnect_delay("other") == 1               # per peer
    lv.on_traffic("up", clock.advance(1))                 # reconnected and heard from
    assert lv.reconnect_delay("up") == 1
    assert lv.peers() == ["up"]


def test_remove_forgets_a_peer(clock):
    lv: Liveness[str] = Liveness()
    lv.add("a", clock.now)
    lv.remove("a")
    assert lv.expired(clock.advance(100)) == [] and lv.due_heartbeats(clock.now) == []


def test_clock_going_backwards_does_not_revive_time(clock):
    lv: Liveness[str] = Liveness(interval=1.0, liveness=2)
    lv.on_traffic("a", clock.now)
    lv.on_traffic("a", clock.now - 5)                     # out-of-order report is ignored
    assert lv.expired(clock.advance(1.9)) == []
    assert lv.expired(clock.advance(0.1)) == ["a"]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"interval": 0}, "interval must be a positive number"),
    ({"interval": math.nan}, "interval must be a positive number"),
    ({"liveness": 0}, "liveness must be an integer >= 1"),
    ({"liveness": 2.5}, "liveness must be an integer >= 1"),
    ({"backoff_initial": 64.0}, "0 < backoff_initial <= backoff_max"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Liveness(**kwargs)
