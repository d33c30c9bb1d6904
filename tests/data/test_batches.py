"""Tests of acert.data's splits, BatchLoader and augmentation."""

from __future__ import annotations

import pytest
import torch

from acert import data
from acert.data.batches import _crop_flip
from tests.kit.data import numbered_imageset, one_line_error, row_ids


# ------------------------------------------------------------------------------------ splits
def test_split_train_val_is_stratified_deterministic_and_disjoint():
    full = numbered_imageset([10] * 10)
    train, val = data.split_train_val(full, 50, seed=3)
    assert len(train) == 50 and len(val) == 50
    assert torch.equal(torch.bincount(val.labels), torch.full((10,), 5))
    ids_train, ids_val = row_ids(train), row_ids(val)
    assert torch.equal(torch.cat([ids_train, ids_val]).sort().values, torch.arange(100))
    assert torch.all(ids_train.diff() > 0) and torch.all(ids_val.diff() > 0)  # original order
    assert torch.equal(full.labels[ids_val], val.labels)
    assert torch.equal(row_ids(data.split_train_val(full, 50, seed=3)[1]), ids_val)
    assert not torch.equal(row_ids(data.split_train_val(full, 50, seed=4)[1]), ids_val)


def test_split_proportional_for_imbalanced_classes():
    _, val = data.split_train_val(numbered_imageset([50, 30, 20]), 10)
    assert torch.bincount(val.labels).tolist() == [5, 3, 2]
    _, val = data.split_train_val(numbered_imageset([5, 5, 5]), 4)
    assert torch.bincount(val.labels).tolist() == [2, 1, 1]  # leftover to the lowest class


def test_split_edge_cases():
    full = numbered_imageset([3, 3])
    train, val = data.split_train_val(full, 0)
    assert train is full and len(val) == 0 and val.images.shape[1:] == (1, 4, 4)
    one_line_error(data.split_train_val, full, 6, match="val_size 6")


def test_stratified_subset():
    full = numbered_imageset([20, 20, 20])
    sub = data.stratified_subset(full, 9, seed=1)
    assert torch.bincount(sub.labels).tolist() == [3, 3, 3]
    assert torch.equal(full.labels[row_ids(sub)], sub.labels)
    assert torch.equal(row_ids(data.stratified_subset(full, 9, seed=1)), row_ids(sub))
    assert data.stratified_subset(full, 60) is full and data.stratified_subset(full, 99) is full
    one_line_error(data.stratified_subset, full, 2, match="3 classes")


# ----------------------------------------------------------------------------------- batches
def test_batchloader_covers_every_row_once_and_maps_idx_to_rows():
    full = numbered_imageset([40, 30, 33])
    loader = data.BatchLoader(full, batch_size=10, shuffle=True, seed=5)
    batches = list(loader)
    assert len(loader) == len(batches) == 11 and len(batches[-1][2]) == 3
    idx = torch.cat([b[2] for b in batches])
    assert torch.equal(idx.sort().values, torch.arange(103))
    for x, y, i in batches:
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and i.dtype == torch.int64
        assert torch.equal(x, full.floats(i)) and torch.equal(y, full.labels[i])
        assert torch.equal(row_ids(x), i)
    dropped = data.BatchLoader(full, batch_size=10, drop_last=True)
    assert len(dropped) == len(list(dropped)) == 10
    assert torch.equal(torch.cat([b[2] for b in dropped]), torch.arange(100))  # no shuffle


def test_batchloader_epochs_are_reproducible():
    full = numbered_imageset([25, 25])

    def order(loader, epoch):
        loader.set_epoch(epoch)
        return torch.cat([b[2] for b in loader])

    loader = data.BatchLoader(full, 8, shuffle=True, seed=2)
    epoch0, epoch1 = order(loader, 0), order(loader, 1)
    assert not torch.equal(epoch0, epoch1)
    assert torch.equal(order(loader, 0), epoch0)
    assert torch.equal(order(data.BatchLoader(full, 16, shuffle=True, seed=2), 1), epoch1)


