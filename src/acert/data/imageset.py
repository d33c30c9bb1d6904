"""The in-memory image set (:class:`ImageSet`) and its seeded, stratified splits and subsets."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from acert.foundation.errors import DatasetError

PIXEL_DTYPES = (torch.float32, torch.float64)
"""The dtypes of float pixels an ImageSet keeps: those the bounds certify in."""


@dataclass
class ImageSet:
    """A labelled image set kept in memory.

    Attributes:
        images: uint8 (N, C, H, W), pixel values 0..255 (a dataset's files, compactly), or
            float32 or float64 (N, ...) pixels in [0, 1] (data given from Python, in the
            model's dtype: :func:`as_imageset`).
        labels: int64 (N,).
    """

    images: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        compact = self.images.dtype == torch.uint8 and self.images.dim() == 4
        pixels = self.images.dtype in PIXEL_DTYPES and self.images.dim() >= 2
        if not (compact or pixels):
            raise DatasetError(
                "ImageSet images must be uint8 (N, C, H, W) or float32/float64 (N, ...) "
                f"pixels, got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise DatasetError(
                f"ImageSet labels must be int64 ({len(self.images)},), got "
                f"{self.labels.dtype} {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one image."""
        return tuple(self.images.shape[1:])

    def floats(self, idx: Tensor | None = None) -> Tensor:
        """Pixels of rows ``idx`` (all if None) in [0, 1], a new tensor: float32 from uint8
        images, float pixels in their own dtype."""
        rows = self.images if idx is None else self.images[idx]
        if rows.dtype in PIXEL_DTYPES:
            return rows.clone()
        return rows.to(torch.float32).div_(255.0)

    def subset(self, idx: Tensor) -> ImageSet:
        """A new ImageSet holding rows ``idx`` (int64 (n,) or bool (N,)), in that order."""
        return ImageSet(self.images[idx], self.labels[idx])


# ------------------------------------------------------------------------------------ splits
def _class_quotas(counts: list[int], n: int) -> list[int]:
    """Split ``n`` over classes in proportion to ``counts`` (largest remainder, exact integers).

    Leftover units go to the largest remainders, ties to the lower class index.
    """
    total = sum(counts)
    quotas = [c * n // total for c in counts]
    order = sorted(range(len(counts)), key=lambda k: (-(counts[k] * n % total), k))
    for k in order[: n - sum(quotas)]:
        quotas[k] += 1
    return quotas


def stratified_indices(labels: Tensor, n: int, seed: int) -> Tensor:
    """Sorted int64 row indices of a stratified random sample of ``n`` rows.

    Classes are visited in ascending label order with one ``torch.Generator`` seeded by
    ``seed``; each class contributes the first quota entries of a ``randperm`` of its rows.
    """
    labels = labels.cpu()
    classes, counts = torch.unique(labels, return_counts=True)
    generator = torch.Generator().manual_seed(seed)
    picked = [torch.empty(0, dtype=torch.int64)]
    for c, quota in zip(classes.tolist(), _class_quotas(counts.tolist(), n), strict=True):
        rows = torch.nonzero(labels == c).flatten()
        picked.append(rows[torch.randperm(len(rows), generator=generator)[:quota]])
    return torch.cat(picked).sort().values


def split_train_val(data: ImageSet, val_size: int, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """Carve a stratified validation set from a training set.

    Each class gives validation images in proportion to its size (equal shares for balanced
    data; leftovers to the lower class indices); the rows are drawn with a generator seeded by
    ``seed``, so the split is deterministic. Both parts keep the original row order.

    Args:
        data: the training set (N rows).
        val_size: validation rows, 0 <= val_size < N; 0 gives ``data`` itself and an empty set.
        seed: random seed of the draw.

    Returns:
        (train, val) with N - val_size and val_size rows, disjoint, covering ``data``.
    """
    if not 0 <= val_size < len(data):
        raise DatasetError(
            f"val_size {val_size} does not fit a training set of {len(data)} images; "
            f"choose a val_size in 0..{len(data) - 1}"
        )
    if val_size == 0:
        return data, data.subset(torch.empty(0, dtype=torch.int64))
    val = stratified_indices(data.labels, val_size, seed)
    keep = torch.ones(len(data), dtype=torch.bool)
    keep[val] = False
    return data.subset(torch.nonzero(keep).flatten()), data.subset(val)


def stratified_subset(data: ImageSet, n: int, seed: int = 0) -> ImageSet:
    """A stratified, seeded subset of ``n`` rows (original order); the whole set if n >= len."""
    if n >= len(data):
        return data
    num_classes = int(torch.unique(data.labels).numel())
    if n < num_classes:
        raise DatasetError(
            f"a stratified subset of {n} images cannot cover {num_classes} classes; "
            f"ask for at least {num_classes} images"
        )
    return data.subset(stratified_indices(data.labels, n, seed))
