"""Telemetry: the pure reducer, liveness, the board-event mapping, and the board's push timing."""

from __future__ import annotations

import queue
from pathlib import Path

import pytest

from control.events import EventLog
from control.telemetry import HISTORY, SILENT_INTERVALS, TelemetryState, alive, board_event, reduce
from edgert.board import BoardConfig, BoardDaemon
from edgert.errors import ProtocolError
from edgert.protocol import Kind, Message, decode, encode
from edgert.transport import InprocHub, InprocTransport

MIB = 1 << 20


def _rec(board: str, **kw) -> dict:
    return {"board": board, "interval": 0.5, "rss": 100 * MIB, "peak_rss": 120 * MIB, **kw}


def test_reduce_keeps_latest_and_a_bounded_history_without_mutating():
    s0 = TelemetryState(keep=3)
    s = s0
    for i in range(5):
        s = reduce(s, _rec("b0", seq=i), now=float(i))
    s = reduce(s, _rec("b1", seq=0), now=4.0)
    assert s0.boards == {}                                  # pure: the old state is untouched
    assert s.boards["b0"].latest["seq"] == 4
    assert [r["seq"] for r in s.boards["b0"].history] == [2, 3, 4]
    assert s.boards["b0"].received == 5 and s.boards["b1"].received == 1
    assert s.boards["b0"].last_seen == 4.0
    assert TelemetryState().keep == HISTORY


def test_liveness_is_three_of_the_boards_own_intervals():
    s = reduce(TelemetryState(), _rec("fast"), now=10.0)                 # interval 0.5 s
    s = reduce(s, _rec("slow", interval=2.0), now=10.0)
    limit = SILENT_INTERVALS * 0.5
    assert alive(s, 10.0 + limit) == {"fast": True, "slow": True}
    assert alive(s, 10.0 + limit + 0.01) == {"fast": False, "slow": True}
    assert alive(s, 16.01) == {"fast": False, "slow": False}
    s = reduce(s, _rec("fast"), now=20.0)                                # one record revives it
    assert alive(s, 20.5) == {"fast": True, "slow": False}


def test_record_without_board_name_is_refused():
    with pytest.raises(ProtocolError, match="without a board name"):
        reduce(TelemetryState(), {"rss": 1}, now=0.0)


def test_board_event_fields_fit_the_event_schema():
    rec = _rec("b0", stage=1, compute_s=0.25, wait_s=0.05, queue=2, errors=1,
               budget=256 * MIB, alive=False)
    ev = board_event(rec, budget_mib=None)
    assert ev == {"name": "b0", "stage": 1, "rss_mib": 100.0, "peak_rss_mib": 120.0,
                  "budget_mib": 256.0, "compute_s": 0.25, "wait_s": 0.05, "queue": 2,
                  "errors": 1, "alive": False}
    assert board_event(rec, budget_mib=512)["budget_mib"] == 512       # the planner's budget wins
    assert board_event({"board": "b1"})["rss_mib"] is None             # idle board, no numbers
    log = EventLog()
    assert log.emit("board", **ev).data["rss_mib"] == 100.0            # a valid "board" event


class _PubInproc(InprocTransport):
    """The in-process transport plus a PUB side that records what the board publishes."""

    def __init__(self, name: str, hub: InprocHub) -> None:
        super().__init__(name, hub)
        self.published: list[Message] = []
        self.pub_endpoint = "inproc://telemetry"

    def publish(self, msg: Message) -> None:
        self.published.append(decode(encode(msg)))        # through the real wire format


def test_board_pushes_one_record_per_interval(tmp_path: Path):
    hub = InprocHub()
    hub.queues["board0"] = queue.SimpleQueue()
    t = _PubInproc("board0", hub)
    now = [100.0]
    board = BoardDaemon(BoardConfig("board0", tmp_path, telemetry_s=0.5, budget_bytes=64 * MIB), t,
                  clock=lambda: now[0])
    for k in range(21):                                    # board time 100 .. 105 s, every 0.25 s
        now[0] = 100.0 + 0.25 * k
        board._housekeeping(now[0])
    assert board.telemetry_endpoint == "inproc://telemetry"
    assert len(t.published) == 11                         # t = 100, 100.5, ..., 105
    recs = [m.header.body for m in t.published]
    assert all(m.kind is Kind.STATS for m in t.published)
    assert [r["seq"] for r in recs] == list(range(1, 12))
    r = recs[-1]
    assert r["board"] == "board0" and r["interval"] == 0.5 and r["budget"] == 64 * MIB
    assert r["stage"] is None and r["step"] is None and r["queue"] == 0 and r["errors"] == 0
    assert 10 * MIB < r["rss"] <= r["peak_rss"]


def test_module_examples_run():
    import doctest

    import control.telemetry

    res = doctest.testmod(control.telemetry)
    assert res.attempted >= 3 and res.failed == 0
