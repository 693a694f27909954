"""Tiny inline SVG charts for the offline report: no JavaScript, no CDN, no plotting library."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

WIDTH, HEIGHT, PAD_L, PAD_R, PAD_T, PAD_B = 640, 220, 56, 16, 16, 36
COLOURS = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c")


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _frame(title: str, body: str, legend: Sequence[str]) -> str:
    items = "".join(
        f'<tspan fill="{COLOURS[i % len(COLOURS)]}" dx="12">■ {escape(name)}</tspan>' for i, name in enumerate(legend)
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" viewBox="0 0 {WIDTH} {HEIGHT + 18}" '
        f'width="{WIDTH}" height="{HEIGHT + 18}" font-family="sans-serif" font-size="11">'
        f"<title>{escape(title)}</title>"
        f'<text x="{PAD_L}" y="12" font-weight="bold">{escape(title)}</text>'
        f'<text x="{WIDTH - PAD_R}" y="12" text-anchor="end">{items}</text>'
        f'<g transform="translate(0,18)">{body}</g></svg>'
    )


def line_chart(
    title: str,
    x: Sequence[float],
    series: dict[str, Sequence[float | None]],
    *,
    x_label: str = "",
    y_min: float | None = None,
    y_max: float | None = None,
) -> str:
    """Lines over a shared x axis; ``None`` values leave gaps."""
    values = [v for s in series.values() for v in s if v is not None]
    if not x or not values:
        return _frame(title, f'<text x="{PAD_L}" y="{HEIGHT / 2}">no data yet</text>', [])
    lo = min(values) if y_min is None else y_min
    hi = max(values) if y_max is None else y_max
    hi = hi if hi > lo else lo + 1.0
    x0, x1 = min(x), max(x)
    span = x1 - x0 if x1 > x0 else 1.0

    def px(v: float) -> float:
        return PAD_L + (v - x0) / span * (WIDTH - PAD_L - PAD_R)

    def py(v: float) -> float:
        return PAD_T + (1 - (v - lo) / (hi - lo)) * (HEIGHT - PAD_T - PAD_B)

    parts = [
        f'<line x1="{PAD_L}" y1="{HEIGHT - PAD_B}" x2="{WIDTH - PAD_R}" y2="{HEIGHT - PAD_B}" stroke="#999"/>',
        f'<line x1="{PAD_L}" y1="{PAD_T}" x2="{PAD_L}" y2="{HEIGHT - PAD_B}" stroke="#999"/>',
        f'<text x="{PAD_L - 4}" y="{py(hi) + 4}" text-anchor="end">{_fmt(hi)}</text>',
        f'<text x="{PAD_L - 4}" y="{py(lo)}" text-anchor="end">{_fmt(lo)}</text>',
        f'<text x="{(PAD_L + WIDTH) / 2}" y="{HEIGHT - 6}" text-anchor="middle">{escape(x_label)}</text>',
        f'<text x="{PAD_L}" y="{HEIGHT - PAD_B + 14}" text-anchor="middle">{_fmt(x0)}</text>',
        f'<text x="{WIDTH - PAD_R}" y="{HEIGHT - PAD_B + 14}" text-anchor="end">{_fmt(x1)}</text>',
    ]
    for i, (_, ys) in enumerate(series.items()):
        segments: list[list[str]] = [[]]
        for xv, yv in zip(x, ys, strict=True):
            if yv is None:
                segments.append([])
            else:
                segments[-1].append(f"{px(xv):.1f},{py(min(max(yv, lo), hi)):.1f}")
        colour = COLOURS[i % len(COLOURS)]
        for seg in segments:
            if len(seg) == 1:
                cx, cy = seg[0].split(",")
                parts.append(f'<circle cx="{cx}" cy="{cy}" r="2.5" fill="{colour}"/>')
            elif seg:
                parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.8" points="{" ".join(seg)}"/>')
    return _frame(title, "".join(parts), list(series))


def bar_chart(
    title: str,
    labels: Sequence[str],
    values: Sequence[float],
    *,
    threshold: float | None = None,
    flags: Sequence[bool] | None = None,
) -> str:
    """Horizontal bars, one per label (e.g. PSI per feature), with an optional threshold line; a bar is red
    when its flag is set (or, without flags, when it is over the threshold)."""
    if not labels:
        return _frame(title, f'<text x="{PAD_L}" y="{HEIGHT / 2}">no data yet</text>', [])
    hi = max([*values, threshold or 0.0, 1e-9])
    row = min((HEIGHT - PAD_T - 8) / len(labels), 22.0)
    left = 150
    scale = (WIDTH - left - PAD_R) / hi
    parts = []
    for i, (label, v) in enumerate(zip(labels, values, strict=True)):
        y = PAD_T + i * row
        over = flags[i] if flags is not None else threshold is not None and v > threshold
        parts.append(
            f'<text x="{left - 6}" y="{y + row * 0.7:.1f}" text-anchor="end">{escape(label)}</text>'
            f'<rect x="{left}" y="{y + 1:.1f}" width="{max(v, 0) * scale:.1f}" height="{max(row - 2, 1):.1f}" '
            f'fill="{COLOURS[1] if over else COLOURS[0]}"><title>{escape(label)}: {_fmt(v)}</title></rect>'
        )
    if threshold is not None:
        tx = left + threshold * scale
        parts.append(
            f'<line x1="{tx:.1f}" y1="{PAD_T}" x2="{tx:.1f}" y2="{PAD_T + row * len(labels):.1f}" stroke="#111" '
            'stroke-dasharray="4 3"/>'
        )
    return _frame(title, "".join(parts), [])
