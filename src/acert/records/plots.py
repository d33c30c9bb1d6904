"""Figures from metrics and radii (matplotlib, written as PNG). Imports nothing from training.

- :func:`radius_histogram`: the certified radii of one run;
- :func:`plot_tradeoff`: ACR (% of ε_max) against clean accuracy, one line per method, with the
  Pareto front — the accuracy–robustness trade-off the ACERT paper compares methods by — and,
  for runs certified with ``--attack``, the interval from certified to attack ACR;
- :func:`plot_certified_accuracy`: certified accuracy against ε from per-sample radii;
- :func:`plot_study`: all three for a study folder (``acert plot``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from acert.foundation.errors import AcertError
from acert.records.plot_labels import place_labels
from acert.records.runs import atomic_write, make_folder
from acert.records.study import bound_scores, certify_path, find_runs, study_table

__all__ = [
    "Tradeoff",
    "certified_accuracy_curve",
    "knob_label",
    "pareto_front",
    "plot_certified_accuracy",
    "plot_study",
    "plot_tradeoff",
    "radius_histogram",
    "save_figure",
]

KNOB_SYMBOLS = {"eps_train": "ε_train"}
"""How a swept config key that belongs to no one method is written next to its point in the
trade-off figure; a method's own knobs are written as its registration says
(:func:`acert.methods.knob_symbols`)."""

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")


def save_figure(figure: plt.Figure, path: str | Path) -> Path:
    """Write a figure as PNG atomically and close it."""
    path = Path(path)
    atomic_write(
        path, lambda stream: figure.savefig(stream, format="png", dpi=120, bbox_inches="tight")
    )
    plt.close(figure)
    return path


def radius_histogram(
    radii: torch.Tensor,
    eps_max: float,
    path: str | Path,
    bins: int = 40,
    title: str = "certified radii",
) -> Path:
    """Histogram of per-sample certified radii on [0, ε_max], with zeros and capped radii counted.

    Args:
        radii: (N,) radii, pixel units.
        eps_max: the cap.
        path: PNG file to write.
        bins: number of bins.
        title: figure title.
    """
    values = radii.detach().cpu().double().numpy()
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.hist(values, bins=bins, range=(0.0, eps_max), color="tab:blue", edgecolor="white")
    zero, capped = (values == 0).mean(), (values >= eps_max).mean()
    axes.set_xlabel("certified radius ε (pixel units)")
    axes.set_ylabel("test samples")
    axes.set_title(
        f"{title}: ACR {values.mean():.4g}, r=0: {100 * zero:.1f}%, r=ε_max: {100 * capped:.1f}%"
    )
    axes.set_xlim(0, eps_max)
    return save_figure(figure, path)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates when both coordinates are maximised.

    A point dominates another when it is at least as good in both coordinates and better in
    one; equal points do not dominate each other, so both stay. Points with a NaN are ignored.

    Args:
        points: (clean accuracy, ACR) pairs, or any two scores to maximise.

    Returns:
        The indices on the front, by increasing first coordinate.
    """
    pairs = [(float(a), float(b)) for a, b in points]
    finite = [i for i, pair in enumerate(pairs) if all(math.isfinite(v) for v in pair)]

    def dominated(i: int) -> bool:
        a, b = pairs[i]
        return any(pairs[j][0] >= a and pairs[j][1] >= b and pairs[j] != pairs[i] for j in finite)

    front = [i for i in finite if not dominated(i)]
    return sorted(front, key=lambda i: (pairs[i][0], -pairs[i][1], i))


def knob_label(point: str) -> str:
    """``"kappa=0.25, eps_train=0.1"`` -> ``"κ=0.25, ε_train=0.1"``."""
    from acert.methods import knob_symbols  # the registry loads only when a figure is labelled

    symbols = {**knob_symbols(), **KNOB_SYMBOLS}
    parts = []
    for part in filter(None, point.split(", ")):
        key, _, value = part.partition("=")
        parts.append(f"{symbols.get(key, key)}={value}")
    return ", ".join(parts)


@dataclass
class Tradeoff:
    """A written trade-off figure: its path, the Pareto front and the runs drawn with a
    certified–attack interval, as indices into ``rows``."""

    path: Path
    front: list[int]
    intervals: list[int] = field(default_factory=list)


def _n_text(values: Sequence[int]) -> str:
    low, high = min(values), max(values)
    return f"n = {low}" if low == high else f"n = {low}–{high}"


def _draw_method(axes, rows, indices, scores, style: int) -> list[tuple[float, float, str]]:
    """One method's line through its points by clean accuracy; returns the points' labels."""
    order = sorted(indices, key=lambda i: scores[i]["clean"])
    xs = [scores[i]["clean"] for i in order]
    ys = [scores[i]["acr_pct"] for i in order]
    method = str(rows[order[0]]["method"])
    axes.plot(xs, ys, marker=MARKERS[style % len(MARKERS)], ms=6, lw=1.5, label=method)
    labels = [knob_label(str(rows[i].get("point", ""))) for i in order]
    return [(x, y, label) for x, y, label in zip(xs, ys, labels, strict=True) if label]


