"""ACERT's step with the training pass as the check at the cap (issue 20; docs/METHOD.md,
"Training loss" step 3 and docs/PERFORMANCE.md, "The training pass as the check at the cap").

A sample without a warm-start guess (its radius was the cap last time, or it has none) starts
its radius search with one IBP evaluation at the cap, and most samples of a trained model are
certified there (~72% on the quick-start model): their training radius is the cap, and their
training loss is an IBP pass at the cap with gradients, the same bound at the same point. So
the training pass goes first, at the cap, for those samples (and at 0, or the warm-up floor,
for the misclassified ones); only the samples it does not certify and the warm-started ones are
searched (without gradients), and a second, smaller training pass takes them at their radii.
The loss is assembled from the two passes row by row: every sample's terms are those of its
own radius, as in the step that searches first (:meth:`acert.methods.acert.ACERT.loss`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from acert.bounds import BatchStats, Interval, input_box
from acert.methods.base import Batch, IBPPass, Step, ibp_pass
from acert.radius import (
    SAFETY_MARGIN,
    KnownBatch,
    RadiusResult,
    SearchSettings,
    clean_margins,
    radius_search,
)

__all__ = ["CAP_CHECKS", "cap_first_pass"]

CAP_CHECKS = ("search", "training-pass")
"""How ACERT learns that a sample is certified at the cap: by its search's first evaluation
(without gradients, then the training pass), or by the training pass itself."""


def cap_first_pass(
    model: nn.Module,
    batch: Batch,
    step: Step,
    logits: Tensor,
    stats: BatchStats,
    search: SearchSettings,
    guess: Tensor | None,
    floor_radius: float | None,
) -> tuple[IBPPass, RadiusResult]:
    """The training pass of every sample at its certified radius, the cap checked by the pass.

    Args:
        model: the network in train mode.
        batch: the batch.
        step: the schedule's state; ``step.eps`` is the cap.
        logits: (B, K) clean logits of the batch.
        stats: clean-batch statistics of the train-mode batch-norms.
        search: the training search.
        guess: (B,) warm-start radii (NaN: none), or None.
        floor_radius: the warm-up floor of the training radii, or None after the warm-up.

    Returns:
        the IBP pass of the batch at its radii, rows in batch order, and the radius search's
        result (radii before the floor; evaluations count the first pass's one at the cap).
    """
    x, y, cap = batch.x, batch.y, step.eps
    with torch.no_grad():
        floor = SAFETY_MARGIN * logits.detach().abs().amax(1)
        open_ = clean_margins(logits.detach(), y) - floor > 0
        warm = torch.zeros_like(open_)
        if guess is not None:
            guess = guess.to(x.device, x.dtype)
            warm = open_ & torch.isfinite(guess) & (guess > 0) & (guess < cap)
        first = torch.nonzero(~warm, as_tuple=True)[0]
        radius = torch.where(open_, torch.full_like(floor, cap), torch.zeros_like(floor))
    first_pass = None
    if first.numel():
        first_pass = ibp_pass(model, input_box(x[first], _floored(radius[first], floor_radius)),
                              y[first], stats)  # fmt: skip
    with torch.no_grad():
        cap_margin = torch.full_like(floor, torch.nan)
        failed = torch.zeros_like(first, dtype=torch.bool)
        if first_pass is not None:
            cap_margin[first] = first_pass.margins.detach().min(1).values - floor[first]
            failed = open_[first] & ~(cap_margin[first] > 0)
        evaluations = (open_ & ~warm).long()  # the first pass's, at the cap
        searched = torch.cat([torch.nonzero(warm, as_tuple=True)[0], first[failed]]).sort().values
        converged = torch.ones_like(open_)
        if searched.numel():
            known = KnownBatch(
                logits=logits.detach()[searched],
                stats=stats,
                guess=None if guess is None else guess[searched],
                cap_margin=cap_margin[searched],
            )
            result = radius_search(model, x[searched], y[searched], cap, "ibp", search, known=known)
            radius[searched] = result.radius
            evaluations[searched] += result.evaluations
            converged[searched] = result.converged
    result = RadiusResult(radius, evaluations, converged)
    if not searched.numel():
        return first_pass, result  # every row was in the first pass (and it has rows)
    second_pass = ibp_pass(
        model, input_box(x[searched], _floored(radius[searched], floor_radius)), y[searched], stats
    )
    if first_pass is None:
        return second_pass, result  # every row was searched
    order = torch.cat([first[~failed], searched])
    joined = _joined(_rows(first_pass, ~failed), second_pass)
    return _rows(joined, torch.argsort(order)), result


def _floored(radius: Tensor, floor_radius: float | None) -> Tensor:
    return radius if floor_radius is None else radius.clamp(min=floor_radius)


def _interval_rows(box: Interval, rows: Tensor) -> Interval:
    return Interval(box.centre[rows], box.radius[rows])


def _rows(bounds: IBPPass, rows: Tensor) -> IBPPass:
    return IBPPass(
        _interval_rows(bounds.box, rows),
        [_interval_rows(pre, rows) for pre in bounds.preactivations],
        bounds.margins[rows],
    )


def _cat(a: Interval, b: Interval) -> Interval:
    return Interval(torch.cat([a.centre, b.centre]), torch.cat([a.radius, b.radius]))


def _joined(a: IBPPass, b: IBPPass) -> IBPPass:
    return IBPPass(
        _cat(a.box, b.box),
        [_cat(p, q) for p, q in zip(a.preactivations, b.preactivations, strict=True)],
        torch.cat([a.margins, b.margins]),
    )
