"""Charts as inline SVG, drawn on the server: no script, no library, readable offline."""

from __future__ import annotations

from collections.abc import Callable
from html import escape

# Colour-blind-safe (Okabe-Ito), then greys.
PALETTE = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442")
WIDTH, HEIGHT, LEFT, BOTTOM = 640, 220, 8, 28


def stacked_bars(days: list[str], series: dict[str, list[int]], label: Callable[[int], str]) -> str:
    """One bar per day, stacked by series name; a legend below with each name's total."""
    if not any(any(values) for values in series.values()):
        return '<p class="empty">Nothing yet in these days.</p>'
    names = sorted(series, key=lambda n: -sum(series[n]))
    colours = {n: PALETTE[i] if i < len(PALETTE) else "#999" for i, n in enumerate(names)}
    totals = [sum(series[n][i] for n in names) for i in range(len(days))]
    top = max(totals) or 1
    slot = (WIDTH - LEFT) / len(days)
    bar = slot * 0.7
    plot = HEIGHT - BOTTOM
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'preserveAspectRatio="none" aria-label="per day">'
    ]
    for i, day in enumerate(days):
        x = LEFT + i * slot + (slot - bar) / 2
        y = plot
        for name in names:
            value = series[name][i]
            if not value:
                continue
            h = value / top * (plot - 12)
            y -= h
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                f'fill="{colours[name]}"><title>{escape(day)} {escape(name)}: '
                f"{escape(label(value))}</title></rect>"
            )
        if (len(days) - 1 - i) % 2 == 0 or len(days) <= 8:  # today always labelled
            parts.append(
                f'<text x="{x + bar / 2:.1f}" y="{HEIGHT - 10}" text-anchor="middle">'
                f"{escape(day[5:])}</text>"
            )
    parts.append("</svg>")
    legend = "".join(
        f'<li><span class="swatch" style="background:{colours[n]}"></span>'
        f"{escape(n)} <b>{escape(label(sum(series[n])))}</b></li>"
        for n in names
    )
    return "".join(parts) + f'<ul class="legend">{legend}</ul>'
