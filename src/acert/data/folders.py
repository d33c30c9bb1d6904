"""Image folders as a dataset: ``ROOT/train/<class>/*`` and ``ROOT/test/<class>/*`` (JPEG, PNG),
the layout of torchvision's ``ImageFolder``.

Class index = position of the class folder's name in sorted order; images are read in file-name
order within a class, classes in index order. Every image of a dataset must have the size of
the first training image, and its channels (grey: 1, colour: 3). The decoded arrays are cached
in ``ROOT/acert-cache-<split>.npz`` (:mod:`acert.data.imagefiles`), keyed by a fingerprint of the
files' names, sizes and modification times, together with the per-channel mean and standard
deviation of the split's pixels: those of the training split are the normalisation of a
``folder:ROOT`` dataset (:func:`acert.data.registry.folder_dataset`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from acert.data.imagefiles import (
    IMAGE_SUFFIXES,
    decode_all,
    decode_image,
    image_channels,
    load_cache,
    save_cache,
)
from acert.data.readers import Arrays
from acert.foundation.errors import DatasetError

SPLIT_FOLDERS = ("train", "test")
DECODING = "acert image decoding 2 (16-bit grey scaled)"
"""Part of every cache key: a cache written by an older decoder is rebuilt."""
_FIX = "replace or remove that file"


@dataclass(frozen=True)
class FolderSummary:
    """What a dataset record needs from an image folder: its classes (sorted folder names),
    the shape (C, H, W) of its images, the per-channel pixel mean and std of the training
    split (pixels in [0, 1]) and the images in each split."""

    classes: tuple[str, ...]
    shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    sizes: dict[str, int]


def class_names(root: Path, split: str) -> tuple[str, ...]:
    """The sorted class folders of ``root/split`` (hidden folders skipped)."""
    folder = root / split
    if not folder.is_dir():
        raise DatasetError(
            f"image folder {folder} not found; put the {split} images in "
            f"{folder}/<class>/<image>.jpg (or .png)"
        )
    classes = tuple(sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name[0] != "."))
    if not classes:
        raise DatasetError(
            f"image folder {folder} has no class folders; put each class's images in "
            f"{folder}/<class>/"
        )
    if len(classes) == 1:
        raise DatasetError(
            f"image folder {folder} has one class folder ({classes[0]}); a classifier and its "
            f"certificates need two or more: add the other classes' folders"
        )
    return classes


def checked_classes(root: Path, expected: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The classes of ``root``, the same in ``train`` and ``test`` (and equal to ``expected``
    when given), else a DatasetError naming the classes that differ."""
    train, test = class_names(root, "train"), class_names(root, "test")
    if train != test:
        only_train, only_test = sorted(set(train) - set(test)), sorted(set(test) - set(train))
        differ = (
            f"only in train: {', '.join(only_train) or '-'}; only in test: "
            f"{', '.join(only_test) or '-'}"
        )
        raise DatasetError(
            f"the class folders of {root / 'train'} and {root / 'test'} differ ({differ}); "
            "give both splits the same classes"
        )
    if expected is not None and train != expected:
        raise DatasetError(
            f"the class folders of {root / 'train'} are {', '.join(train)}, expected "
            f"{', '.join(expected)}; point --data-dir at the right folder"
        )
    return train


def _is_image_file(entry: os.DirEntry) -> bool:
    """A visible file with an image suffix (hidden ones, such as the ``._name.jpg`` copies
    macOS leaves, are skipped like hidden folders)."""
    name = entry.name
    return name[0] != "." and name.lower().endswith(IMAGE_SUFFIXES) and entry.is_file()


def _files(root: Path, split: str, classes: tuple[str, ...]) -> tuple[list[Path], list[int], str]:
    """The split's image files (by class, then name), their labels, and a fingerprint of their
    names, sizes and modification times (one ``scandir`` pass: tens of thousands of files)."""
    files: list[Path] = []
    labels: list[int] = []
    digest = hashlib.sha256(DECODING.encode())
    for index, name in enumerate(classes):
        folder = root / split / name
        with os.scandir(folder) as entries:
            images = sorted(
                (e for e in entries if _is_image_file(e)),
                key=lambda e: e.name,
            )
        if not images:
            raise DatasetError(
                f"class folder {folder} holds no .jpg, .jpeg or .png image; add its images or "
                "remove the folder from both splits"
            )
        for entry in images:
            stat = entry.stat()
            digest.update(f"{name}/{entry.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        files += [folder / e.name for e in images]
        labels += [index] * len(images)
    return files, labels, digest.hexdigest()


def _shape(root: Path, classes: tuple[str, ...]) -> tuple[int, int, int]:
    """The shape every image must have: that of the first training image."""
    first = _files(root, "train", classes[:1])[0][0]
    channels = image_channels(first, _FIX)
    pixels = decode_image(first, channels, _FIX)
    return (channels, pixels.shape[1], pixels.shape[2])


def _moments(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (population) of uint8 images as pixels in [0, 1], exact from
    each channel's histogram of the 256 values."""
    values = np.arange(256, dtype=np.float64) / 255
    mean, std = [], []
    for c in range(images.shape[1]):
        counts = np.bincount(images[:, c].ravel(), minlength=256).astype(np.float64)
        m = counts @ values / counts.sum()
        mean.append(m)
        std.append(np.sqrt(counts @ (values - m) ** 2 / counts.sum()))
    return np.array(mean), np.array(std)


def _read(
    root: Path, split: str, classes: tuple[str, ...], names: tuple[str, ...] | None = None
) -> dict[str, np.ndarray]:
    """The cached arrays of a split (those of ``names``, else all of images, labels, shape,
    mean, std), decoding the split when the cache is absent or stale."""
    files, labels, fingerprint = _files(root, split, classes)
    key = np.array([fingerprint, *classes])
    cache = root / f"acert-cache-{split}.npz"
    cached = load_cache(cache, key, names)
    if cached is not None:
        return cached
    shape = _shape(root, classes)
    images = decode_all(files, shape, _FIX)
    mean, std = _moments(images)
    arrays = {
        "images": images,
        "labels": np.asarray(labels, dtype=np.int64),
        "shape": np.array(shape),
        "mean": mean,
        "std": std,
    }
    save_cache(cache, key, **arrays)
    return arrays


def read_image_folder(root: Path, split: str, classes: tuple[str, ...] | None = None) -> Arrays:
    """One split of the image folders in ``root`` (class folders checked against ``classes``
    when given), decoded once and then read from the cache."""
    arrays = _read(root, split, checked_classes(root, classes))
    return Arrays(arrays["images"], arrays["labels"], str(root / split))


def summarise_folder(root: Path) -> FolderSummary:
    """The classes, image shape, training normalisation and split sizes of ``root`` (decodes
    and caches the training split the first time)."""
    classes = checked_classes(root)
    train = _read(root, "train", classes, ("shape", "mean", "std"))
    std = train["std"]
    if not np.all(std > 0):
        raise DatasetError(
            f"the training images of {root} are all one colour in some channel (std {std}); "
            "they cannot be normalised, check the folder"
        )
    sizes = {split: len(_files(root, split, classes)[0]) for split in SPLIT_FOLDERS}
    return FolderSummary(
        classes,
        tuple(int(v) for v in train["shape"]),  # type: ignore[arg-type]
        tuple(float(v) for v in train["mean"]),
        tuple(float(v) for v in std),
        sizes,
    )
