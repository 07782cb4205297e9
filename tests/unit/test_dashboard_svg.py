"""control/svg.py: ticks, coordinates and what a reader needs (axes, labels, legend)."""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET

import pytest

from control.svg import (RED, Bar, Series, Span, fmt_num, hbar_chart, lane_chart, line_chart,
                         nice_ticks)

NS = "{http://www.w3.org/2000/svg}"


def parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)       # well-formed XML, or this raises


def texts(root: ET.Element) -> list[str]:
    return [t.text or "" for t in root.iter(f"{NS}text")]


@pytest.mark.parametrize("lo,hi,n", [(0, 1, 5), (0.44, 0.71, 4), (50, 75.9, 4), (0, 1050, 6),
                                     (1, 60, 6), (-3.2, 7.9, 5), (1e-5, 3e-4, 4), (3, 3, 4)])
def test_nice_ticks_cover_the_range_with_round_steps(lo, hi, n):
    t = nice_ticks(lo, hi, n)
    assert t[0] <= lo and t[-1] >= min(hi, t[-1])
    assert t[-1] >= hi or hi <= lo
    steps = {round(b - a, 12) for a, b in zip(t, t[1:], strict=False)}
    assert len(steps) == 1, t                        # evenly spaced
    step = steps.pop()
    mant = step / 10 ** math.floor(math.log10(step))
    assert any(math.isclose(mant, m) for m in (1, 2, 2.5, 5)), step
    assert 2 <= len(t) <= 2 * n + 2


def test_nice_ticks_rejects_non_finite():
    assert nice_ticks(0, math.inf) == []


def test_fmt_num():
    assert [fmt_num(v) for v in (0, 0.5, 12, 1200, 15000, 3e-5)] == ["0", "0.5", "12", "1.2k",
                                                                      "15k", "3e-05"]


def test_line_chart_maps_points_into_the_plot_area():
    xs, ys = [0, 10, 20], [0.7, 0.6, 0.5]
    root = parse(line_chart([Series("train", xs, ys), Series("held-out", [0, 20], [0.69, None],
                                                             dashed=True)],
                            title="Loss", xlabel="step", ylabel="cross-entropy", width=400,
                            height=200))
    assert root.get("width") == "400"
    polys = list(root.iter(f"{NS}polyline"))
    assert len(polys) == 2
    pts = [tuple(map(float, p.split(","))) for p in polys[0].get("points").split()]
    assert len(pts) == 3
    assert all(0 < x < 400 and 0 < y < 200 for x, y in pts)
    assert pts[0][0] < pts[1][0] < pts[2][0]          # x grows to the right
    assert pts[0][1] < pts[1][1] < pts[2][1]          # lower loss is drawn lower (larger y)
    # a None point is skipped, a single point gets a marker
    assert len(polys[1].get("points").split()) == 1
    assert polys[1].get("stroke-dasharray")
    t = texts(root)
    for label in ("Loss", "step", "cross-entropy", "train", "held-out", "0.5", "0.7", "20"):
        assert label in t, (label, t)


def test_line_chart_empty_says_so():
    root = parse(line_chart([Series("train", [], [])], title="Loss", empty="no data yet"))
    assert "no data yet" in texts(root) and not list(root.iter(f"{NS}polyline"))


def test_hbar_chart_marks_the_limit_and_turns_red_above_warn():
    svg = hbar_chart([Bar("board0", 450, 470, 500), Bar("board1", 100, None, 400),
                      Bar("board2", 50)], title="Memory", xlabel="MiB", warn_at=0.9, unit=" MiB")
    root = parse(svg)
    rects = [r for r in root.iter(f"{NS}rect") if r.get("fill") not in ("white", "#f3f3f3")]
    fills = [r.get("fill") for r in rects]
    assert fills.count(RED) == 2          # board0's peak extension and bar: 470 / 500 = 94%
    lines = [ln for ln in root.iter(f"{NS}line") if ln.get("stroke-width") == "2.5"]
    assert len(lines) == 2                # limit markers for the two boards with a budget
    t = " ".join(texts(root))
    assert "board0" in t and "94%" in t and "25%" in t and "MiB" in t
    # the limit marker of board1 sits at 400 on the same scale as board0's at 500
    x400, x500 = sorted(float(ln.get("x1")) for ln in lines)
    x0 = float(next(r for r in rects).get("x"))
    assert math.isclose((x400 - x0) / (x500 - x0), 0.8, rel_tol=1e-2)


def test_lane_chart_places_spans_on_their_lanes():
    spans = [Span(0, 0.0, 1.0, "F0"), Span(1, 1.0, 2.0, "F0"), Span(0, 2.0, 3.0, "B0", RED)]
    root = parse(lane_chart(spans, ["board0", "board1"], title="Timeline", xlabel="ms",
                            legend=[("forward", "#1f77b4")]))
    boxes = [r for r in root.iter(f"{NS}rect") if r.get("rx") == "2"]
    assert len(boxes) == 3
    ys = [float(b.get("y")) for b in boxes]
    assert ys[0] == ys[2] < ys[1]
    assert float(boxes[0].get("x")) < float(boxes[1].get("x")) < float(boxes[2].get("x"))
    t = texts(root)
    assert {"board0", "board1", "forward", "ms", "Timeline"} <= set(t)


def test_text_is_escaped():
    svg = line_chart([Series("<b>&", [1], [1.0])], title="a<b")
    parse(svg)
    assert "<b>&" not in svg and re.search("&lt;b&gt;&amp;", svg)