def _draw_intervals(axes, rows, indices, bound: str) -> list[int]:
    """Per run certified with ``--attack`` under ``bound``, a vertical bar from its certified
    ACR up to its attack ACR (both of ``certify_<bound>.json``, on the same samples): the true
    mean robust radius lies between them. Returns the rows drawn."""
    drawn = []
    for i in indices:
        top = rows[i].get(f"{bound}_acr_attack_pct")
        if top is None:
            continue
        label = None if drawn else "certified – attack ACR"
        x = 100 * rows[i][f"{bound}_clean_acc"]
        bottom = rows[i][f"{bound}_acr_pct"]
        axes.vlines(x, bottom, top, colors="grey", lw=4, alpha=0.35, zorder=1, label=label)
        axes.plot([x], [top], marker="_", ms=10, color="grey", zorder=1)
        drawn.append(i)
    return drawn


def _draw_front(axes, scores: dict[int, dict[str, float]], front: list[int]) -> None:
    xs = [scores[i]["clean"] for i in front]
    ys = [scores[i]["acr_pct"] for i in front]
    line = "Pareto front" if len(front) > 1 else None  # one point draws no line
    axes.step(xs, ys, where="pre", color="black", ls="--", lw=1, label=line)
    axes.scatter(xs, ys, s=160, facecolors="none", edgecolors="black", lw=1.2, zorder=5)


def plot_tradeoff(
    rows: Sequence[dict[str, Any]], path: str | Path, bound: str = "ibp", title: str | None = None
) -> Tradeoff:
    """ACR as % of ε_max against clean accuracy, one line per method, Pareto front dashed;
    a grey bar up to the attack ACR for each run certified with ``--attack``.

    Args:
        rows: study table rows (:func:`acert.records.study.study_table`); rows without metrics for
            ``bound`` are left out.
        path: PNG file to write.
        bound: whose certificates give the ACR.
        title: figure title (default: dataset, bound and n).

    Returns:
        The path, the indices (into ``rows``) of the points on the Pareto front and those of
        the runs drawn with a certified–attack interval.
    """
    scores = {i: s for i, row in enumerate(rows) if (s := bound_scores(row, bound)) is not None}
    if not scores:
        raise AcertError(f"no run has {bound} metrics; certify the runs with --bounds {bound}")
    indices = list(scores)
    front = [
        indices[k]
        for k in pareto_front([(scores[i]["clean"], scores[i]["acr_pct"]) for i in indices])
    ]
    figure, axes = plt.subplots(figsize=(7.5, 5.5))
    methods = list(dict.fromkeys(str(rows[i]["method"]) for i in indices))
    labels = []
    for style, method in enumerate(methods):
        chosen = [i for i in indices if str(rows[i]["method"]) == method]
        labels += _draw_method(axes, rows, chosen, scores, style)
    _draw_front(axes, scores, front)
    intervals = _draw_intervals(axes, rows, indices, bound)
    datasets = ", ".join(sorted({str(rows[i].get("dataset")) for i in indices}))
    eps_max = sorted({f"{rows[i]['eps_max']:g}" for i in indices})
    axes.set_xlabel("clean accuracy (%)")
    axes.set_ylabel(f"ACR (% of ε_max = {', '.join(eps_max)})")
    n_text = _n_text([int(scores[i]["n"]) for i in indices])
    axes.set_title(
        title or f"{datasets}: accuracy–robustness trade-off ({bound.upper()}, {n_text})"
    )
    axes.grid(alpha=0.3)
    axes.margins(x=0.08, y=0.1)
    axes.legend(fontsize=9, loc="best")
    place_labels(axes, labels, [(s["clean"], s["acr_pct"]) for s in scores.values()])
    return Tradeoff(save_figure(figure, path), front, intervals)


