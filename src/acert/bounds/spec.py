"""The margin specification: for label y, the rows ``e_y - e_t`` for every class t != y."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["folded_margin_layer", "margin_matrix", "other_classes"]


def other_classes(y: Tensor, num_classes: int) -> Tensor:
    """(B, K-1) the classes other than each label, in increasing order.

    Args:
        y: (B,) labels in [0, num_classes).
        num_classes: K.
    """
    classes = torch.arange(num_classes - 1, device=y.device).expand(y.shape[0], -1)
    return classes + (classes >= y.unsqueeze(1)).long()


def margin_matrix(y: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """(B, K-1, K) specification C with ``(C z)_j = z_y - z_{t_j}``."""
    others = other_classes(y, num_classes)
    spec = torch.zeros(y.shape[0], num_classes - 1, num_classes, dtype=dtype, device=y.device)
    spec.scatter_(2, y.view(-1, 1, 1).expand(-1, num_classes - 1, 1), 1.0)
    spec.scatter_(2, others.unsqueeze(2), -1.0)
    return spec


def folded_margin_layer(layer: nn.Linear, y: Tensor) -> tuple[Tensor, Tensor | None]:
    """The last layer with the specification folded in: per sample the rows ``W_y - W_t``
    (B, K-1, D) and biases ``b_y - b_t`` (B, K-1), t != y in increasing order.

    Computed as ``C @ W`` with C of :func:`margin_matrix` rather than by indexing W per
    sample: the entries of C are 0 and ±1, so the values are the same single rounding of
    ``W_y - W_t``, and the gradient is a matrix product, where the gradient of an index is a
    scatter-add whose order (and so whose rounding) changes from run to run on several threads.
    """
    spec = margin_matrix(y, layer.out_features, layer.weight.dtype)
    weight = torch.matmul(spec, layer.weight)
    bias = None if layer.bias is None else torch.matmul(spec, layer.bias)
    return weight, bias
