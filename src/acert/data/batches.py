"""Batches and augmentation over an :class:`~acert.data.imageset.ImageSet`.

Augmentation is a random crop of a padded image and a horizontal flip, applied to a whole batch
with one gather instead of a per-image loop. The datasets use the settings of the ACERT
reference code: CIFAR-10 pads 2 pixels by edge replication (``crop2-flip-edge``), TinyImageNet
4 (``crop-flip-edge``, docs/METHOD.md, "Optimisation"); ``crop-flip`` (zero padding 4, the common
CIFAR recipe) is there for other experiments.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from acert.data.imageset import ImageSet
from acert.foundation.errors import DatasetError


@dataclass(frozen=True)
class CropFlip:
    """Pad by ``padding`` pixels (``mode``: ``"constant"`` zeros or ``"replicate"`` edge
    pixels), crop back to (H, W) at a uniform random offset, mirror with probability 1/2."""

    padding: int
    mode: str


AUGMENTATIONS: dict[str, CropFlip | None] = {
    "none": None,
    "crop-flip": CropFlip(4, "constant"),
    "crop-flip-edge": CropFlip(4, "replicate"),
    "crop2-flip-edge": CropFlip(2, "replicate"),
}


def _crop_flip(x: Tensor, dy: Tensor, dx: Tensor, flip: Tensor, mode: str, pad: int = 4) -> Tensor:
    """Pad by ``pad``, crop (H, W) at offsets (dy, dx), then mirror where ``flip``.

    Args:
        x: (B, C, H, W). dy, dx: (B,) int offsets in [0, 2 * pad]; pad offsets = no shift.
        flip: (B,) bool. mode: ``"constant"`` (zeros) or ``"replicate"`` (edge pixels).
    """
    B, _, H, W = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode=mode)
    dy, dx, flip = dy.to(x.device), dx.to(x.device), flip.to(x.device)
    cols = torch.arange(W, device=x.device)
    rows = dy[:, None] + torch.arange(H, device=x.device)  # (B, H)
    cols = dx[:, None] + torch.where(flip[:, None], W - 1 - cols, cols)  # (B, W)
    batch = torch.arange(B, device=x.device)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def _check_augmentation(kind: str) -> None:
    if kind not in AUGMENTATIONS:
        raise DatasetError(
            f"unknown augmentation {kind!r}; choose one of {', '.join(AUGMENTATIONS)}"
        )


def augment(x: Tensor, kind: str, generator: torch.Generator | None = None) -> Tensor:
    """Random crop + horizontal flip for a whole batch at once.

    Args:
        x: (B, C, H, W) float pixels in [0, 1].
        kind: a name of :data:`AUGMENTATIONS` (``"none"`` returns x unchanged).
        generator: CPU generator for the random offsets and flips (None = global RNG).

    Returns:
        (B, C, H, W) tensor on x's device, values still in [0, 1].
    """
    _check_augmentation(kind)
    spec = AUGMENTATIONS[kind]
    if spec is None:
        return x
    if x.dim() != 4:
        raise DatasetError(f"augment expects a batch (B, C, H, W), got shape {tuple(x.shape)}")
    B, span = x.shape[0], 2 * spec.padding + 1
    dy = torch.randint(span, (B,), generator=generator)
    dx = torch.randint(span, (B,), generator=generator)
    flip = torch.rand(B, generator=generator) < 0.5
    return _crop_flip(x, dy, dx, flip, spec.mode, spec.padding)


class BatchLoader:
    """Iterates batches ``(x, y, idx)`` over an :class:`ImageSet`.

    ``x`` float32 (B, C, H, W) in [0, 1] (augmented if asked), ``y`` int64 (B,), and ``idx``
    int64 (B,) the row of each sample in the ImageSet; all three on ``device``. With
    ``shuffle`` the epoch order is ``randperm`` from a generator seeded ``seed + epoch``, so
    call :meth:`set_epoch` every epoch (as with ``DistributedSampler``). With ``world_size`` > 1
    the epoch order is padded by wrapping to a multiple of ``world_size`` and rank ``r`` takes
    positions ``r, r + world_size, ...``: equal-size, disjoint (but for the padding) shards.
    Augmentation draws come from a generator seeded by (seed, epoch, rank).
    """

    def __init__(
        self,
        data: ImageSet,
        batch_size: int,
        shuffle: bool = False,
        augmentation: str = "none",
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
    ) -> None:
        if batch_size < 1 or seed < 0 or world_size < 1 or not 0 <= rank < world_size:
            raise DatasetError(
                "BatchLoader needs batch_size >= 1, seed >= 0 and 0 <= rank < world_size, got "
                f"batch_size={batch_size}, seed={seed}, rank={rank}, world_size={world_size}"
            )
        _check_augmentation(augmentation)
        self.data, self.batch_size, self.shuffle = data, batch_size, shuffle
        self.augmentation, self.drop_last, self.seed = augmentation, drop_last, seed
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order (and augmentation) the next iteration uses."""
        if epoch < 0:
            raise DatasetError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def _per_rank(self) -> int:
        return math.ceil(len(self.data) / self.world_size)

    def __len__(self) -> int:
        if self.drop_last:
            return self._per_rank() // self.batch_size
        return math.ceil(self._per_rank() / self.batch_size)

    def indices(self) -> Tensor:
        """This rank's row order for the current epoch, int64 (ceil(N / world_size),)."""
        n = len(self.data)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        total = self._per_rank() * self.world_size
        if total > n:
            order = order.repeat(math.ceil(total / n))[:total]
        return order[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        order = self.indices()
        state = np.random.SeedSequence([self.seed, self.epoch, self.rank]).generate_state(1)
        generator = torch.Generator().manual_seed(int(state[0]))
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            x = self.data.floats(idx).to(self.device)
            x = augment(x, self.augmentation, generator)
            yield x, self.data.labels[idx].to(self.device), idx.to(self.device)