def certified_accuracy_curve(radii: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Certified accuracy (%) at each ε from per-sample certified radii.

    At ε > 0 it is the share of radii ≥ ε; at ε = 0 the share of radii > 0 (the limit from
    the right: a radius of 0 marks a misclassified or uncertified input).

    Args:
        radii: (N,) certified radii, pixel units.
        eps: (M,) radii to evaluate at.

    Returns:
        (M,) percentages.
    """
    r = radii.detach().cpu().double()[None, :]
    e = eps.detach().cpu().double()[:, None]
    certified = torch.where(e > 0, r >= e, r > 0)
    return 100 * certified.double().mean(1)


def plot_certified_accuracy(
    curves: dict[str, torch.Tensor],
    eps_max: float,
    path: str | Path,
    title: str = "certified accuracy",
    marks: Sequence[float] = (),
) -> Path:
    """Certified accuracy (%) against ε on [0, ε_max], one curve per set of radii.

    Args:
        curves: label -> (N,) per-sample certified radii, pixel units.
        eps_max: right end of the ε axis.
        path: PNG file to write.
        title: figure title.
        marks: radii to mark with a dotted vertical line (e.g. the dataset's certification ε).
    """
    eps = torch.linspace(0.0, eps_max, 401)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for label, radii in curves.items():
        accuracy = certified_accuracy_curve(radii, eps)
        axes.plot(eps.numpy(), accuracy.numpy(), lw=1.8, label=f"{label} (n={radii.numel()})")
    for value in marks:
        axes.axvline(value, color="grey", ls=":", lw=1)
    axes.set_xlim(0, eps_max)
    axes.set_ylim(0, 100)
    axes.set_xlabel("ε (ℓ∞ radius, pixel units)")
    axes.set_ylabel("certified accuracy (%)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=9, loc="upper right")
    return save_figure(figure, path)


def radii_path(run: str | Path, bound: str, training_bound: str | None) -> Path | None:
    """The radii of a run under a bound: the training evaluation's when it used that bound,
    else ``certify_<bound>.radii.pt``; None when neither exists."""
    run = Path(run)
    if bound == training_bound and (run / "radii.pt").is_file():
        return run / "radii.pt"
    path = certify_path(run, bound).with_suffix(".radii.pt")
    return path if path.is_file() else None


def _chosen_rows(
    rows: list[dict[str, Any]], bound: str, runs: Sequence[str] | None
) -> list[dict[str, Any]]:
    """The rows named in ``runs``, else the best-acceps row of each method under ``bound``."""
    if runs:
        by_name = {row["run"]: row for row in rows}
        missing = [name for name in runs if Path(name).name not in by_name]
        if missing:
            raise AcertError(
                f"run {missing[0]!r} is not a finished run of the study; "
                f"choose from {', '.join(by_name)}"
            )
        return [by_name[Path(name).name] for name in runs]
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        score = bound_scores(row, bound)
        held = best.get(row["method"])
        if score and (held is None or score["acceps"] > bound_scores(held, bound)["acceps"]):
            best[row["method"]] = row
    return list(best.values())


def _load_radii(study: Path, rows: list[dict[str, Any]], bound: str) -> dict[str, torch.Tensor]:
    """Each chosen run's per-sample radii under ``bound`` (all read before any figure is
    written, so that a missing or unreadable file leaves no half-made set of figures)."""
    curves: dict[str, torch.Tensor] = {}
    for row in rows:
        name = row["run"]
        path = radii_path(study / name, bound, row.get("bound"))
        if path is None:
            raise AcertError(f"run {name} has no {bound} radii; run acert certify on it")
        try:
            radii = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for damaged files
            raise AcertError(
                f"{path} is not readable ({type(err).__name__}); delete it and certify {name} again"
            ) from err
        if not isinstance(radii, torch.Tensor) or radii.dim() != 1:
            raise AcertError(f"{path} does not hold a vector of radii; delete it and certify again")
        curves[name] = radii
    return curves


def plot_study(
    study_dir: str | Path,
    out: str | Path | None = None,
    bound: str = "ibp",
    runs: Sequence[str] | None = None,
) -> list[Path]:
    """The figures of a study folder: trade-off, certified accuracy, radius histograms.

    Args:
        study_dir: a folder of run folders (``acert sweep --study``).
        out: where the PNG files go (default: ``<study>/plots-<bound>``).
        bound: whose certificates to plot.
        runs: run folder names for the certified-accuracy curves and histograms (default: the
            best-acceps run of each method).

    Returns:
        The written files: ``tradeoff.png``, ``certified_accuracy.png``, then
        ``radius_histogram_<run>.png`` per chosen run.
    """
    study = Path(study_dir)
    if not find_runs(study):
        raise AcertError(f"no run folders in {study}; train some with acert sweep --study {study}")
    rows = study_table(study)
    if not rows:
        raise AcertError(
            f"no finished runs in {study}; finish them with acert sweep --study {study}"
        )
    chosen = _chosen_rows(rows, bound, runs)
    curves = _load_radii(study, chosen, bound)
    folder = make_folder(out if out is not None else study / f"plots-{bound}", "--out")
    tradeoff = plot_tradeoff(rows, folder / "tradeoff.png", bound).path
    histograms = [
        radius_histogram(
            curves[row["run"]],
            row["eps_max"],
            folder / f"radius_histogram_{row['run']}.png",
            title=f"{row['run']} ({bound.upper()})",
        )
        for row in chosen
    ]
    marks = sorted(
        {float(c[len("cert_acc_") :]) for r in chosen for c in r if c.startswith("cert_acc_")}
    )
    datasets = ", ".join(sorted({str(row["dataset"]) for row in chosen}))
    certified = plot_certified_accuracy(
        curves,
        max(row["eps_max"] for row in chosen),
        folder / "certified_accuracy.png",
        title=f"{datasets}: certified accuracy from per-sample radii ({bound.upper()})",
        marks=marks,
    )
    return [tradeoff, certified, *histograms]
