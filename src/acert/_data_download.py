"""Fetching the standard dataset files for online users (private; see :func:`acert.data.download`).

Files come from their usual public addresses with ``urllib``; each is checked against its
published MD5 and only then moved into place (temp file + ``os.replace``), so an interrupted
download never leaves a half-written file where the readers would find it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from acert.errors import DatasetError

_MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
_FASHION_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
_TIMEOUT_S = 60


@dataclass(frozen=True)
class Remote:
    """One file to fetch: its name, the base URLs tried in order, and its MD5 (None = unknown)."""

    filename: str
    mirrors: tuple[str, ...]
    md5: str | None


@dataclass(frozen=True)
class Source:
    """Where a dataset's files go (``subdir`` of data_dir) and which folder holds the result."""

    subdir: str
    remotes: tuple[Remote, ...]
    result: str  # folder returned, relative to data_dir


SOURCES = {
    "mnist": Source(
        "mnist",
        (
            Remote(
                "train-images-idx3-ubyte.gz", _MNIST_MIRRORS, "f68b3c2dcbeaaa9fbdd348bbdeb94873"
            ),
            Remote(
                "train-labels-idx1-ubyte.gz", _MNIST_MIRRORS, "d53e105ee54ea40749a09fcbcd1e9432"
            ),
            Remote("t10k-images-idx3-ubyte.gz", _MNIST_MIRRORS, "9fb629c4189551a2d022fa330f9573f3"),
            Remote("t10k-labels-idx1-ubyte.gz", _MNIST_MIRRORS, "ec29112dd5afa0611ce80d1b7f02629c"),
        ),
        "mnist",
    ),
    "fashion-mnist": Source(
        "fashion-mnist",
        (
            Remote(
                "train-images-idx3-ubyte.gz", _FASHION_MIRRORS, "8d4fb7e6c68d591d4c3dfef9ec88bf0d"
            ),
            Remote(
                "train-labels-idx1-ubyte.gz", _FASHION_MIRRORS, "25c81989df183df01b3e8a0aad5dffbe"
            ),
            Remote(
                "t10k-images-idx3-ubyte.gz", _FASHION_MIRRORS, "bef4ecab320f06d8554ea6380940ec79"
            ),
            Remote(
                "t10k-labels-idx1-ubyte.gz", _FASHION_MIRRORS, "bb300cfdad3c16e7a12a480ee83cd310"
            ),
        ),
        "fashion-mnist",
    ),
    "cifar10": Source(
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
    "tinyimagenet": Source(
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
}


def md5_of(path: Path) -> str:
    """Hex MD5 of a file, read in 1 MiB blocks."""
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _copy_url(url: str, target: Path) -> None:
    with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response, target.open("wb") as out:
        shutil.copyfileobj(response, out, 1 << 20)


def fetch(remote: Remote, folder: Path) -> Path:
    """Download ``remote`` into ``folder`` unless a file with the right MD5 is already there.

    Mirrors are tried in order. Raises DatasetError naming the URLs when all fail, or when the
    downloaded file has the wrong MD5.
    """
    dest = folder / remote.filename
    if dest.is_file() and (remote.md5 is None or md5_of(dest) == remote.md5):
        return dest
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DatasetError(
            f"cannot create folder {folder} ({err.strerror or type(err).__name__}); "
            "choose another --data-dir"
        ) from err
    failures = []
    for base in remote.mirrors:
        url = base + remote.filename
        fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=remote.filename, suffix=".part")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            _copy_url(url, tmp)
        except (OSError, ValueError) as err:
            tmp.unlink(missing_ok=True)
            failures.append(f"{url} ({err})")
            continue
        got = md5_of(tmp)
        if remote.md5 is not None and got != remote.md5:
            tmp.unlink(missing_ok=True)
            failures.append(f"{url} (MD5 {got}, expected {remote.md5})")
            continue
        os.replace(tmp, dest)
        return dest
    raise DatasetError(
        f"could not download {remote.filename}: {'; '.join(failures)}; fetch it by hand "
        f"(e.g. from {remote.mirrors[0]}{remote.filename}) and place it at {dest}"
    )


def _inside(root: Path, member: str) -> bool:
    target = (root / member).resolve()
    return target == root.resolve() or root.resolve() in target.parents


def extract(archive: Path, root: Path) -> None:
    """Unpack a ``.tar.gz`` or ``.zip`` into ``root``, refusing members that point outside it."""
    try:
        if archive.name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zipped:
                names = zipped.namelist()
                bad = [n for n in names if not _inside(root, n)]
                if not bad:
                    zipped.extractall(root)
        else:
            with tarfile.open(archive, "r:*") as tarred:
                names = tarred.getnames()
                bad = [n for n in names if not _inside(root, n)]
                safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                if not bad:
                    tarred.extractall(root, **safe)
    except (OSError, EOFError, tarfile.TarError, zipfile.BadZipFile) as err:
        raise DatasetError(
            f"cannot extract {archive} ({err}); delete it and run the download again"
        ) from err
    if bad:
        raise DatasetError(
            f"{archive} has members outside the target folder ({bad[0]}); not extracted"
        )


def download_dataset(name: str, data_dir: Path) -> Path:
    """Fetch (and unpack) dataset ``name`` under ``data_dir``; return the folder to read from."""
    source = SOURCES[name]
    folder = data_dir / source.subdir
    result = data_dir / source.result
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    try:
        for remote in source.remotes:
            path = fetch(remote, folder)
            if path.name.endswith((".tar.gz", ".zip")) and not result.is_dir():
                extract(path, folder)
    except DatasetError:
        for empty in created:  # a failed download leaves no empty folders behind
            with contextlib.suppress(OSError):
                empty.rmdir()
        raise
    return result
