"""Tests of image folders as a dataset (folder:PATH, cifar10-jpeg) and of the CIFAR-10 python
batches written from images; tests that need the JPEG archive skip when it is absent."""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import acert
from acert import data
from acert.cli import main as acert_main
from acert.config import TrainConfig, resolve
from acert.data import imagefiles, registry
from acert.models import Normalize
from tests.kit.data import one_line_error

ROOT = Path(__file__).resolve().parents[2]
ARCHIVE_PLACES = [ROOT.parent / "shared", ROOT.parent.parent / "shared"]  # main or a worktree
ARCHIVE = next((p / "data" / "cifar10-jpeg-q75.tar.gz" for p in ARCHIVE_PLACES if p.is_dir()), None)
CIFAR_CLASSES = registry.CIFAR10_CLASSES
SAFE = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


@pytest.fixture(autouse=True)
def fresh_folder_records():
    registry.folder_dataset.cache_clear()
    yield
    registry.folder_dataset.cache_clear()


def _write_png_folder(root: Path, classes=("cat", "dog"), per_class=(3, 2), size=6, grey=False):
    """PNG images (lossless) of random pixels; returns {split: (images (N,C,H,W), labels)}."""
    rng = np.random.default_rng(0)
    written = {}
    for split, n in zip(("train", "test"), per_class, strict=True):
        images, labels = [], []
        for label, name in enumerate(classes):
            for i in range(n):
                shape = (size, size) if grey else (size, size, 3)
                pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
                path = root / split / name / f"{i:04d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(path)
                images.append(pixels[None] if grey else pixels.transpose(2, 0, 1))
                labels.append(label)
        written[split] = (np.stack(images), np.array(labels))
    return written


def test_a_png_folder_reads_back_exactly_with_sorted_classes(tmp_path):
    written = _write_png_folder(tmp_path / "pets", classes=("dog", "cat"))
    name = f"folder:{tmp_path / 'pets'}"
    info = data.dataset_info(name)
    assert info.classes == ("cat", "dog") and info.num_classes == 2 and info.shape == (3, 6, 6)
    for split in ("train", "test"):
        loaded = data.load_imageset(name, split)
        images, written_as = written[split]  # dog (written as 0) first, then cat (1)
        cats, dogs = images[written_as == 1], images[written_as == 0]
        assert np.array_equal(loaded.images.numpy(), np.concatenate([cats, dogs]))
        assert loaded.labels.tolist() == [0] * len(cats) + [1] * len(dogs)
    pixels = written["train"][0] / 255
    assert info.mean == pytest.approx(pixels.mean(axis=(0, 2, 3)).tolist(), abs=1e-12)
    assert info.std == pytest.approx(pixels.std(axis=(0, 2, 3)).tolist(), abs=1e-12)


def test_a_relative_folder_is_named_by_its_absolute_path_in_a_run(tmp_path, monkeypatch):
    _write_png_folder(tmp_path / "pets")
    monkeypatch.chdir(tmp_path)
    assert resolve(TrainConfig(dataset="folder:pets")).dataset == f"folder:{tmp_path / 'pets'}"


def test_hidden_files_are_skipped_like_hidden_folders(tmp_path):
    written = _write_png_folder(tmp_path / "mac")
    (tmp_path / "mac" / "train" / "cat" / "._0000.png").write_bytes(b"\0\5 resource fork")
    (tmp_path / "mac" / "train" / ".Trashes").mkdir()
    loaded = data.load_imageset(f"folder:{tmp_path / 'mac'}", "train")
    assert np.array_equal(loaded.images.numpy(), written["train"][0])


def test_grey_and_jpeg_folders(tmp_path):
    _write_png_folder(tmp_path / "grey", grey=True)
    assert data.dataset_info(f"folder:{tmp_path / 'grey'}").shape == (1, 6, 6)
    for split, n in (("train", 2), ("test", 1)):
        for name, shade in (("a", 30), ("b", 220)):
            for i in range(n):
                path = tmp_path / "jpeg" / split / name / f"{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 8), (shade, shade + 10, shade - 20)).save(path, quality=95)
    loaded = data.load_imageset(f"folder:{tmp_path / 'jpeg'}", "train")
    assert loaded.images.shape == (4, 3, 8, 8)
    shade = loaded.images.float().mean(dim=(1, 2, 3))
    assert torch.all((shade < 128) == (loaded.labels == 0))


