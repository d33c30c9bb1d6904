"""Fetching a dataset's standard files for online users (see :func:`acert.data.download`).

Files come from their usual public addresses with ``urllib``; each is checked against its
published MD5 and only then moved into place (temp file + ``os.replace``), so an interrupted
download never leaves a half-written file where the readers would find it. Which files a
dataset has, and their addresses, are in its record (:mod:`acert.data.registry`).
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

from acert.foundation.errors import DatasetError

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


def create_folder(folder: Path) -> None:
    """``folder`` and its parents, or a one-line DatasetError saying to choose another
    --data-dir (a file in the way, no permission)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DatasetError(
            f"cannot create folder {folder} ({err.strerror or type(err).__name__}); "
            "choose another --data-dir"
        ) from err


def fetch(remote: Remote, folder: Path) -> Path:
    """Download ``remote`` into ``folder`` unless a file with the right MD5 is already there.

    Mirrors are tried in order. Raises DatasetError naming the URLs when all fail, or when the
    downloaded file has the wrong MD5.
    """
    dest = folder / remote.filename
    if dest.is_file() and (remote.md5 is None or md5_of(dest) == remote.md5):
        return dest
    create_folder(folder)
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


def download_dataset(source: Source, data_dir: Path) -> Path:
    """Fetch (and unpack) ``source``'s files under ``data_dir``; return the folder to read from."""
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
