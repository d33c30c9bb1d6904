"""Helpers of the tests of acert.data: writers of tiny synthetic dataset files (idx, CIFAR,
TinyImageNet), numbered image sets, and the check of a one-line DatasetError."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from acert.data import ImageSet
from acert.foundation.errors import DatasetError

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801


def one_line_error(func, *args, match: str | None = None, **kwargs) -> str:
    """Call func, expect a DatasetError with a one-line message (containing ``match``)."""
    with pytest.raises(DatasetError) as info:
        func(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    if match is not None:
        assert match in message, message
    return message


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """An idx file of uint8 ``array``; the magic defaults to 0x0800 + ndim."""
    magic = 0x0800 + array.ndim if magic is None else magic
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_file(path: Path, payload: bytes, gz: bool = False) -> Path:
    """Write ``payload`` to ``path`` (``path.gz``, gzipped, when ``gz``) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def write_idx_dataset(
    folder: Path, n_train: int = 12, n_test: int = 6, gz: bool = False, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Four MNIST-style idx files in ``folder``; returns {split: (images (N,28,28), labels)}."""
    rng = np.random.default_rng(seed)
    written = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_file(folder / f"{prefix}-images-idx3-ubyte", idx_bytes(images), gz)
        write_file(folder / f"{prefix}-labels-idx1-ubyte", idx_bytes(labels), gz)
        written[split] = (images, labels.astype(np.int64))
    return written


def _py2_style(payload: bytes) -> bytes:
    """Name numpy's reconstructor the way the original (Python 2) CIFAR files do."""
    return payload.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def write_cifar(folder: Path, per_batch: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """data_batch_1..5 and test_batch in ``folder``; returns {name: data (per_batch, 3072)}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data}
        (folder / name).write_bytes(_py2_style(pickle.dumps(batch, protocol=2)))
        written[name] = (data, labels)
    return written


def write_jpeg(path: Path, value: int, size: int = 64) -> None:
    """A solid grey ``size`` x ``size`` RGB JPEG with pixel value ``value``."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (value, value, value)).save(path, format="JPEG", quality=95)


def write_tiny(root: Path, per_class: int = 3, val: int = 4) -> None:
    """A 2-class tiny-imagenet-200 folder; class n01 images are dark (40), n02 bright (210).

    wnids.txt lists n02 before n01, so the sorted order (n01 -> 0, n02 -> 1) is what is tested.
    """
    shades = {"n01": 40, "n02": 210}
    root.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("n02\nn01\n")
    for wnid, shade in shades.items():
        for i in range(per_class):
            write_jpeg(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", shade)
    lines = []
    for i in range(val):
        wnid = ("n01", "n02")[i % 2]
        write_jpeg(root / "val" / "images" / f"val_{i}.JPEG", shades[wnid])
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    # listed in reverse: the reader orders the test split by file name
    (root / "val" / "val_annotations.txt").write_text("\n".join(reversed(lines)) + "\n")


def numbered_imageset(counts: list[int]) -> ImageSet:
    """An ImageSet whose row i stores i in its first two pixels; class k has counts[k] rows.

    Rows are interleaved across classes so that class order differs from row order.
    """
    labels = torch.cat([torch.full((c,), k, dtype=torch.int64) for k, c in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    images = torch.zeros(len(labels), 1, 4, 4, dtype=torch.uint8)
    rows = torch.arange(len(labels))
    images[:, 0, 0, 0] = (rows % 256).to(torch.uint8)
    images[:, 0, 0, 1] = (rows // 256).to(torch.uint8)
    return ImageSet(images, labels)


def row_ids(data_or_images: ImageSet | torch.Tensor) -> torch.Tensor:
    """Recover the original row numbers stored by :func:`numbered_imageset` (uint8 or [0, 1])."""
    images = data_or_images.images if isinstance(data_or_images, ImageSet) else data_or_images
    if images.is_floating_point():
        images = (images * 255).round().to(torch.int64)
    images = images.to(torch.int64)
    return images[:, 0, 0, 0] + 256 * images[:, 0, 0, 1]
