"""Tiny inline-SVG charts (line, horizontal bar, lane/Gantt) for the dashboard; stdlib only.

Notebooks render the returned strings as HTML (ipywidgets.HTML or `_repr_html_`), so the dashboard
needs no matplotlib at run time and a snapshot is one self-contained HTML file.

Examples
--------
>>> svg = line_chart([Series("train", [1, 2, 3], [0.7, 0.6, 0.5])], title="loss", xlabel="step")
>>> svg.startswith("<svg") and "train" in svg and "step" in svg
True
>>> nice_ticks(0.0, 1.0, 5)
[0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from html import escape

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf")
RED, GREY, LIGHT = "#d62728", "#666", "#e6e6e6"
FONT = 'font-family="system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif"'


@dataclass
class Series:
    """One line: a name for the legend, x and y values (NaN/None points are skipped)."""

    name: str
    xs: Sequence[float]
    ys: Sequence[float | None]
    color: str | None = None
    dashed: bool = False
    markers: bool = False


@dataclass
class Bar:
    """One horizontal bar: `value` filled, `peak` as a lighter extension, `limit` as a marker."""

    label: str
    value: float
    peak: float | None = None
    limit: float | None = None
    note: str = ""
    color: str | None = None      # default: blue, red above warn_at x limit


@dataclass
class Span:
    """One box on a lane chart (timeline): lane index, [t0, t1), a short label, a colour."""

    lane: int
    t0: float
    t1: float
    label: str = ""
    color: str = PALETTE[0]
    title: str = ""


@dataclass
class _Frame:
    """Plot area inside the SVG and the data ranges it maps."""

    width: int
    height: int
    x0: float
    x1: float
    y0: float
    y1: float
    left: int = 52
    right: int = 12
    top: int = 26
    bottom: int = 38
    parts: list[str] = field(default_factory=list)

    def px(self, x: float) -> float:
        span = (self.x1 - self.x0) or 1.0
        return self.left + (x - self.x0) / span * (self.width - self.left - self.right)

    def py(self, y: float) -> float:
        span = (self.y1 - self.y0) or 1.0
        return self.height - self.bottom - (y - self.y0) / span * (
            self.height - self.top - self.bottom)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values (steps of 1, 2, 2.5 or 5 x 10^k) covering [lo, hi], about n of them."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * 0.999)
    first = math.floor(lo / step + 1e-9) * step
    last = math.ceil(hi / step - 1e-9) * step
    out = [round(first + k * step, 12) for k in range(int(round((last - first) / step)) + 1)]
    return out


def fmt_num(v: float) -> str:
    """Short tick label: 0.5, 12, 1.2k, 3e-05."""
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e4:
        return f"{v / 1e3:.0f}k"
    if a >= 1e3:
        return f"{v / 1e3:.1f}k".replace(".0k", "k")
    if a < 1e-3:
        return f"{v:.0e}"
    return f"{v:.4g}"


def _open(w: int, h: int, title: str) -> list[str]:
    return [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
            f'viewBox="0 0 {w} {h}" {FONT} font-size="11" role="img">',
            f"<title>{escape(title)}</title>",
            f'<rect width="{w}" height="{h}" fill="white"/>',
            f'<text x="8" y="16" font-size="13" font-weight="600" fill="#222">{escape(title)}'
            f"</text>"]


def _axes(f: _Frame, xticks: list[float], yticks: list[float], xlabel: str, ylabel: str,
          xfmt: Callable[[float], str] = fmt_num, yfmt: Callable[[float], str] = fmt_num) -> None:
    p = f.parts
    for y in yticks:
        yy = f.py(y)
        p.append(f'<line x1="{f.left}" y1="{yy:.1f}" x2="{f.width - f.right}" y2="{yy:.1f}" '
                 f'stroke="{LIGHT}"/>')
        p.append(f'<text x="{f.left - 5}" y="{yy + 4:.1f}" text-anchor="end" fill="{GREY}">'
                 f"{escape(yfmt(y))}</text>")
    base = f.height - f.bottom
    for x in xticks:
        xx = f.px(x)
        p.append(f'<line x1="{xx:.1f}" y1="{base}" x2="{xx:.1f}" y2="{base + 4}" stroke="{GREY}"/>')
        p.append(f'<text x="{xx:.1f}" y="{base + 15}" text-anchor="middle" fill="{GREY}">'
                 f"{escape(xfmt(x))}</text>")
    p.append(f'<line x1="{f.left}" y1="{base}" x2="{f.width - f.right}" y2="{base}" '
             f'stroke="#444"/>')
    p.append(f'<line x1="{f.left}" y1="{f.top}" x2="{f.left}" y2="{base}" stroke="#444"/>')
    mid = (f.left + f.width - f.right) / 2
    p.append(f'<text x="{mid:.0f}" y="{f.height - 6}" text-anchor="middle" fill="#333">'
             f"{escape(xlabel)}</text>")
    if ylabel:
        cy = (f.top + base) / 2
        p.append(f'<text x="12" y="{cy:.0f}" text-anchor="middle" fill="#333" '
                 f'transform="rotate(-90 12 {cy:.0f})">{escape(ylabel)}</text>')


def _legend(f: _Frame, items: list[tuple[str, str, bool]]) -> None:
    """Legend in the top-right corner: (name, colour, dashed)."""
    x = f.width - f.right
    for name, color, dashed in reversed(items):
        x -= 26 + 6.5 * len(name)
        dash = ' stroke-dasharray="5 3"' if dashed else ""
        f.parts.append(f'<line x1="{x:.0f}" y1="12" x2="{x + 16:.0f}" y2="12" stroke="{color}" '
                       f'stroke-width="2.5"{dash}/>')
        f.parts.append(f'<text x="{x + 20:.0f}" y="16" fill="#333">{escape(name)}</text>')


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def line_chart(series: Sequence[Series], *, title: str = "", xlabel: str = "", ylabel: str = "",
               width: int = 460, height: int = 220, y_min: float | None = None,
               y_max: float | None = None, empty: str = "no data yet",
               yfmt: Callable[[float], str] = fmt_num) -> str:
    """An SVG line chart with axes, ticks, grid, axis labels and a legend."""
    pts = [(x, y) for s in series for x, y in zip(s.xs, s.ys, strict=False) if _finite(y)]
    parts = _open(width, height, title)
    if not pts:
        parts.append(f'<text x="{width / 2:.0f}" y="{height / 2:.0f}" text-anchor="middle" '
                     f'fill="#999">{escape(empty)}</text></svg>')
        return "".join(parts)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    xlo, xhi = min(xs), max(xs)
    ylo = min(ys) if y_min is None else y_min
    yhi = max(ys) if y_max is None else y_max
    if yhi - ylo < 1e-12:
        ylo, yhi = ylo - 0.5 * (abs(ylo) or 1), yhi + 0.5 * (abs(yhi) or 1)
    pad = 0.05 * (yhi - ylo)
    yt = nice_ticks(ylo - (pad if y_min is None else 0), yhi + (pad if y_max is None else 0), 4)
    xt = nice_ticks(xlo, xhi if xhi > xlo else xlo + 1, 6)
    f = _Frame(width, height, xt[0], xt[-1], yt[0], yt[-1], parts=parts)
    _axes(f, xt, yt, xlabel, ylabel, yfmt=yfmt)
    legend = []
    for i, s in enumerate(series):
        color = s.color or PALETTE[i % len(PALETTE)]
        sp = [(f.px(x), f.py(y)) for x, y in zip(s.xs, s.ys, strict=False) if _finite(y)]
        if not sp:
            continue
        dash = ' stroke-dasharray="5 3"' if s.dashed else ""
        d = " ".join(f"{x:.1f},{y:.1f}" for x, y in sp)
        parts.append(f'<polyline points="{d}" fill="none" stroke="{color}" stroke-width="1.8"'
                     f'{dash} stroke-linejoin="round"/>')
        if s.markers or len(sp) == 1:
            parts.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>' for x, y in sp)
        legend.append((s.name, color, s.dashed))
    _legend(f, legend)
    parts.append("</svg>")
    return "".join(parts)


def hbar_chart(bars: Sequence[Bar], *, title: str = "", xlabel: str = "", width: int = 460,
               bar_h: int = 18, warn_at: float = 0.9, empty: str = "no data yet",
               unit: str = "") -> str:
    """Horizontal bars (one per label) with an optional peak extension and a limit marker.

    A bar whose value or peak exceeds `warn_at` x its limit is drawn red.
    """
    row = bar_h + 22                     # bar + a line of text under it
    height = 26 + 38 + max(1, len(bars)) * row
    parts = _open(width, height, title)
    if not bars:
        parts.append(f'<text x="{width / 2:.0f}" y="{height / 2 + 8:.0f}" text-anchor="middle" '
                     f'fill="#999">{escape(empty)}</text></svg>')
        return "".join(parts)
    hi = max(max(b.value, b.peak or 0, b.limit or 0) for b in bars) * 1.02 or 1.0
    xt = nice_ticks(0.0, hi, 5)
    label_w = 8 + 7 * max(len(b.label) for b in bars)
    f = _Frame(width, height, 0.0, xt[-1], 0, 1, left=label_w, right=16, parts=parts)
    _axes(f, xt, [], xlabel, "")
    for i, b in enumerate(bars):
        y = f.top + 6 + i * row
        frac = max(b.value, b.peak or 0) / b.limit if b.limit else 0.0
        color = b.color or (RED if b.limit and frac > warn_at else PALETTE[0])
        parts.append(f'<text x="{label_w - 6}" y="{y + bar_h / 2 + 4:.0f}" text-anchor="end" '
                     f'fill="#222">{escape(b.label)}</text>')
        parts.append(f'<rect x="{f.left}" y="{y}" width="{f.width - f.right - f.left}" '
                     f'height="{bar_h}" fill="#f3f3f3"/>')
        if b.peak is not None and b.peak > b.value:
            parts.append(f'<rect x="{f.left}" y="{y}" width="{f.px(b.peak) - f.left:.1f}" '
                         f'height="{bar_h}" fill="{color}" opacity="0.35"/>')
        parts.append(f'<rect x="{f.left}" y="{y}" width="{max(0.5, f.px(b.value) - f.left):.1f}" '
                     f'height="{bar_h}" fill="{color}"/>')
        if b.limit:
            lx = f.px(b.limit)
            parts.append(f'<line x1="{lx:.1f}" y1="{y - 3}" x2="{lx:.1f}" y2="{y + bar_h + 3}" '
                         f'stroke="#222" stroke-width="2.5"/>')
        note = b.note or (f"{fmt_num(b.value)}{unit}" + (
            f" / {fmt_num(b.limit)}{unit} ({100 * frac:.0f}%)" if b.limit else ""))
        ink = RED if color == RED else "#444"
        parts.append(f'<text x="{f.left}" y="{y + bar_h + 13}" fill="{ink}" '
                     f'font-size="10.5">{escape(note)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def lane_chart(spans: Sequence[Span], lanes: Sequence[str], *, title: str = "",
               xlabel: str = "", width: int = 460, lane_h: int = 22,
               legend: Sequence[tuple[str, str]] = (), empty: str = "no data yet") -> str:
    """Boxes on horizontal lanes (a Gantt chart): which lane did what, when."""
    height = 26 + 38 + max(1, len(lanes)) * (lane_h + 6)
    parts = _open(width, height, title)
    if not spans:
        parts.append(f'<text x="{width / 2:.0f}" y="{height / 2 + 8:.0f}" text-anchor="middle" '
                     f'fill="#999">{escape(empty)}</text></svg>')
        return "".join(parts)
    t0, t1 = min(s.t0 for s in spans), max(s.t1 for s in spans)
    xt = nice_ticks(t0, t1, 6)
    label_w = 8 + 7 * max(len(n) for n in lanes)
    f = _Frame(width, height, xt[0], xt[-1], 0, 1, left=label_w, right=16, parts=parts)
    _axes(f, xt, [], xlabel, "")
    for i, name in enumerate(lanes):
        y = f.top + 4 + i * (lane_h + 6)
        parts.append(f'<text x="{label_w - 6}" y="{y + lane_h / 2 + 4:.0f}" text-anchor="end" '
                     f'fill="#222">{escape(name)}</text>')
    for s in spans:
        y = f.top + 4 + s.lane * (lane_h + 6)
        x0, x1 = f.px(s.t0), f.px(s.t1)
        tip = f"<title>{escape(s.title)}</title>" if s.title else ""
        parts.append(f'<rect x="{x0:.1f}" y="{y}" width="{max(1.0, x1 - x0 - 1):.1f}" '
                     f'height="{lane_h}" fill="{s.color}" rx="2">{tip}</rect>')
        if s.label and x1 - x0 >= 6.5 * len(s.label) + 2:
            parts.append(f'<text x="{(x0 + x1) / 2:.1f}" y="{y + lane_h / 2 + 4:.0f}" '
                         f'text-anchor="middle" fill="white">{escape(s.label)}</text>')
    _legend(f, [(n, c, False) for n, c in legend])
    parts.append("</svg>")
    return "".join(parts)
