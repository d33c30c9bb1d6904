"""Labels next to the points of a scatter plot, placed so that they do not collide.

Each label goes to the first of a few spots around its point that stays inside the axes, is
nearer to its own point than to any other, and overlaps no marker, no earlier label and not the
legend. Spots further out, tried next, get a thin leader line to their point; when no spot is
free, the one with the least overlap is taken. Used by :func:`acert.records.plots.plot_tradeoff`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from matplotlib.transforms import Bbox

__all__ = ["LABEL_SPOTS", "place_labels"]

_NEAR = (
    (7, 5, "left", "bottom"),
    (7, -5, "left", "top"),
    (-7, 5, "right", "bottom"),
    (-7, -5, "right", "top"),
    (0, 10, "center", "bottom"),
    (0, -10, "center", "top"),
)
LABEL_SPOTS = tuple((dx, dy, ha, va, False) for dx, dy, ha, va in _NEAR) + tuple(
    (3 * dx, 3 * dy, ha, va, True) for dx, dy, ha, va in _NEAR
)
"""Where a label may go, tried in order: offset (points), alignment, and whether the spot is
far enough out to need a leader line."""

_MARKER_HALF = 8.0
"""Half the side (display units) of the box a marker keeps free of labels."""


def _gap(box: Bbox, point: Sequence[float]) -> float:
    """Distance (display units) from a point to a box, 0 inside it."""
    dx = max(box.x0 - point[0], 0.0, point[0] - box.x1)
    dy = max(box.y0 - point[1], 0.0, point[1] - box.y1)
    return math.hypot(dx, dy)


def _overlap(a: Bbox, b: Bbox) -> float:
    """Area (display units²) shared by two boxes."""
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(width, 0.0) * max(height, 0.0)


def _annotate(axes, renderer, x: float, y: float, text: str, spot: tuple) -> tuple[Any, Bbox]:
    dx, dy, ha, va, leader = spot
    note = axes.annotate(
        text,
        (x, y),
        textcoords="offset points",
        xytext=(dx, dy),
        ha=ha,
        va=va,
        fontsize=8,
        bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85},
        arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.6} if leader else None,
        zorder=6,
    )
    return note, note.get_window_extent(renderer)


def _cost(box: Bbox, own, frame: Bbox, taken: list[Bbox], centres: list, leader: bool) -> float:
    """0 for a free spot; else large when outside the axes or nearer to another point (without
    a leader line), plus the area it covers of markers, labels and legend."""
    inside = frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
    nearest = leader or all(_gap(box, own) <= _gap(box, c) for c in centres)
    return (
        (0.0 if inside else 1e6)
        + (0.0 if nearest else 1e4)
        + sum(_overlap(box, other) for other in taken)
    )


def place_labels(axes, items: list[tuple[float, float, str]], points: list) -> None:
    """Label points where the labels stay readable (see the module docstring).

    Args:
        axes: the drawn axes (legend included).
        items: (x, y, label) of the points to label, data units.
        points: every plotted (x, y), data units.
    """
    figure = axes.figure
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    frame = axes.get_window_extent(renderer)
    centres = [axes.transData.transform(point) for point in points]
    h = _MARKER_HALF
    taken = [Bbox.from_extents(px - h, py - h, px + h, py + h) for px, py in centres]
    if axes.get_legend() is not None:
        taken.append(axes.get_legend().get_window_extent(renderer))
    for x, y, text in items:
        own = axes.transData.transform((x, y))
        best = (math.inf, LABEL_SPOTS[0])
        for spot in LABEL_SPOTS:
            note, box = _annotate(axes, renderer, x, y, text, spot)
            cost = _cost(box, own, frame, taken, centres, spot[4])
            if cost == 0:
                break
            note.remove()
            best = min(best, (cost, spot))
        else:
            note, box = _annotate(axes, renderer, x, y, text, best[1])
        taken.append(box)
