"""A hand-written SVG line plot (no matplotlib): one series of (x, y) points per name, x on
a log10 axis. Used by bench/peers.py for the FVU-against-L0 frontiers of its sweep.

    svg = frontier_svg({"ours:relu": [(12.0, 0.21), (30.5, 0.12)]}, "title", "L0", "FVU")
"""

from __future__ import annotations

import math
from html import escape

COLORS = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#7f7f7f",
    "#bcbd22",
)
DASHES = ("", "6,3", "2,3")  # ours solid; each peer library its own dash (by name prefix)
W, H, LEFT, RIGHT, TOP, BOTTOM = 760, 480, 70, 230, 40, 55


def _ticks(lo: float, hi: float, log: bool) -> list[float]:
    """Tick values covering [lo, hi]: powers of 10 times 1, 2, 5 on a log axis, else 5 steps."""
    if log:
        out = [
            m * 10**e
            for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
            for m in (1, 2, 5)
        ]
        return [t for t in out if lo <= t <= hi] or [lo, hi]
    step = (hi - lo) / 5 or 1.0
    return [lo + i * step for i in range(6)]


def _axes(x_lo, x_hi, y_lo, y_hi, xlabel, ylabel):
    """SVG elements of the frame, ticks and labels, and the (x, y) -> pixel map."""
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def px(x, y):
        fx = (math.log10(x) - math.log10(x_lo)) / (math.log10(x_hi) - math.log10(x_lo))
        return LEFT + fx * pw, TOP + (1 - (y - y_lo) / (y_hi - y_lo)) * ph

    parts = [f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>']
    for t in _ticks(x_lo, x_hi, True):
        x, _ = px(t, y_lo)
        parts.append(f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{TOP + ph}" stroke="#eee"/>')
        parts.append(f'<text x="{x:.1f}" y="{TOP + ph + 16}" text-anchor="middle">{t:g}</text>')
    for t in _ticks(y_lo, y_hi, False):
        _, y = px(x_lo, t)
        parts.append(
            f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + pw}" y2="{y:.1f}" stroke="#eee"/>'
        )
        parts.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{t:.3g}</text>')
    parts.append(
        f'<text x="{LEFT + pw / 2}" y="{H - 12}" text-anchor="middle">{escape(xlabel)}</text>'
    )
    parts.append(
        f'<text x="16" y="{TOP + ph / 2}" text-anchor="middle" '
        f'transform="rotate(-90 16 {TOP + ph / 2})">{escape(ylabel)}</text>'
    )
    return parts, px


def _series(name, points, i, px, y_top):
    """A polyline with markers for one series, and its legend entry (the i-th)."""
    color = COLORS[i % len(COLORS)]
    prefixes = ("ours", "saelens", "sparsify", "dictionary_learning")
    which = next((j for j, p in enumerate(prefixes) if name.startswith(p)), 0)
    dash = DASHES[min(which, len(DASHES) - 1)] if which else ""
    pts = [(*px(x, min(y, y_top)), y > y_top) for x, y in sorted(points)]
    path = " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in pts)
    style = f' stroke-dasharray="{dash}"' if dash else ""
    out = [f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"{style}/>']
    out += [  # a point above the axis sits on its top edge, hollow
        f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{"white" if off else color}" '
        f'stroke="{color}"/>'
        for x, y, off in pts
    ]
    ly = TOP + 14 + 18 * i
    lx = W - RIGHT + 14
    out.append(
        f'<line x1="{lx}" y1="{ly - 4}" x2="{lx + 22}" y2="{ly - 4}" stroke="{color}" '
        f'stroke-width="2"{style}/>'
    )
    out.append(f'<text x="{lx + 28}" y="{ly}">{escape(name)}</text>')
    return out


def frontier_svg(
    series: dict[str, list[tuple[float, float]]], title, xlabel, ylabel, y_max: float = 1.2
) -> str:
    """The SVG document: each series' points joined in order of x (log axis), y linear
    from 0 to at most ``y_max`` (points above drawn hollow on the top edge); points with
    x <= 0 or a non-finite coordinate are left out."""
    clean = {
        name: [(x, y) for x, y in pts if x > 0 and math.isfinite(x) and math.isfinite(y)]
        for name, pts in series.items()
    }
    clean = {name: pts for name, pts in clean.items() if pts}
    xs = [x for pts in clean.values() for x, _ in pts] or [1.0, 10.0]
    ys = [y for pts in clean.values() for _, y in pts] or [1.0]
    x_lo, x_hi = min(xs) / 1.3, max(xs) * 1.3
    y_hi = min(max(ys) * 1.1, y_max) or 1.0
    parts, px = _axes(x_lo, x_hi, 0.0, y_hi, xlabel, ylabel)
    for i, (name, pts) in enumerate(clean.items()):
        parts += _series(name, pts, i, px, y_hi)
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
        f'font-family="sans-serif" font-size="11">'
        f'<rect width="{W}" height="{H}" fill="white"/>'
        f'<text x="{LEFT}" y="22" font-size="14">{escape(title)}</text>'
    )
    return head + "".join(parts) + "</svg>\n"
