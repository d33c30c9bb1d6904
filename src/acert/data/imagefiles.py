"""Image files (JPEG, PNG) decoded with Pillow into uint8 arrays, and the cache that keeps the
decoded arrays so that a folder of tens of thousands of images is decoded once.

A cache is one uncompressed ``.npz`` holding the arrays and a key (a string array) naming what
they were built from; it is reused only while the key is equal, written atomically (temp file +
``os.replace``), and a cache that cannot be written costs a warning, not the run.
"""

from __future__ import annotations

import os
import tempfile
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from acert.foundation.errors import DatasetError

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
SIXTEEN_BIT_GREY = ("I;16", "I;16B", "I;16L", "I;16N")
"""16-bit grey pixels, which Pillow's conversion to 8 bits clips at 255 instead of scaling."""
UNRANGED = ("I", "F")
"""32-bit integer and float pixels: no range to map onto [0, 255] is known."""
GREY_MODES = ("1", "L", "LA", *SIXTEEN_BIT_GREY, *UNRANGED)


def decode_image(path: Path, channels: int, fix: str) -> np.ndarray:
    """One image file as uint8 (channels, H, W): ``channels`` 3 converts to RGB, 1 to grey,
    refusing a colour image where grey is expected; 16-bit grey is scaled (round(v / 257)),
    32-bit and float pixels are refused. ``fix`` ends the error message."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            problem = _refused(image.mode, channels)
            pixels = None if problem else _eight_bit(image, channels)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise DatasetError(f"cannot decode image {path} ({err}); {fix}") from err
    if pixels is None:  # raised here: inside the try it would be taken for a decoding error
        raise DatasetError(f"image {path} {problem}; {fix}")
    return pixels.transpose(2, 0, 1) if pixels.ndim == 3 else pixels[None]


def _refused(mode: str, channels: int) -> str:
    """Why an image of this mode cannot join a dataset of ``channels``, or ''."""
    if mode in UNRANGED:
        return f"has {mode} pixels (32-bit integer or float), whose range is unknown"
    if channels == 1 and mode not in GREY_MODES:
        return f"is in colour ({mode}) but the first training image is grey"
    return ""


def _eight_bit(image: Any, channels: int) -> np.ndarray:
    """(H, W) or (H, W, 3) uint8 pixels of an open Pillow image."""
    if image.mode not in SIXTEEN_BIT_GREY:
        return np.asarray(image.convert("RGB" if channels == 3 else "L"))
    wide = np.asarray(image).astype(np.uint32)
    grey = ((wide + 128) // 257).astype(np.uint8)
    return grey if channels == 1 else np.repeat(grey[..., None], 3, axis=2)


def image_channels(path: Path, fix: str) -> int:
    """1 for a grey image file, 3 for a colour one (read from the header only)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return 1 if image.mode in GREY_MODES else 3
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise DatasetError(f"cannot decode image {path} ({err}); {fix}") from err


def decode_all(files: list[Path], shape: tuple[int, int, int], fix: str) -> np.ndarray:
    """All ``files`` as one uint8 array (N, C, H, W) of ``shape``, decoded on a few threads
    (Pillow releases the GIL); an image of another size is a DatasetError naming it."""
    images = np.empty((len(files), *shape), dtype=np.uint8)

    def fill(i: int) -> None:
        pixels = decode_image(files[i], shape[0], fix)
        if pixels.shape != shape:
            raise DatasetError(
                f"image {files[i]} is {pixels.shape[2]}x{pixels.shape[1]}, expected "
                f"{shape[2]}x{shape[1]} like the others; {fix}"
            )
        images[i] = pixels

    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(fill, range(len(files))))
    return images


def load_cache(
    cache: Path, key: np.ndarray, names: tuple[str, ...] | None = None
) -> dict[str, np.ndarray] | None:
    """The cached arrays (those of ``names``, else all), or None when absent, unreadable or
    built from other files (its ``key`` differs). Arrays not named are not read."""
    if not cache.is_file():
        return None
    try:
        with np.load(cache, allow_pickle=False) as stored:
            if stored["key"].shape != key.shape or not np.array_equal(stored["key"], key):
                return None
            wanted = [n for n in stored.files if n != "key"] if names is None else names
            return {name: stored[name] for name in wanted}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def save_cache(cache: Path, key: np.ndarray, **arrays: np.ndarray) -> None:
    """Write the cache atomically (temp file + os.replace); warn and go on if it cannot."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=f".{cache.name}.", suffix=".tmp")
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the cache from other users
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, key=key, **arrays)
        os.replace(tmp, cache)
    except OSError as err:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        warnings.warn(f"could not write the decoded-image cache {cache} ({err})", stacklevel=3)