def test_sixteen_bit_grey_is_scaled_and_colour_among_grey_is_one_line(tmp_path):
    wide = np.array([[0, 128, 129, 300], [32896, 65279, 65534, 65535]], dtype=np.uint16)
    path = tmp_path / "wide.png"
    Image.fromarray(wide).save(path)
    assert Image.open(path).mode.startswith("I;16")
    expected = np.round(wide / 257).astype(np.uint8)  # 300 is 1, not Pillow's clipped 255
    assert np.array_equal(imagefiles.decode_image(path, 1, "fix")[0], expected)
    assert np.array_equal(imagefiles.decode_image(path, 3, "fix"), np.stack([expected] * 3))
    Image.new("RGB", (4, 2)).save(tmp_path / "colour.png")
    message = one_line_error(imagefiles.decode_image, tmp_path / "colour.png", 1, "fix it")
    assert message.count("fix it") == 1 and "first training image is grey" in message
    Image.fromarray(wide.astype(np.float32)).save(tmp_path / "float.tiff")
    one_line_error(imagefiles.decode_image, tmp_path / "float.tiff", 1, "fix", match="range")


def test_the_decoded_folder_is_cached_and_rebuilt_when_files_change(tmp_path, monkeypatch):
    _write_png_folder(tmp_path / "pets")
    name = f"folder:{tmp_path / 'pets'}"
    first = data.load_imageset(name, "train")
    assert (tmp_path / "pets" / "acert-cache-train.npz").is_file()
    assert not list((tmp_path / "pets").glob(".*tmp"))

    def no_decoding(path, *args):
        raise AssertionError(f"decoded {path} although the cache is valid")

    monkeypatch.setattr(imagefiles, "decode_image", no_decoding)
    again = data.load_imageset(name, "train")
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    monkeypatch.undo()
    Image.new("RGB", (6, 6), (1, 2, 3)).save(tmp_path / "pets" / "train" / "dog" / "0000.png")
    rebuilt = data.load_imageset(name, "train")  # same names, new content: rebuilt
    assert rebuilt.images[3].tolist() == [[[1] * 6] * 6, [[2] * 6] * 6, [[3] * 6] * 6]


def test_bad_folders_are_one_line_naming_the_problem(tmp_path):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    one_line_error(data.dataset_info, f"folder:{tmp_path / 'empty'}", match="no class folders")
    one_line_error(data.dataset_info, f"folder:{tmp_path / 'none'}", match="not found")
    _write_png_folder(tmp_path / "odd")
    (tmp_path / "odd" / "test" / "cow").mkdir()
    message = one_line_error(data.dataset_info, f"folder:{tmp_path / 'odd'}", match="differ")
    assert "only in test: cow" in message
    _write_png_folder(tmp_path / "single", classes=("cat",))
    one_line_error(data.dataset_info, f"folder:{tmp_path / 'single'}", match="one class folder")
    _write_png_folder(tmp_path / "broken")
    (tmp_path / "broken" / "train" / "dog" / "0001.png").write_bytes(b"not a png")
    one_line_error(data.dataset_info, f"folder:{tmp_path / 'broken'}", match="dog/0001.png")
    _write_png_folder(tmp_path / "sizes")
    Image.new("RGB", (7, 6)).save(tmp_path / "sizes" / "test" / "cat" / "0001.png")
    one_line_error(data.load, f"folder:{tmp_path / 'sizes'}", "test", match="cat/0001.png")


def test_a_run_keeps_the_training_statistics(tmp_path):
    _write_png_folder(tmp_path / "pets", per_class=(10, 3), size=8)
    name = f"folder:{tmp_path / 'pets'}"
    stats = data.dataset_info(name)
    run = tmp_path / "run"
    acert_main(
        ["train", "--quiet", "--dataset", name, "--model", "mlp-small", "--method", "ibp",
         "--epochs", "1", "--batch-size", "8", "--threads", "1", "--out", str(run)]
    )  # fmt: skip
    for split in ("train", "test"):  # the folder changes after training
        Image.new("RGB", (8, 8), (255, 255, 255)).save(tmp_path / "pets" / split / "cat" / "z.png")
    registry.folder_dataset.cache_clear()
    assert data.dataset_info(name).mean != stats.mean
    norm = next(m for m in acert.load(run).modules() if isinstance(m, Normalize))
    assert norm.mean.tolist() == pytest.approx(stats.mean) and norm.std.tolist() == pytest.approx(
        stats.std
    )


