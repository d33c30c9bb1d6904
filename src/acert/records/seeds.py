"""A study's runs grouped over their seeds: each point's mean and spread, the trade-off figure
with error bars and the answer a reader asks first — how far ACERT's front lies above each
baseline's at equal clean accuracy, beyond the seed spread.

A point is a method with its knobs (the sweep's ``point`` without ``seed``); its spread is the
range (lowest to highest) of its seeds. ``acert plot`` writes ``tradeoff_seeds.png`` and
``seeds.md`` beside the other figures once some point has two seeds or more.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from acert.foundation.errors import AcertError
from acert.records.plots import MARKERS, knob_label, save_figure
from acert.records.runs import atomic_write
from acert.records.study import bound_scores

__all__ = [
    "FrontGap",
    "SeedPoint",
    "Spread",
    "adaptive_methods",
    "front_gaps",
    "gaps_markdown",
    "plot_seed_tradeoff",
    "seed_points",
    "seeds_markdown",
    "write_seed_report",
]


ADAPTIVE_PREFIX = "adaptive-"

COLORS = (*plt.get_cmap("tab10").colors, "black", "olive")
"""One colour per method: matplotlib's ten, then two more (the study has eleven methods)."""


@dataclass(frozen=True)
class Spread:
    """The mean and range of one quantity over a point's seeds."""

    mean: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(float(np.mean(values)), float(min(values)), float(max(values)))

    def meets(self, other: Spread) -> bool:
        """Whether the two ranges overlap."""
        return self.low <= other.high and other.low <= self.high

    def text(self, digits: int = 1) -> str:
        if self.low == self.high:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


@dataclass(frozen=True)
class SeedPoint:
    """One method and knob setting over its seeds; clean accuracy and ACR in % (of ε_max)."""

    method: str
    knobs: str
    seeds: tuple[int, ...]
    clean: Spread
    acr_pct: Spread

    @property
    def label(self) -> str:
        return f"{self.method} {knob_label(self.knobs)}".strip()


def _knobs_and_seed(point: str) -> tuple[str, int]:
    parts = [p for p in str(point or "").split(", ") if p]
    seeds = [int(p.partition("=")[2]) for p in parts if p.startswith("seed=")]
    return ", ".join(p for p in parts if not p.startswith("seed=")), (seeds[0] if seeds else 0)


def seed_points(rows: Sequence[dict[str, Any]], bound: str = "ibp") -> list[SeedPoint]:
    """The study's rows (:func:`acert.records.study.study_table`) grouped over seeds, under
    ``bound``; rows without that bound's metrics are left out."""
    groups: dict[tuple[str, str], list[tuple[int, dict[str, float]]]] = {}
    for row in rows:
        scores = bound_scores(row, bound)
        if scores is None:
            continue
        knobs, seed = _knobs_and_seed(row.get("point", ""))
        groups.setdefault((str(row["method"]), knobs), []).append((seed, scores))
    return [
        SeedPoint(
            method,
            knobs,
            tuple(sorted(seed for seed, _ in members)),
            Spread.of([s["clean"] for _, s in members]),
            Spread.of([s["acr_pct"] for _, s in members]),
        )
        for (method, knobs), members in groups.items()
    ]


@dataclass(frozen=True)
class FrontGap:
    """A baseline point against the reference method's front at its clean accuracy.

    ``gap`` is the front's mean ACR minus the point's (points of ε_max); ``verdict`` is
    ``above`` when the front's seed range lies wholly above the point's, ``below`` when wholly
    below, ``within spread`` otherwise. Beyond the front's clean accuracies, a point whose clean
    range meets that of the front's nearest end is at equal accuracy within the seed spread and
    is compared with that end; a point wholly less accurate than the front's least accurate
    point is ``dominated`` when that point's ACR range lies wholly above its own, else
    ``outside``, as is a point wholly more accurate than the front (no comparison)."""

    point: SeedPoint
    gap: float | None
    verdict: str


def _front(points: Sequence[SeedPoint]) -> list[SeedPoint]:
    """The points on their upper envelope (by mean), sorted by clean accuracy."""
    kept: list[SeedPoint] = []
    for point in sorted(points, key=lambda p: -p.clean.mean):
        if not kept or point.acr_pct.mean > kept[-1].acr_pct.mean:
            kept.append(point)
    return kept[::-1]


def adaptive_methods(points: Sequence[SeedPoint]) -> tuple[str, ...]:
    """The study's methods with adaptive radii: ``acert`` and every ``adaptive-<base>``."""
    names = dict.fromkeys(p.method for p in points)
    return tuple(m for m in names if m == "acert" or m.startswith(ADAPTIVE_PREFIX))


