"""Pure parts of the in-stage head split (edgert/head_split/executor.py): LOAD options, salt folding."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from edgert.errors import BoardError
from edgert.head_split import executor as hsx


def _manifest(split: bool = True):
    files = {"stage.so": "x", **({hsx.SPLIT_LIB: "y"} if split else {})}
    return SimpleNamespace(index=0, files=files, dtype="float32",
                           dims={"heads": 12, "hidden": 384, "attn_dropout": 0.1},
                           stage={"batch": 2, "seq": 16, "dropout": True, "first": 0, "last": 1})


def test_attn_shape_from_manifest():
    shape, p = hsx.attn_shape(_manifest())
    assert (shape.B, shape.T, shape.H, shape.d, shape.dtype, p) == (2, 16, 12, 32, "float32", 0.1)


@pytest.mark.parametrize("body,want", [
    ({}, hsx.SplitOptions()), ({"head_split_k": 0}, hsx.SplitOptions(k=0)),
    ({"head_split_k": 12}, hsx.SplitOptions(k=12)),
    ({"head_split_retune": True}, hsx.SplitOptions(retune=True))])
def test_options_accepted(body, want):
    assert hsx.SplitOptions.from_body(_manifest(), body) == want


@pytest.mark.parametrize("k", [-1, 13, 2.0, "6", True])
def test_bad_split_point_names_the_range(k):
    with pytest.raises(BoardError, match=r"head_split_k must be an integer split point in "
                                         r"\[0, 12\] .*cpu0.*cpu1"):
        hsx.SplitOptions.from_body(_manifest(), {"head_split_k": k})


def test_bad_retune_and_options_for_an_unsplit_bundle():
    with pytest.raises(BoardError, match="head_split_retune must be true or false"):
        hsx.SplitOptions.from_body(_manifest(), {"head_split_retune": "yes"})
    assert hsx.SplitOptions.from_body(_manifest(split=False), {}) is None
    with pytest.raises(BoardError, match="compiled without head split"):
        hsx.SplitOptions.from_body(_manifest(split=False), {"head_split_k": 3})


def test_fold_seed_is_identity_for_the_library_salt_and_32_bit():
    for seed in (0, 1, 4321, 2**32 - 1):
        assert hsx.fold_seed(seed, hsx.LIB_SALT) == seed
    for seed, salt in ((5, 16), (2**40 + 5, 16), (-1, 3)):
        f = hsx.fold_seed(seed, salt)
        assert 0 <= f < 2**32
        assert hsx.fold_seed(f, hsx.LIB_SALT, lib_salt=salt) == seed & 0xFFFFFFFF   # inverse


def test_board_events_carry_the_split_to_the_dashboard():
    """Loop.board_events -> `board` event -> DashState -> the dashboard's head-split panel."""
    from control.dashboard import heads_html
    from control.dashboard_state import DashState, reduce
    from control.loop import Loop, LoopConfig

    rep = {"k": 5, "H": 12, "layers": {"0": 5, "1": 5}, "source": "tuned"}
    stats = [{"rss": 2**20, "peak_rss": 2**21, "head_split": rep},
             {"rss": 2**20, "peak_rss": 2**21, "head_split": None}]
    boards = [SimpleNamespace(name=f"board{i}", proc=SimpleNamespace(pid=100 + i)) for i in (0, 1)]
    cluster = SimpleNamespace(boards=boards, stages=boards, stats=lambda i: stats[i])
    run = Loop(None, None, cluster, LoopConfig(steps=1), bundle_dir=lambda split: None)
    run.board_events()
    assert [e.data["head_split"] for e in run.events.of("board")] == [{"0": 7, "1": 7}, None]
    s = DashState()
    for e in run.events.events():
        s = reduce(s, e)
    assert s.boards["board0"].head_split == {"0": 7, "1": 7}
    page = heads_html(s)
    assert "L0: 7, L1: 7" in page and "not measured" in page   # board1: unsplit bundle
