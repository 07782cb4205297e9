"""The board loop without sockets or TVM: requests in over InprocTransport, replies out."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from edgert.artifact import Manifest, TensorMeta
from edgert.board import BoardConfig, BoardDaemon, check_budget
from edgert.errors import BoardError
from edgert.protocol import Kind, Message
from edgert.transport import InprocHub


@pytest.fixture
def net(tmp_path):
    hub = InprocHub()
    ctl = hub.endpoint("ctl")
    board = BoardDaemon(BoardConfig("b0", tmp_path), hub.endpoint("b0"), clock=lambda: 0.0)
    return SimpleNamespace(hub=hub, ctl=ctl, board=board)


def _ask(net, msg: Message) -> list[Message]:
    net.ctl.send("b0", msg)
    net.board.poll_once()
    out = []
    while (got := net.ctl.recv(0)) is not None:
        if got[1].kind is not Kind.HEARTBEAT:
            out.append(got[1])
    return out


def test_hello_and_profile(net):
    (r,) = _ask(net, Message.make(Kind.HELLO, "", 3))
    assert r.kind is Kind.HELLO and r.header.body["board"] == "b0"
    assert r.header.body["ref_seq"] == 3
    (p,) = _ask(net, Message.make(Kind.PROFILE, "", 4))
    assert p.header.body["stage"] is None and p.header.body["cores"] >= 1
    assert p.header.body["rss"] > 0


@pytest.mark.parametrize("msg,match", [
    (Message.make(Kind.STEP, "", 7, step=1, body={}), "no stage loaded"),
    (Message.make(Kind.LOAD, "", 7, body={"bundle": "../etc"}), "must name a deployed"),
    (Message.make(Kind.DEPLOY_CHUNK, "", 7, body={}), "without a deploy_begin"),
])
def test_bad_requests_get_error_replies_and_the_board_carries_on(net, msg, match):
    (err,) = _ask(net, msg)
    assert err.kind is Kind.ERROR and err.header.body["ref_seq"] == 7
    assert match in err.header.body["message"]
    (ok,) = _ask(net, Message.make(Kind.HELLO, "", 8))
    assert ok.kind is Kind.HELLO
    assert net.board.stats.errors == 1


def test_the_board_serves_every_kind_of_the_protocol(net):
    """No kind on the wire is left to the "does not serve" guard (the LOSS and CHECKPOINT kinds,
    never sent, were removed from the protocol)."""
    assert set(net.board._handlers) == set(Kind)


def test_error_from_a_peer_is_not_answered(net):
    """Two boards must never bounce ERRORs at each other."""
    assert _ask(net, Message.make(Kind.ERROR, "", 9, body={"type": "X", "message": "m"})) == []
    assert net.board.stats.last_errors[-1].endswith("reported X: m")


def test_shutdown_stops_the_loop(net):
    (ok,) = _ask(net, Message.make(Kind.SHUTDOWN, "", 1))
    assert ok.kind is Kind.OK and net.board.stopping


def _manifest(params_shape, saved_shape) -> Manifest:
    f = "float32"
    return Manifest("m", "", {}, {"index": 1, "num_stages": 2}, {}, "", "", f,
                    data_inputs=(), outputs=(TensorMeta("h", (1,), f),),
                    saved=(TensorMeta("s", saved_shape, f),),
                    params=(TensorMeta("w", params_shape, f),), entries=())


def test_budget_counts_params_four_times_and_saved_per_micro_batch():
    m = _manifest((1024, 256), (256, 256))            # 1 MiB params, 0.25 MiB saved
    fp = check_budget(m, 3, 5 << 20, "b0")            # 4 + 3 x 0.25 = 4.75 MiB fits in 5
    assert fp["total"] == 4 * (1 << 20) + 3 * ((1 << 18) + 4)
    with pytest.raises(BoardError, match=r"needs an estimated 4\.8 MiB = 1\.0 MiB weights \+ "
                                         r"3 x 1\.0 MiB .* "
                                         r"3 micro-batch\(es\) in flight x 0\.3 MiB .* 4\.5 MiB"):
        check_budget(m, 3, int(4.5 * (1 << 20)), "b0")


def test_budget_counts_frozen_params_once():
    """Frozen params (FAR, BitFit, LoRA) have no gradient or Adam moments: x1, not x4."""
    f = "float32"
    m = Manifest("m", "", {}, {"index": 0, "num_stages": 1, "frozen": ["w"]}, {}, "", "", f,
                 data_inputs=(), outputs=(TensorMeta("h", (1,), f),),
                 saved=(TensorMeta("s", (1,), f),),
                 params=(TensorMeta("w", (1024, 256), f), TensorMeta("b", (256,), f)),
                 entries=())
    fp = check_budget(m, 1, None, "b0")
    assert fp["trained"] == 1024 and fp["params"] == (1 << 20) + 1024
    assert fp["total"] == (1 << 20) + 4 * 1024 + 2 * 4