def front_gaps(
    points: Sequence[SeedPoint], reference: str | Collection[str] = "acert"
) -> list[FrontGap]:
    """Every other certified method's point against the front of ``reference`` (a method, or
    several whose points form one front), linear between the front's points (means, lows and
    highs each), at the point's mean clean accuracy (see :class:`FrontGap` for the points
    beyond the front's clean accuracies)."""
    group = {reference} if isinstance(reference, str) else set(reference)
    front = _front([p for p in points if p.method in group])
    if not front:
        names = " or ".join(sorted(group))
        raise AcertError(f"the study has no {names} runs to compare the baselines with")
    clean = [p.clean.mean for p in front]

    def at(x: float, field: str) -> float:
        return float(np.interp(x, clean, [getattr(p.acr_pct, field) for p in front]))

    gaps = []
    for point in points:
        if point.method in group or point.method in ("standard", "pgd"):
            continue
        x = point.clean.mean
        if clean[0] <= x <= clean[-1]:
            low, mean, high = at(x, "low"), at(x, "mean"), at(x, "high")
        else:
            end = front[0] if x < clean[0] else front[-1]
            if not end.clean.meets(point.clean):
                beats = x < clean[0] and end.acr_pct.low > point.acr_pct.high
                gap = end.acr_pct.mean - point.acr_pct.mean if beats else None
                gaps.append(FrontGap(point, gap, "dominated" if beats else "outside"))
                continue
            low, mean, high = end.acr_pct.low, end.acr_pct.mean, end.acr_pct.high
        gaps.append(FrontGap(point, mean - point.acr_pct.mean, _verdict(low, high, point)))
    return gaps


def _verdict(low: float, high: float, point: SeedPoint) -> str:
    if low > point.acr_pct.high:
        return "above"
    if high < point.acr_pct.low:
        return "below"
    return "within spread"


def seeds_markdown(points: Sequence[SeedPoint]) -> str:
    """One row per point: seeds, clean accuracy and ACR as mean [lowest, highest]."""
    lines = [
        "| method | knobs | seeds | clean % | ACR % of ε_max |",
        "|---|---|---|---:|---:|",
    ]
    for p in sorted(points, key=lambda p: (p.method, p.knobs)):
        seeds = ",".join(map(str, p.seeds))
        knobs = knob_label(p.knobs) or "–"
        lines.append(f"| {p.method} | {knobs} | {seeds} | {p.clean.text()} | {p.acr_pct.text()} |")
    return "\n".join(lines) + "\n"


def gaps_markdown(gaps: Sequence[FrontGap], front: str = "acert's front") -> str:
    """The baselines' points against the reference's front (named ``front``)."""
    lines = [
        f"| baseline point | seeds | clean % | its ACR % | {front} − it | verdict |",
        "|---|---|---:|---:|---:|---|",
    ]
    for g in sorted(gaps, key=lambda g: (g.point.method, g.point.clean.mean)):
        p = g.point
        gap = "–" if g.gap is None else f"{g.gap:+.1f}"
        lines.append(
            f"| {p.label} | {len(p.seeds)} | {p.clean.text()} | {p.acr_pct.text()} | {gap} "
            f"| {g.verdict} |"
        )
    return "\n".join(lines) + "\n"


def plot_seed_tradeoff(points: Sequence[SeedPoint], path: str | Path, title: str = "") -> Path:
    """ACR (% of ε_max) against clean accuracy: each point at its seeds' mean with error bars
    from the lowest to the highest seed, one line per method (by clean accuracy)."""
    figure, axes = plt.subplots(figsize=(7.5, 5.5))
    for style, method in enumerate(dict.fromkeys(p.method for p in points)):
        chosen = sorted((p for p in points if p.method == method), key=lambda p: p.clean.mean)
        xs = [p.clean.mean for p in chosen]
        ys = [p.acr_pct.mean for p in chosen]
        x_err = [
            [p.clean.mean - p.clean.low for p in chosen],
            [p.clean.high - p.clean.mean for p in chosen],
        ]
        y_err = [
            [p.acr_pct.mean - p.acr_pct.low for p in chosen],
            [p.acr_pct.high - p.acr_pct.mean for p in chosen],
        ]
        seeds = max(len(p.seeds) for p in chosen)
        axes.errorbar(
            xs,
            ys,
            xerr=x_err,
            yerr=y_err,
            marker=MARKERS[style % len(MARKERS)],
            color=COLORS[style % len(COLORS)],
            zorder=3 if method == "acert" else 2,
            ms=5,
            lw=1.3,
            capsize=3,
            label=f"{method} ({seeds} seed{'s' * (seeds > 1)})",
        )
    axes.set_xlabel("clean accuracy (%)")
    axes.set_ylabel("ACR (% of ε_max)")
    axes.set_title(title or "trade-off over seeds: mean, bars from lowest to highest seed")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    return save_figure(figure, path)


def write_seed_report(
    rows: Sequence[dict[str, Any]], folder: str | Path, bound: str, title: str = ""
) -> list[Path]:
    """``tradeoff_seeds.png`` and ``seeds.md`` in ``folder`` when some point has two seeds or
    more (else nothing); ``seeds.md`` holds the points and, with ACERT runs, the gaps."""
    points = seed_points(rows, bound)
    if not any(len(p.seeds) > 1 for p in points):
        return []
    folder = Path(folder)
    figure = plot_seed_tradeoff(points, folder / "tradeoff_seeds.png", title)
    text = f"# Points over seeds ({bound.upper()})\n\n" + seeds_markdown(points)
    if any(p.method == "acert" for p in points):
        text += "\n## Against ACERT's front\n\n" + gaps_markdown(front_gaps(points))
    adaptive = adaptive_methods(points)
    if len(adaptive) > 1:  # docs/METHOD.md, "Adaptive radii for every certified loss"
        gaps = front_gaps(points, adaptive)
        text += (
            "\n## Against the front of every method with adaptive radii\n\n"
            f"The front of {', '.join(adaptive)} together; the fixed-ε methods below it.\n\n"
            + gaps_markdown(gaps, "adaptive front")
        )
    report = folder / "seeds.md"
    atomic_write(report, lambda stream: stream.write(text.encode()))
    return [figure, report]
