"""Small inline SVG plots for the build report: a labelled scatter with its Pareto front (no scripts, no CDN)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Point:
    name: str
    x: float
    y: float
    kind: str  # baseline | winner | kept | rejected


def pareto_front(points: Sequence[Point], *, x_lower_is_better: bool = True) -> list[Point]:
    """Points that no other point beats on both quality (y, higher) and cost (x)."""
    front = []
    for p in points:
        dominated = any(
            (q.y >= p.y and (q.x <= p.x if x_lower_is_better else q.x >= p.x)) and (q.y > p.y or q.x != p.x)
            for q in points
        )
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: p.x)


_COLORS = {"baseline": "#6b7280", "winner": "#059669", "rejected": "#dc2626", "kept": "#2563eb"}


def scatter_svg(points: Sequence[Point], *, title: str, x_label: str, y_label: str) -> str:
    """A small labelled scatter plot with the Pareto front drawn as a line."""
    width, height, pad = 520, 320, 56
    if not points:
        return f"<p>No measured candidates for {html.escape(title)}.</p>"
    xs, ys = [p.x for p in points], [p.y for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    xspan = (x1 - x0) or abs(x1) * 0.1 or 1.0
    yspan = (y1 - y0) or abs(y1) * 0.02 or 1.0
    x0, x1, y0, y1 = x0 - 0.08 * xspan, x1 + 0.08 * xspan, y0 - 0.1 * yspan, y1 + 0.1 * yspan

    def sx(x: float) -> float:
        return pad + (x - x0) / (x1 - x0) * (width - 2 * pad)

    def sy(y: float) -> float:
        return height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad)

    parts = [
        f'<svg class="plot" role="img" aria-label="{html.escape(title)}" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
        f'<text x="{width / 2}" y="18" text-anchor="middle" font-weight="bold">{html.escape(title)}</text>',
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#111"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#111"/>',
        f'<text x="{width / 2}" y="{height - 14}" text-anchor="middle">{html.escape(x_label)}</text>',
        f'<text x="14" y="{height / 2}" text-anchor="middle" transform="rotate(-90 14 {height / 2})">'
        f"{html.escape(y_label)}</text>",
    ]
    for frac in (0.0, 0.5, 1.0):
        xv, yv = x0 + frac * (x1 - x0), y0 + frac * (y1 - y0)
        parts.append(f'<text x="{sx(xv)}" y="{height - pad + 16}" text-anchor="middle" font-size="11">{xv:.3g}</text>')
        parts.append(f'<text x="{pad - 6}" y="{sy(yv) + 4}" text-anchor="end" font-size="11">{yv:.4g}</text>')
    front = pareto_front(points)
    if len(front) > 1:
        path = " ".join(f"{sx(p.x):.1f},{sy(p.y):.1f}" for p in front)
        parts.append(f'<polyline class="pareto" points="{path}" fill="none" stroke="#059669" stroke-dasharray="4 3"/>')
    placed: list[tuple[float, float]] = []
    for p in sorted(points, key=lambda q: (q.x, -q.y)):
        r = 7 if p.kind == "winner" else 5
        cx, cy = sx(p.x), sy(p.y)
        parts.append(
            f'<circle class="point {p.kind}" cx="{cx:.1f}" cy="{cy:.1f}" r="{r}" fill="{_COLORS[p.kind]}">'
            f"<title>{html.escape(p.name)}: {p.x:.4g}, {p.y:.4g}</title></circle>"
        )
        # Labels of nearby points are stacked downwards instead of printed over each other.
        lx, ly = cx + 8, cy - 6
        while any(abs(lx - px) < 90 and abs(ly - py) < 12 for px, py in placed):
            ly += 13
        placed.append((lx, ly))
        parts.append(f'<text x="{lx:.1f}" y="{ly:.1f}" font-size="11">{html.escape(p.name)}</text>')
    parts.append("</svg>")
    return "".join(parts)
