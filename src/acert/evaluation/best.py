"""The best of several bounds per sample: which bound won (:func:`best_of`), and the cascade
that searches a later bound only where it can raise the radius (:func:`cascade_radii`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from acert.bounds import margin_bounds
from acert.radius import KnownBatch, radius_search

__all__ = ["best_of", "cascade_radii", "certified_by_any"]


def best_of(bound_radii: dict[str, Tensor]) -> dict[str, Any]:
    """Which bound gave each sample its best radius, and each bound's own ACR.

    ``won[b]`` counts the samples whose radius under ``b`` is strictly larger than under
    every other bound; ``won["tie"]`` those where several share the largest (among them the
    misclassified samples, 0 under every bound, and those certified at the cap by several),
    so the counts add up to the number of samples.
    """
    names = list(bound_radii)
    stacked = torch.stack([bound_radii[name].double() for name in names])
    at_top = stacked == stacked.max(0).values
    alone = at_top.sum(0) == 1
    winners = at_top[:, alone].double().argmax(0)
    won = {name: int((winners == i).sum()) for i, name in enumerate(names)}
    won["tie"] = int((~alone).sum())
    acr = {name: stacked[i].mean().item() for i, name in enumerate(names)}
    return {"bounds": names, "won": won, "acr": acr}


def cascade_radii(
    model: nn.Module, x: Tensor, y: Tensor, eps_max: float, bounds: Sequence[str]
) -> tuple[dict[str, Tensor], Tensor]:
    """Each sample's best-of radius, the bounds tried in turn, each only where it can help.

    The first bound searches every sample. A later bound skips the samples already certified
    at the cap (no radius can exceed it); where the best radius r so far lies in (0, cap) it is
    first evaluated at r and searches [r, cap] only if it certifies there (``KnownBatch.beat``),
    so a bound that cannot beat r costs one evaluation, not a search. Every radius returned is
    a point its bound certifies, so the best of them is sound, as for the full best-of.

    Returns:
        per bound its (N,) radii on the CPU (0 where it was skipped or fell below r), and the
        (N,) bound evaluations spent per sample.
    """
    found: dict[str, Tensor] = {}
    at_cap = float(torch.tensor(eps_max, dtype=x.dtype))  # a radius at the cap, as searched
    best = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    spent = torch.zeros(x.shape[0], dtype=torch.float64)
    for index, name in enumerate(bounds):
        cap = torch.full_like(best, eps_max)
        cap[best >= at_cap] = 0.0  # nothing to gain: no radius exceeds the cap
        known = KnownBatch(beat=best.to(x.dtype)) if index > 0 else None
        result = radius_search(model, x, y, cap.to(x.dtype), name, known=known)
        found[name] = result.radius.cpu()
        spent += result.evaluations.cpu().double()
        best = torch.maximum(best, result.radius.double())
    return found, spent


def certified_by_any(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, bounds: Sequence[str]
) -> Tensor:
    """(B,) whether any of the bounds certifies each sample at eps (each bound evaluated only
    on the samples the ones before it left uncertified)."""
    certified = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for name in bounds:
        rest = torch.nonzero(~certified, as_tuple=True)[0]
        if rest.numel() == 0:
            break
        certified[rest] = margin_bounds(model, x[rest], y[rest], eps, name).min(1).values > 0
    return certified
