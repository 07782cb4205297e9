"""Pipeline schedules: generators, passes, validation, grid/CSV round trips and 2BW versions."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgert.errors import ConfigError, ScheduleError
from edgert.schedule import (
    Action,
    Op,
    add_comms,
    add_step,
    async_1f1b,
    bubble_fraction,
    format_grid,
    from_csv,
    gpipe,
    ideal_efficiency,
    live_versions,
    max_in_flight,
    one_f_one_b,
    to_csv,
    validate,
)

GOLDEN = Path(__file__).parent.parent / "golden" / "schedules"
CASES = [(1, 1), (2, 1), (1, 4), (3, 4), (4, 8), (4, 3), (5, 7), (2, 5), (8, 2)]
GENERATORS = {"gpipe": gpipe, "1f1b": one_f_one_b}


def sched(text: str) -> dict[int, list[Action | None]]:
    """Tiny schedules written as one line per stage, '.' for a bubble."""
    return {st: [None if c == "." else Action.parse(c) for c in line.split()]
            for st, line in enumerate(text.strip().splitlines())}


def show(s: dict[int, list[Action | None]]) -> str:
    return "\n".join(" ".join("." if a is None else str(a) for a in s[st]) for st in sorted(s))


@pytest.mark.parametrize("name", GENERATORS)
@pytest.mark.parametrize(("n_stages", "n_mb"), CASES)
def test_generators_validate(name, n_stages, n_mb):
    s = GENERATORS[name](n_stages, n_mb)
    validate(s, n_stages, n_mb)
    validate(add_step(s), n_stages, n_mb)
    validate(add_comms(s), n_stages, n_mb)
    validate(add_comms(add_step(s)), n_stages, n_mb)
    assert bubble_fraction(s) == pytest.approx(1 - ideal_efficiency(n_stages, n_mb))
    assert len(s[0]) == 2 * (n_mb + n_stages - 1)      # unit-time F and B


@pytest.mark.parametrize(("n_stages", "n_mb"), CASES)
def test_in_flight_1f1b_vs_gpipe(n_stages, n_mb):
    f = one_f_one_b(n_stages, n_mb)
    assert max_in_flight(f, 0) == min(n_stages, n_mb)
    assert max_in_flight(gpipe(n_stages, n_mb), 0) == n_mb
    for st in range(n_stages):
        assert max_in_flight(f, st) == min(n_mb, n_stages - st)
    validate(f, n_stages, n_mb, in_flight_limit=lambda st: min(n_mb, n_stages - st))


def test_in_flight_limit_rejects_gpipe():
    with pytest.raises(ScheduleError, match=r"stage 0 holds 4 micro-batches.*limit of 3") as e:
        validate(gpipe(3, 4), 3, 4, in_flight_limit=lambda st: 3 - st)
    assert "^^^ error at slot 3" in str(e.value)


@pytest.mark.parametrize("text", ["1F0", "2B3", "0SEND_F1", "1RECV_F12", "3SEND_B0", "0RECV_B2",
                                  "1STEP", "0F5v1", "2B7v3", "4STEPv2"])
def test_action_parse_print_roundtrip(text):
    a = Action.parse(text)
    assert str(a) == text
    assert Action.parse(str(a)) == a


def test_action_fields():
    assert Action.parse("1F0") == Action(1, Op.F, 0)
    assert Action.parse("0STEPv2") == Action(0, Op.STEP, None, 2)
    assert str(Action(2, Op.B, 3)) == "2B3"


@pytest.mark.parametrize("bad", ["", "F0", "1X0", "1f0", "a1F0", "1F0v", "1F-1", "1F0,"])
def test_action_parse_rejects(bad):
    with pytest.raises(ScheduleError, match=r"cannot parse action.*e\.g\. '1F0'"):
        Action.parse(bad)


@pytest.mark.parametrize("bad", ["1F", "0SEND_B", "1STEP0"])
def test_action_parse_needs_mb_except_step(bad):
    with pytest.raises(ScheduleError, match=r"need a micro-batch.*STEP takes none"):
        Action.parse(bad)


def test_add_comms_tiny():
    s = sched("""
        0F0 .   .   0B0
        .   1F0 1B0 .
    """)
    assert show(add_comms(s)) == (
        "0F0 0SEND_F0 . . 0RECV_B0 0B0\n"
        ". 1RECV_F0 1F0 1B0 1SEND_B0 .")


def test_add_comms_same_board_needs_none():
    s = sched("""
        0F0 .   .   0B0
        .   1F0 1B0 .
    """)
    assert show(add_comms(s, stage_to_board=lambda st: 0)) == show(s)


def test_add_comms_three_stages_two_boards():
    s = one_f_one_b(3, 1)
    out = add_comms(s, stage_to_board=lambda st: min(st, 1))   # stages 1 and 2 share a board
    assert show(out) == (
        "0F0 0SEND_F0 . . . . 0RECV_B0 0B0\n"
        ". 1RECV_F0 1F0 . . 1B0 1SEND_B0 .\n"
        ". . . 2F0 2B0 . . .")
    validate(out, 3, 1)
    with pytest.raises(ScheduleError, match="already has comms"):
        add_comms(out)


def test_add_step_flush():
    s = add_step(one_f_one_b(2, 2))
    assert show(s) == (
        "0F0 0F1 . 0B0 . 0B1 0STEP\n"
        ". 1F0 1B0 1F1 1B1 1STEP .")
    with pytest.raises(ScheduleError, match="already has STEPs"):
        add_step(s)


def test_sync_step_before_last_backward_is_rejected():
    s = sched("""
        0F0 0F1 . 0B0 0STEP 0B1
        .   1F0 1B0 1F1 1B1 1STEP
    """)
    with pytest.raises(ScheduleError, match="stage 0 STEPs at slot 4 before its last B at slot 5"):
        validate(s, 2, 2)


@pytest.mark.parametrize(("name", "make"), [("1f1b_3x4", lambda: one_f_one_b(3, 4)),
                                            ("gpipe_2x3", lambda: gpipe(2, 3))])
def test_golden_csv(name, make):
    path = GOLDEN / f"{name}.csv"
    text = to_csv(make())
    if os.environ.get("EDGE_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()
    assert from_csv(text) == make()


def test_csv_roundtrip_with_comms_and_versions():
    for s in (add_comms(add_step(one_f_one_b(3, 5))), async_1f1b(3, 7)):
        assert from_csv(to_csv(s)) == s


def test_swapped_action_is_caught_with_grid():
    s = one_f_one_b(3, 4)
    line = s[1]
    i, j = line.index(Action(1, Op.F, 1)), line.index(Action(1, Op.B, 0))
    line[i], line[j] = line[j], line[i]          # 1B0 now runs before 2B0 produced its gradient
    with pytest.raises(ScheduleError) as e:
        validate(s, 3, 4)
    msg = str(e.value)
    assert "1B0 at slot 2 needs the next stage's gradient but 2B0 runs at slot 3" in msg
    assert "stage 1  .   1F0 1B0 .   1F1" in msg                   # the grid
    assert msg.splitlines()[-1] == " " * (9 + 2 * 4) + "^^^ error at slot 2"


@pytest.mark.parametrize(("text", "match"), [
    ("0F0 0B0\n1F0 1B0", r"1F0 at slot 0 needs the previous stage's activations"),
    ("0F0 . . 0B0\n. 1F0 1B0 1B0", r"1B0 runs twice \(slots 2 and 3\)"),
    ("0F0 . . 0B0\n. 1F0 . .", r"1B0 is missing"),
    ("0F0 . . 0B0\n. 1F0 0B0 .", r"0B0 is in stage 1's timeline"),
    ("0F0 . . 0B0\n. 1F5 1B0 .", r"micro-batch must be in 0..0"),
    ("0F0 0SEND_F0 . . 0B0\n. . 1F0 1B0 .", r"0SEND_F0 has no matching 1RECV_F0"),
    ("0F0 . . 0B0 . .\n. 1F0 1B0 . . 1STEP", r"stage 0 has 0 STEPs"),
])
def test_validate_rejects(text, match):
    with pytest.raises(ScheduleError, match=match):
        validate(sched(text), 2, 1)


def test_validate_wrong_stage_count():
    with pytest.raises(ScheduleError, match=r"schedule has stages \[0, 1\], expected 0..2"):
        validate(one_f_one_b(2, 2), 3, 2)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_generator_arguments(bad):
    with pytest.raises(ConfigError, match="must be an integer >= 1"):
        one_f_one_b(bad, 2)
    with pytest.raises(ConfigError, match="n_mb must be an integer >= 1"):
        gpipe(2, bad)


def test_format_grid():
    assert format_grid(gpipe(2, 1), error_step=1) == (
        "slot     0   1   2   3\n"
        "stage 0  0F0 .   .   0B0\n"
        "stage 1  .   1F0 1B0 .\n"
        "             ^^^ error at slot 1")


def test_ideal_efficiency_anchor():
    assert ideal_efficiency(3, 8) == pytest.approx(0.8)     # K=3, M=8: 20 % bubble
    assert ideal_efficiency(1, 5) == 1.0


# ---- async (PipeDream-2BW) ----------------------------------------------------------------------

@pytest.mark.parametrize(("n_stages", "n_mb", "every"), [
    (1, 3, None), (2, 8, None), (3, 12, None), (4, 16, 4), (4, 10, 5), (3, 7, 3), (5, 20, 7),
    (4, 2, None)])
def test_async_2bw(n_stages, n_mb, every):
    s = async_1f1b(n_stages, n_mb, every)
    validate(s, n_stages, n_mb)
    validate(add_comms(s), n_stages, n_mb)
    m = n_stages if every is None else every
    for st in range(n_stages):
        assert live_versions(s, st) <= 2
        assert max_in_flight(s, st) == min(n_mb, n_stages - st)
        steps = [a for a in s[st] if a is not None and a.op is Op.STEP]
        assert [a.version for a in steps] == list(range(1, -(-n_mb // m) + 1))
        for a in s[st]:
            if a is not None and a.op in (Op.F, Op.B):
                assert a.version == max(0, a.mb // m - 1)   # group g uses version g - 1


def test_async_steady_state_has_no_flush():
    s = async_1f1b(3, 12)
    compute = [i for i, a in enumerate(s[2]) if a is not None and a.op in (Op.F, Op.B)]
    # The last stage is never idle between its first F and last B except for its STEPs.
    idle = [i for i in range(compute[0], compute[-1]) if s[2][i] is None]
    assert idle == []


def test_async_update_every_too_small():
    with pytest.raises(ConfigError, match="update_every must be an integer >= n_stages=3"):
        async_1f1b(3, 6, update_every=2)


def test_async_three_versions_rejected():
    # Stage 0 keeps v0 alive (0B1v0) after producing v1 and v2.
    s = sched("0F0v0 0F1v0 0B0v0 0STEPv1 0STEPv2 0B1v0")
    assert live_versions(s, 0) == 3
    with pytest.raises(ScheduleError, match="keeps 3 weight versions live at slot 4, over 2"):
        validate(s, 1, 2)
    validate(s, 1, 2, max_versions=3)


@pytest.mark.parametrize(("text", "match"), [
    ("0F0v0 0B0v1 0STEPv1", r"0B0v1 uses version 1, but stage 0 has made versions 0..0"),
    ("0F0v0 0STEPv2 0B0v0", r"0STEPv2 should produce version 1"),
    ("0F0v0 0STEPv1 0B0v1", r"0B0v1 and 0F0v0 use different versions"),
    ("0F0v0 0B0", r"0B0 uses version None"),
])
def test_async_version_errors(text, match):
    with pytest.raises(ScheduleError, match=match):
        validate(sched(text), 1, 1)


def test_sync_schedules_have_one_version():
    assert live_versions(add_step(one_f_one_b(3, 4)), 0) == 1
