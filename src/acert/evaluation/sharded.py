"""Evaluation shared out among the processes of a run: each evaluates whole evaluation batches,
and the counts and radii are summed (:func:`evaluate_sharded`)."""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn

from acert.evaluation.evaluate import (
    Evaluation,
    EvaluationSettings,
    acceps,
    attacked_radii,
    check_settings,
    evaluate,
)
from acert.foundation.process_group import World, sum_over_processes

__all__ = ["evaluate_sharded"]


def _rows(n: int, chunk: int, world: World) -> slice:
    """A contiguous share of whole evaluation batches, the first shares the larger ones (so
    each batch is one a single process evaluates and gives the same per-sample results)."""
    chunks = math.ceil(n / chunk)
    lo = math.ceil(chunks * world.rank / world.world_size) * chunk
    hi = math.ceil(chunks * (world.rank + 1) / world.world_size) * chunk
    return slice(min(lo, n), min(hi, n))


def _counts(part: Evaluation, size: int) -> Tensor:
    """[bound evaluations, correct, certified per ε, PGD-robust per ε] of ``size`` samples."""
    fractions = [
        part.clean_accuracy,
        *part.certified_accuracy.values(),
        *part.pgd_accuracy.values(),
    ]
    counts = [part.radius_evaluations * size, *(round(f * size) for f in fractions)]
    return torch.tensor(counts, dtype=torch.float64)


def evaluate_sharded(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    settings: EvaluationSettings,
    world: World,
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Evaluation:
    """:func:`acert.evaluation.evaluate.evaluate` with the samples shared out among the processes.

    Each process evaluates a contiguous run of whole ``settings.batch_size`` batches; the
    counts and the per-sample radii are summed, so every process returns the evaluation of all
    samples. Clean and certified accuracy and the radii are one process's; PGD starts are
    drawn per process, so PGD accuracy can differ by the luck of the random starts.

    Args:
        model, x, y, settings, device, progress: as for ``evaluate``.
        world: the processes.
    """
    settings = check_settings(settings)
    eps_max, cert_eps = settings.eps_max, settings.cert_eps
    pgd_eps = attacked_radii(cert_eps, settings.pgd_eps, settings.pgd_steps)
    run = functools.partial(evaluate, settings=settings, device=device, progress=progress)
    if not world.enabled:
        return run(model, x, y)
    n, rows = x.shape[0], _rows(x.shape[0], settings.batch_size, world)
    head = 2 + len(cert_eps) + len(pgd_eps)
    totals = torch.zeros(head + n, dtype=torch.float64)
    if rows.stop > rows.start:
        part = run(model, x[rows], y[rows])
        totals[:head] = _counts(part, rows.stop - rows.start)
        totals[head:][rows] = part.radii.double()
    totals = sum_over_processes(totals)
    correct, certified = totals[1].item(), totals[2 : 2 + len(cert_eps)].tolist()
    robust, radii = totals[2 + len(cert_eps) : head].tolist(), totals[head:].float()
    clean, acr = correct / n, radii.mean().item()
    return Evaluation(
        n=n,
        bound=settings.label,
        eps_max=eps_max,
        clean_accuracy=clean,
        acr=acr,
        acceps=acceps(acr, eps_max, clean),
        certified_accuracy={e: c / n for e, c in zip(cert_eps, certified, strict=True)},
        pgd_accuracy={e: c / n for e, c in zip(pgd_eps, robust, strict=True)},
        radius_evaluations=totals[0].item() / n,
        radii=radii,
    )
