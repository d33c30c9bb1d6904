"""The largest magnitudes the model's own arithmetic forms, checked by every sound bound pass.

The forward pass forms values that no interval of the bounds holds: the partial sums of a
layer's dot products (in any order at most ``Σ|w_i|·|h_i| + |b|``), the value ``z = W h + b``
of a layer whose batch-norm the bounds fold in (they use ``(s·W, s·b + t)``: z may overflow to
±inf while ``s·z`` is ordinary), an average pooling's window sums before the division, the two
terms of a residual sum; and the bounds keep (centre, radius), so ``|c| + r`` may pass float32's
largest value while c and r do not. A model whose sums reach ±inf computes another prediction.

Each sound interval map (:mod:`acert.bounds.ibp`) bounds those magnitudes per sample, cheaply
(the largest ``|c| + r`` of its input times the largest row sum of ``|W|``, etc.), and where one
may reach :func:`limit` (a quarter of the largest float, room for the bound's own ``(1 + γ)``
factors and ``c ± r``) sets that sample's radius to inf (:func:`guard`). Everything that reads the
interval then is -inf or NaN: later intervals, CROWN's rounding bounds
(:func:`acert.bounds.rounding.step_errors` also charges the step that overflowed) and
relaxations, the final margins, which :func:`uncertified_unless_finite` reports as -inf. The
sample is not certified at that ε (its radius shrinks to where no sum can overflow, or 0).
Ordinary networks are far below the limit: the checks change no number.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from acert.bounds.interval import Interval

__all__ = ["LIMIT_SHARE", "guard", "limit", "peak", "uncertified_unless_finite"]

LIMIT_SHARE = 0.25
"""The share of the dtype's largest finite value a checked magnitude must stay below."""


def limit(dtype: torch.dtype) -> float:
    """The largest magnitude a sound pass lets the model's arithmetic form."""
    return LIMIT_SHARE * torch.finfo(dtype).max


def peak(box: Interval, centre_magnitude: Tensor | None = None) -> Tensor:
    """(B,) a bound on ``|h|`` over each sample's interval: ``max|c| + max r`` (no gradient),
    in reductions without a temporary (or from ``|c|`` where the caller has it)."""
    with torch.no_grad():
        centre, radius = box.centre.detach().flatten(1), box.radius.detach().flatten(1)
        if centre.shape[1] == 0:
            return centre.new_zeros(centre.shape[0])
        if centre_magnitude is not None:
            top = centre_magnitude.flatten(1).amax(1)
        else:
            low, high = torch.aminmax(centre, dim=1)
            top = torch.maximum(high, -low)
        return top + radius.amax(1)


def guard(radius: Tensor, top: Tensor, reach: Callable[[Any], Any] = lambda top: top) -> Tensor:
    """``radius`` with the rows (samples) whose magnitude ``reach(top)`` may reach
    :func:`limit` (or is NaN) set to inf; the same tensor where none does.

    Args:
        radius: (B, ...) the step's output radius.
        top: (B,) a bound on the step's input magnitudes (:func:`peak`).
        reach: a monotone map from a bound on the inputs to one on what the step forms, for a
            float (the batch's largest, checked first: the common case costs no tensor
            operation) and for a (B,) tensor.
    """
    bound = limit(radius.dtype)
    if top.numel() == 0 or reach(float(top.max())) < bound:  # False for NaN
        return radius
    unsafe = ~(reach(top.detach()) < bound)
    if not bool(unsafe.any()):
        return radius
    rows = unsafe.view(-1, *([1] * (radius.dim() - 1)))
    return radius.masked_fill(rows, torch.inf)


def uncertified_unless_finite(margins: Tensor) -> Tensor:
    """Margin lower bounds with every non-finite one (an overflow :func:`guard` marked, or
    one of the bound's own arithmetic) replaced by -inf: no certificate from it."""
    if bool(torch.isfinite(margins).all()):
        return margins
    return torch.where(torch.isfinite(margins), margins, -torch.inf)
