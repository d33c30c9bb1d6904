"""The memory layout of a run's images and convolution weights: PyTorch's default (contiguous,
NCHW) or channels-last (NHWC).

The layout changes how fast a convolution runs, not what it computes in exact arithmetic; in
floats the kernels of the two layouts may sum in another order (batch-norm statistics over an
NHWC tensor do), so a run's numbers move by rounding, as with another thread count. Every bound's
rounding allowance holds for any order of summation, so certificates stay sound in either.
docs/PERFORMANCE.md, "Memory layout", has the measurements behind the default.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from acert.foundation.ranges import OneOf

__all__ = ["LAYOUTS", "in_layout", "model_in_layout"]

_FORMATS = {"contiguous": torch.contiguous_format, "channels-last": torch.channels_last}

LAYOUTS = OneOf(tuple(_FORMATS))
"""The layout names of the ``layout`` key."""


def _format(layout: str) -> torch.memory_format:
    LAYOUTS.check(layout, "layout")
    return _FORMATS[layout]


def in_layout(x: Tensor, layout: str) -> Tensor:
    """``x`` in ``layout`` where it is a batch of images (4 dims), else ``x`` itself."""
    return x.contiguous(memory_format=_format(layout)) if x.dim() == 4 else x


def model_in_layout(model: nn.Module, layout: str) -> nn.Module:
    """``model`` with its 4-dimensional parameters and buffers (convolution weights) in
    ``layout``, converted in place."""
    return model.to(memory_format=_format(layout))
