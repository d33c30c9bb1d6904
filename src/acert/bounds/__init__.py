"""Sound bounds on the classification margins of feed-forward ReLU networks.

``margin_bounds(model, x, y, eps, method)`` returns lower bounds of ``f_y - f_t`` for every
t != y over the ℓ∞ ball of radius eps (pixel units, per sample) clipped to [0, 1]:

- ``"ibp"``: interval bound propagation (Gowal et al. 2019), :mod:`acert.bounds.ibp`;
- ``"crown-ibp"``: IBP intermediate bounds, CROWN backward pass from the output (Zhang et al. 2020);
- ``"crown"``: CROWN for every layer (Zhang et al. 2018), :mod:`acert.bounds.crown`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from acert.bounds import crown, ibp
from acert.bounds.interval import Interval, as_eps, input_box
from acert.bounds.layers import BatchStats, check_supported, clean_forward, needs_batch_stats
from acert.bounds.spec import margin_matrix, other_classes
from acert.errors import AcertError

__all__ = [
    "METHODS",
    "BatchStats",
    "Interval",
    "MarginEvaluator",
    "as_eps",
    "check_inputs",
    "clean_forward",
    "input_box",
    "margin_bounds",
    "margin_bounds_on_box",
    "margin_evaluator",
    "margin_matrix",
    "other_classes",
]


MarginEvaluator = Callable[[Interval, Tensor], Tensor]
"""``evaluate(box, y)``: (B, K-1) margin lower bounds of the boxes (B, ...) for labels y (B,)."""


def _ibp(model: nn.Sequential, stats: BatchStats | None, sound: bool) -> MarginEvaluator:
    program, last = ibp.prepare(model[:-1], stats, sound), model[-1]
    return lambda box, y: ibp.last_layer_margins(last, program(box)[0], y, sound)


def _crown_ibp(model: nn.Sequential, stats: BatchStats | None, sound: bool) -> MarginEvaluator:
    return lambda box, y: crown.crown_margins(model, box, y, stats, intermediate="ibp", sound=sound)


def _crown(model: nn.Sequential, stats: BatchStats | None, sound: bool) -> MarginEvaluator:
    return lambda box, y: crown.crown_margins(
        model, box, y, stats, intermediate="crown", sound=sound
    )


Method = Callable[[nn.Sequential, "BatchStats | None", bool], MarginEvaluator]
"""``method(model, stats, sound)``: the method's evaluator for that network and statistics."""
METHODS: dict[str, Method] = {
    "ibp": _ibp,
    "crown-ibp": _crown_ibp,
    "crown": _crown,
}


def check_inputs(model: nn.Module, x: Tensor, y: Tensor) -> None:
    """Raise a one-line :class:`AcertError` unless x, y fit a supported model."""
    check_supported(model)
    if x.dim() < 2 or y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise AcertError(
            f"x must be (B, ...) and y (B,), got x {tuple(x.shape)} and y {tuple(y.shape)}"
        )
    dtype = next(iter(model.buffers()), next(iter(model.parameters()), x)).dtype
    if x.dtype != dtype:
        raise AcertError(
            f"inputs are {x.dtype} but the model computes in {dtype}; convert one to the other"
        )
    if not torch.isfinite(x).all():
        raise AcertError("inputs contain NaN or inf; clean the data before computing bounds")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise AcertError(
            f"inputs must be pixels in [0, 1], got values in [{x.min().item():.4g}, "
            f"{x.max().item():.4g}]; normalisation belongs in the model's Normalize layer"
        )
    num_classes = model[-1].out_features
    if y.numel() and (y.min() < 0 or y.max() >= num_classes):
        raise AcertError(
            f"labels must lie in [0, {num_classes}), got {y.min().item()}..{y.max().item()}"
        )


def margin_bounds_on_box(
    model: nn.Sequential,
    box: Interval,
    y: Tensor,
    method: str = "ibp",
    stats: BatchStats | None = None,
    sound: bool = True,
) -> Tensor:
    """Lower bounds of the margins over an input box; no input checks (hot paths use this).

    Args:
        model: a supported ``nn.Sequential`` (see :func:`check_inputs`).
        box: (B, ...) input interval inside [0, 1].
        y: (B,) labels.
        method: one of ``METHODS``.
        stats: clean-batch statistics, needed when a batch-norm is in train mode.
        sound: widen for floating-point rounding (certificates); False gives the plain
            arithmetic of a training objective (:data:`acert.bounds.ibp.Rule`).

    Returns:
        (B, K-1) lower bounds of ``f_y - f_t``, t != y in increasing order.
    """
    return margin_evaluator(model, method, stats, sound)(box, y)


def margin_evaluator(
    model: nn.Sequential,
    method: str = "ibp",
    stats: BatchStats | None = None,
    sound: bool = True,
) -> MarginEvaluator:
    """:func:`margin_bounds_on_box` of one network for many boxes (a radius search's): IBP's
    interval maps are prepared once (:func:`acert.bounds.ibp.prepare`), so each evaluation
    only propagates. Make it in the autograd mode it is used in.
    """
    if method not in METHODS:
        raise AcertError(f"unknown bound method {method!r}; choose one of {', '.join(METHODS)}")
    return METHODS[method](model, stats, sound)


def margin_bounds(
    model: nn.Sequential,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    method: str = "ibp",
    stats: BatchStats | None = None,
) -> Tensor:
    """Lower bounds of ``f_y - f_t`` for every t != y over the clipped ℓ∞ ball.

    Args:
        model: ``nn.Sequential`` of Normalize, Conv2d, Linear, BatchNorm1d/2d, ReLU, Flatten,
            ending in Linear. Batch-norm uses running statistics in eval mode and the clean
            batch's statistics in train mode (``stats``, computed from x when not given).
        x: (B, C, H, W) or (B, D) inputs in [0, 1].
        y: (B,) int64 labels.
        eps: radius in pixel units, a number or a (B,) tensor.
        method: ``"ibp"``, ``"crown-ibp"`` or ``"crown"``.
        stats: clean-batch statistics from :func:`clean_forward`.

    Returns:
        (B, K-1) lower bounds; the sample is certified at eps when all are > 0.
    """
    check_inputs(model, x, y)
    box = input_box(x, eps)
    try:
        if stats is None and needs_batch_stats(model):
            stats = clean_forward(model, x, update_running_stats=False)[1]
        return margin_bounds_on_box(model, box, y, method, stats)
    except RuntimeError as err:
        first_line = str(err).strip().splitlines()[0]
        raise AcertError(
            f"input of shape {tuple(x.shape[1:])} does not fit the model: {first_line}"
        ) from err