def _write_cifar_jpeg(base: Path, per_class: int = 1, classes=CIFAR_CLASSES) -> None:
    for split in ("train", "test"):
        for label, name in enumerate(classes):
            for i in range(per_class):
                path = base / "cifar10-jpeg" / split / name / f"{i:04d}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (32, 32), (20 * label, 10, 200 - 15 * label)).save(path)


def test_cifar10_jpeg_reads_data_dir_and_the_environment(tmp_path, monkeypatch):
    _write_cifar_jpeg(tmp_path / "d")
    by_flag = data.load_imageset("cifar10-jpeg", "train", tmp_path / "d")
    monkeypatch.setenv("ACERT_DATA_DIR", str(tmp_path / "d"))
    by_env = data.load_imageset("cifar10-jpeg", "test")
    assert by_flag.labels.tolist() == by_env.labels.tolist() == list(range(10))
    info = data.dataset_info("cifar10-jpeg")
    assert info.eps_max == pytest.approx(8.8 / 255) and info.augmentation == "crop2-flip-edge"
    _write_cifar_jpeg(tmp_path / "other", classes=(*CIFAR_CLASSES[:9], "lorry"))
    one_line_error(
        data.load, "cifar10-jpeg", "train", tmp_path / "other", match="expected airplane"
    )
    one_line_error(data.load, "cifar10-jpeg", "train", tmp_path / "none", match="DIR/cifar10-jpeg")


def _cifar_batches(folder: Path, splits: dict[str, tuple[np.ndarray, list[int]]]) -> None:
    """The official python format: data_batch_1..5 and test_batch (dicts with b'data' uint8
    (N, 3072) and b'labels'), and batches.meta (b'label_names')."""
    folder.mkdir(parents=True)
    train_images, train_labels = splits["train"]
    parts = np.array_split(np.arange(len(train_labels)), 5)
    batches = {f"data_batch_{i + 1}": rows for i, rows in enumerate(parts)}
    for name, rows in [*batches.items(), ("test_batch", None)]:
        images, labels = splits["test"] if rows is None else (train_images[rows], train_labels)
        labels = labels if rows is None else [train_labels[r] for r in rows]
        batch = {
            b"batch_label": name.encode(),
            b"labels": list(labels),
            b"data": images.reshape(len(images), 3072),
            b"filenames": [f"{i}.png".encode() for i in range(len(images))],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=4))
    meta = {b"label_names": [c.encode() for c in CIFAR_CLASSES], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=4))


def _images_of(root: Path, split: str) -> tuple[np.ndarray, list[int]]:
    loaded = data.load_imageset(f"folder:{root}", split)
    return loaded.images.numpy(), loaded.labels.tolist()


def _check_batches_round_trip(tmp_path: Path, root: Path) -> None:
    splits = {split: _images_of(root, split) for split in ("train", "test")}
    _cifar_batches(tmp_path / "cifar-10-batches-py", splits)
    for split in ("train", "test"):
        read = data.load_imageset("cifar10", split, tmp_path)
        assert np.array_equal(read.images.numpy(), splits[split][0])
        assert read.labels.tolist() == splits[split][1]


def test_cifar10_batches_written_from_images_read_back(tmp_path):
    _write_cifar_jpeg(tmp_path / "d", per_class=1)
    _check_batches_round_trip(tmp_path, tmp_path / "d" / "cifar10-jpeg")


@pytest.mark.skipif(ARCHIVE is None, reason="../shared/data/cifar10-jpeg-q75.tar.gz is absent")
def test_the_archive_read_as_cifar10_jpeg_and_as_python_batches(tmp_path):
    """Two images per class and split from the JPEG archive, as folders and as batches."""
    target = tmp_path / "d" / "cifar10-jpeg"
    taken: dict[str, int] = {}
    with tarfile.open(ARCHIVE) as archive:
        for member in archive:
            folder = member.name.rsplit("/", 1)[0]
            if member.isfile() and member.name.endswith(".jpg") and taken.get(folder, 0) < 2:
                taken[folder] = taken.get(folder, 0) + 1
                archive.extract(member, target, **SAFE)
    assert len(taken) == 20
    train = data.load_imageset("cifar10-jpeg", "train", tmp_path / "d")
    assert train.labels.tolist() == [k for k in range(10) for _ in range(2)]
    assert 0.3 < train.images.float().mean().item() / 255 < 0.7  # real photos, not blank
    _check_batches_round_trip(tmp_path, target)