@pytest.mark.parametrize("n", [100, 101])
def test_batchloader_sharding(n):
    full = numbered_imageset([n // 2, n - n // 2])
    shards = []
    for rank in (0, 1):
        loader = data.BatchLoader(full, 7, shuffle=True, seed=1, rank=rank, world_size=2)
        loader.set_epoch(3)
        shards.append(torch.cat([b[2] for b in loader]))
    assert len(shards[0]) == len(shards[1]) == (n + 1) // 2
    assert set(torch.cat(shards).tolist()) == set(range(n))
    overlap = set(shards[0].tolist()) & set(shards[1].tolist())
    assert len(overlap) == (n % 2)  # only the wrapped padding repeats a row
    single = data.BatchLoader(full, 7, shuffle=True, seed=1)
    single.set_epoch(3)
    order = single.indices()  # the same epoch permutation, padded by wrapping, dealt out
    padded = torch.cat([order, order[: n % 2]])
    assert torch.equal(shards[0], padded[0::2]) and torch.equal(shards[1], padded[1::2])


def test_batchloader_augments_and_validates():
    full = numbered_imageset([16, 16])
    loader = data.BatchLoader(full, 32, augmentation="crop-flip", seed=0)
    x, _, _ = next(iter(loader))
    assert x.shape == (32, 1, 4, 4) and float(x.min()) >= 0 and float(x.max()) <= 1
    one_line_error(data.BatchLoader, full, 0, match="batch_size")
    one_line_error(data.BatchLoader, full, 4, rank=2, world_size=2, match="rank=2")
    one_line_error(data.BatchLoader, full, 4, augmentation="mixup", match="mixup")


# ------------------------------------------------------------------------------ augmentation
def _candidates(image: torch.Tensor, pad: int = 4, edge: bool = False) -> list[torch.Tensor]:
    """All crops of a padded copy of ``image`` (C, H, W), with and without mirroring; the
    padding is zeros, or with ``edge`` copies of the nearest border pixel."""
    _, H, W = image.shape
    rows = torch.arange(-pad, H + pad).clamp(0, H - 1)
    cols = torch.arange(-pad, W + pad).clamp(0, W - 1)
    padded = image[:, rows[:, None], cols[None, :]]
    if not edge:
        padded = torch.zeros_like(padded)
        padded[:, pad : pad + H, pad : pad + W] = image
    crops = [
        padded[:, i : i + H, j : j + W] for i in range(2 * pad + 1) for j in range(2 * pad + 1)
    ]
    return crops + [c.flip(-1) for c in crops]


@pytest.mark.parametrize(
    ("kind", "pad", "edge"),
    [("crop-flip", 4, False), ("crop-flip-edge", 4, True), ("crop2-flip-edge", 2, True)],
)
def test_augment_crop_flip_matches_manual_crops(kind, pad, edge):
    x = torch.rand(40, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = data.augment(x, kind, torch.Generator().manual_seed(1))
    again = data.augment(x, kind, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and torch.equal(out, again)
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    positions = (2 * pad + 1) ** 2
    shifts = set()
    flipped = 0
    for image, result in zip(x, out, strict=True):
        matches = [k for k, c in enumerate(_candidates(image, pad, edge)) if torch.equal(c, result)]
        assert matches, f"an augmented image is not a {kind} crop (or its mirror) of the input"
        shifts.add(matches[0] % positions)
        flipped += matches[0] >= positions
    assert len(shifts) > 1 and 0 < flipped < len(x)


def test_crop_flip_offsets_and_padding_modes():
    x = torch.rand(2, 1, 6, 6)
    zero, four = torch.zeros(2, dtype=torch.int64), torch.full((2,), 4)
    no, yes = torch.zeros(2, dtype=torch.bool), torch.ones(2, dtype=torch.bool)
    shifted = _crop_flip(x, zero, zero, no, "constant")  # image moved 4 down and 4 right
    assert torch.equal(shifted[:, :, 4:, 4:], x[:, :, :2, :2])
    assert torch.all(shifted[:, :, :4] == 0) and torch.all(shifted[:, :, :, :4] == 0)
    edge = _crop_flip(x, zero, four, no, "replicate")
    assert torch.equal(edge[:, :, :4], x[:, :, :1].expand(-1, -1, 4, -1))
    assert torch.equal(_crop_flip(x, four, four, yes, "constant"), x.flip(-1))
    assert torch.equal(_crop_flip(x, four, four, no, "replicate"), x)
    two = torch.full((2,), 2)
    assert torch.equal(_crop_flip(x, two, two, no, "replicate", pad=2), x)
    assert torch.equal(
        _crop_flip(x, zero, two, no, "replicate", pad=2)[:, :, :2],
        x[:, :, :1].expand(-1, -1, 2, -1),
    )


def test_augment_none_edge_and_errors():
    x = torch.rand(5, 3, 16, 16)
    assert data.augment(x, "none") is x
    out = data.augment(x, "crop-flip-edge", torch.Generator().manual_seed(0))
    assert out.shape == x.shape and float(out.min()) >= float(x.min())
    assert float(out.max()) <= float(x.max())
    one_line_error(data.augment, x, "cutout", match="cutout")
