"""Figures from metrics and radii (matplotlib, written as PNG). Imports nothing from training."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from acert.runs import atomic_write

__all__ = ["radius_histogram", "save_figure"]


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
