"""Data given from Python: a ``torch.utils.data.Dataset`` of (image, label), a ``DataLoader`` or
an ``(x, y)`` pair of tensors, as one :class:`~acert.data.ImageSet` of float pixels in the
model's dtype (float32 or float64), checked.

``acert.fit`` and ``acert.certify`` take any of the three; the images must be pixels in
[0, 1] (the model's ``Normalize`` layer holds any normalisation, so that ε stays in pixel
units) and the labels class indices.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from acert.data.imageset import PIXEL_DTYPES, ImageSet
from acert.foundation.errors import DatasetError

__all__ = ["as_imageset"]


def as_imageset(
    data: Any,
    name: str = "data",
    num_classes: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> ImageSet:
    """``data`` as an :class:`ImageSet` of ``dtype`` pixels, or a one-line DatasetError.

    Args:
        data: an ``(x, y)`` pair of tensors, a map-style ``Dataset`` of ``(image, label)``
            or a ``DataLoader`` yielding ``(x, y)`` batches.
        name: what the data is called in an error (``train``, ``val``, ``data``).
        num_classes: the classes the model has; labels must lie below it.
        dtype: the pixels' dtype, the model's (float32 or float64: :data:`PIXEL_DTYPES`).
    """
    if dtype not in PIXEL_DTYPES:
        raise DatasetError(f"pixels are kept as float32 or float64, not {dtype}")
    if isinstance(data, tuple | list) and len(data) == 2 and isinstance(data[0], Tensor):
        x, y = data
    elif isinstance(data, DataLoader):
        x, y = _stack([_pair(batch, name) for batch in data], name, batched=True)
    elif isinstance(data, TorchDataset) and hasattr(data, "__len__"):
        x, y = _stack([_pair(data[i], name) for i in range(len(data))], name, batched=False)
    else:
        raise DatasetError(
            f"{name} must be an (x, y) pair of tensors, a torch Dataset of (image, label) or a "
            f"DataLoader, got {type(data).__name__}"
        )
    return _checked(x, y, name, num_classes, dtype)


def _pair(item: Any, name: str) -> tuple[Tensor, Tensor]:
    if not (isinstance(item, tuple | list) and len(item) >= 2):
        raise DatasetError(f"{name} must yield (image, label) pairs, got {type(item).__name__}")
    image, label = item[0], item[1]
    if not isinstance(image, Tensor):
        raise DatasetError(
            f"{name} yields images of type {type(image).__name__}; yield torch tensors "
            "(e.g. torchvision's ToTensor())"
        )
    if isinstance(label, numbers.Integral) and not isinstance(label, bool):
        label = torch.tensor(int(label))
    if not isinstance(label, Tensor):
        raise DatasetError(f"{name} yields labels of type {type(label).__name__}; yield ints")
    return image, label


def _stack(pairs: list[tuple[Tensor, Tensor]], name: str, batched: bool) -> tuple[Tensor, Tensor]:
    if not pairs:
        raise DatasetError(f"{name} holds no samples; pass at least one")
    shapes = {tuple(image.shape[1:] if batched else image.shape) for image, _ in pairs}
    if len(shapes) > 1:
        raise DatasetError(f"{name} yields images of different shapes {sorted(shapes)[:2]}")
    join = torch.cat if batched else torch.stack
    return join([image for image, _ in pairs]), join(
        [label.reshape(-1 if batched else ()) for _, label in pairs]
    )


def _checked(
    x: Tensor, y: Tensor, name: str, num_classes: int | None, dtype: torch.dtype
) -> ImageSet:
    if not isinstance(y, Tensor):
        raise DatasetError(f"{name}'s labels must be a tensor, got {type(y).__name__}")
    if x.dim() < 2 or y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise DatasetError(
            f"{name} must hold images (N, C, H, W) and labels (N,), got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )
    if x.shape[0] == 0:
        raise DatasetError(f"{name} holds no samples; pass at least one")
    if not x.is_floating_point():
        raise DatasetError(
            f"{name}'s images are {x.dtype}; pass float pixels in [0, 1] (e.g. x.float() / 255)"
        )
    if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise DatasetError(
            f"{name}'s pixels must lie in [0, 1], got values in [{x.min().item():.4g}, "
            f"{x.max().item():.4g}]; normalisation belongs in the model's Normalize layer"
        )
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise DatasetError(f"{name}'s labels are {y.dtype}; pass integer class indices (y.long())")
    high = num_classes if num_classes is not None else None
    if y.min() < 0 or (high is not None and y.max() >= high):
        raise DatasetError(
            f"{name}'s labels must lie in [0, {high if high is not None else 'K'}), got "
            f"{y.min().item()}..{y.max().item()}"
        )
    return ImageSet(x.detach().to("cpu", dtype).contiguous(), y.detach().to("cpu", torch.int64))
