"""Run folders: resolved config, atomic checkpoints, per-epoch metrics, final metrics; ``load``.

A run folder holds::

    config.yaml          the resolved configuration
    checkpoints/last.pt  model, optimiser, scheduler, method state, history, RNG (each epoch)
    checkpoints/best.pt  the model with the best validation acceps
    metrics.csv          one row per epoch
    test_metrics.json    final evaluation of the best model on the test split
    radii.pt             its per-sample certified radii
    radius_histogram.png

Every file is written to a temporary name in the same folder (``.NAME.XXXX.tmp``) and renamed
into place, so a run killed at any moment leaves either the old or the new file, never half of
one. A SIGKILL during a write cannot clean up after itself, so its temporary file stays until the
run is resumed, which removes it (:meth:`RunDir.remove_temporaries`).
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from acert.config import GIVEN_MODEL, TrainConfig, check_resolved, config_from_dict
from acert.data import dataset_info
from acert.foundation.errors import AcertError, CheckpointError
from acert.models import create_model

__all__ = [
    "CHECKPOINT_FORMAT",
    "RunDir",
    "atomic_write",
    "build_model",
    "check_writable_file",
    "load",
    "make_folder",
    "model_from_checkpoint",
    "read_checkpoint",
    "run_checkpoint",
]

CHECKPOINT_FORMAT = "acert-checkpoint-v1"


def _process_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _process_umask()


def _reason(err: OSError) -> str:
    return err.strerror or type(err).__name__


def make_folder(path: str | Path, flag: str) -> Path:
    """Create the folder ``path`` (and its parents), or an AcertError that names the flag to
    change: a file in the way, no permission, a read-only file system."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise AcertError(
            f"cannot create folder {path} ({_reason(err)}); choose another {flag}"
        ) from err
    if not os.access(path, os.W_OK | os.X_OK):
        raise AcertError(f"folder {path} is not writable; choose another {flag}")
    return path


def check_writable_file(path: str | Path, flag: str) -> None:
    """Before any work is done: an AcertError when the file ``path`` could not be written."""
    path = Path(path)
    if path.is_dir():
        raise AcertError(f"{path} is a folder; {flag} takes a file name")
    make_folder(path.parent, flag)
    try:
        tempfile.TemporaryFile(dir=path.parent).close()
    except OSError as err:
        raise AcertError(
            f"cannot write into {path.parent} ({_reason(err)}); choose another {flag}"
        ) from err


_TEMPORARY_SUFFIX = ".tmp"


def atomic_write(path: str | Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write a file via ``write(handle)`` to a temporary name, fsync, then rename it into place."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=_TEMPORARY_SUFFIX
        )
    except OSError as err:
        raise AcertError(
            f"cannot write {path} ({_reason(err)}); choose a writable location"
        ) from err
    try:
        os.fchmod(handle, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide the file from others
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda stream: stream.write(text.encode()))


def build_model(config: TrainConfig) -> nn.Module:
    """The (untrained) model a resolved config describes."""
    info = dataset_info(config.dataset)
    return create_model(
        config.model, info.shape, info.num_classes, info.mean, info.std, init=config.init
    )


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The payload of an acert checkpoint, or a CheckpointError saying what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a run folder or a .pt file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for foreign or truncated files
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a torch file ({_load_failure(err)}); "
            "pass a checkpoint written by `acert train`"
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not an acert checkpoint (no '{CHECKPOINT_FORMAT}' marker); "
            "pass a checkpoint written by `acert train`"
        )
    return payload


def _load_failure(err: Exception) -> str:
    """What went wrong in ``torch.load``, in a few words: the first sentence of its message,
    unless that is the preamble torch puts before any unpickling failure."""
    first = (str(err).strip().splitlines() or [""])[0].split(". ")[0].rstrip(".")
    if isinstance(err, KeyError | EOFError) or first.startswith("Weights only load failed"):
        return "its contents cannot be unpickled"  # torch's message says nothing more
    return first[:120] or type(err).__name__


class RunDir:
    """The files of one training run."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    config_path = property(lambda self: self.path / "config.yaml")
    metrics_path = property(lambda self: self.path / "metrics.csv")
    test_metrics_path = property(lambda self: self.path / "test_metrics.json")
    radii_path = property(lambda self: self.path / "radii.pt")
    histogram_path = property(lambda self: self.path / "radius_histogram.png")
    architecture_path = property(lambda self: self.path / "model.pt")
    """A network given from Python (``acert.fit``): the module itself, pickled."""

    def save_architecture(self, model: nn.Module) -> None:
        """Keep a network given from Python (no registry builds it) beside the checkpoints."""
        atomic_write(self.architecture_path, lambda f: torch.save(model, f))

    def checkpoint_path(self, name: str) -> Path:
        return self.path / "checkpoints" / f"{name}.pt"

    def create(self) -> RunDir:
        make_folder(self.path, "--out")
        return self

    def save_config(self, config: TrainConfig) -> None:
        _write_text(self.config_path, yaml.safe_dump(config.to_dict(), sort_keys=False))

    def load_config(self) -> TrainConfig:
        if not self.config_path.is_file():
            raise CheckpointError(
                f"{self.path} is not a run folder (no config.yaml); pass a run folder"
            )
        try:
            values = yaml.safe_load(self.config_path.read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise CheckpointError(
                f"{self.config_path} is not readable YAML ({type(err).__name__}); "
                "restore it from the run's checkpoints/last.pt or train anew"
            ) from err
        if not isinstance(values, dict):
            raise CheckpointError(f"{self.config_path} does not hold a mapping of config keys")
        return check_resolved(config_from_dict(values), str(self.config_path))

    def remove_temporaries(self) -> list[Path]:
        """Delete the temporary files that writes killed midway (SIGKILL, power loss) left in
        the run folder; only safe while no other process writes into it. Returns them."""
        folders = [self.path, self.checkpoint_path("last").parent]
        stale = [
            temporary
            for folder in folders
            if folder.is_dir()
            for temporary in folder.glob(f".*{_TEMPORARY_SUFFIX}")
            if temporary.is_file()
        ]
        for temporary in stale:
            temporary.unlink(missing_ok=True)
        return stale

    def save_checkpoint(self, name: str, payload: dict[str, Any]) -> None:
        payload = {"format": CHECKPOINT_FORMAT, **payload}
        atomic_write(self.checkpoint_path(name), lambda stream: torch.save(payload, stream))

    def has_checkpoint(self, name: str) -> bool:
        return self.checkpoint_path(name).is_file()

    def load_checkpoint(self, name: str) -> dict[str, Any]:
        return read_checkpoint(self.checkpoint_path(name))

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Rewrite metrics.csv from the full history (so it always matches the checkpoint)."""
        if not rows:
            return
        columns = list(dict.fromkeys(key for row in rows for key in row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        _write_text(self.metrics_path, buffer.getvalue())

    def write_test_metrics(self, metrics: dict[str, Any]) -> None:
        _write_text(self.test_metrics_path, json.dumps(metrics, indent=2) + "\n")

    def save_radii(self, radii: torch.Tensor) -> None:
        atomic_write(self.radii_path, lambda stream: torch.save(radii.cpu(), stream))


def run_checkpoint(path: str | Path, which: str = "best") -> dict[str, Any]:
    """The checkpoint of a run folder (``best``, falling back to ``last``; or ``last``) or a
    checkpoint file itself: the one :func:`load` takes the model from."""
    if not isinstance(path, str | os.PathLike):
        raise CheckpointError(
            f"a run is named by its path (str or pathlib.Path), got {type(path).__name__} "
            f"{path!r:.40}; pass a run folder or a .pt checkpoint written by `acert train`"
        )
    if which not in ("best", "last"):
        raise CheckpointError(f"unknown checkpoint {which!r}; choose best or last")
    path = Path(path)
    if not path.is_dir():
        return read_checkpoint(path)
    run = RunDir(path)
    return run.load_checkpoint(which if run.has_checkpoint(which) else "last")


def _given_architecture(path: str | Path) -> nn.Module:
    """The network a run of ``acert.fit`` keeps in its folder (``path``: the folder or one of
    its checkpoints). It is a pickle, so load only runs you trust, as with any torch module."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent.parent
    file = RunDir(folder).architecture_path
    if not file.is_file():
        raise CheckpointError(
            f"{path} was trained on a network given from Python, kept in {file}, which is "
            "missing; load the checkpoint into your own network with load_state_dict"
        )
    return torch.load(file, map_location="cpu", weights_only=False)


def model_from_checkpoint(payload: dict[str, Any], path: str | Path) -> nn.Module:
    """The model of a checkpoint's payload, in eval mode (``path`` names it in errors)."""
    try:
        config = config_from_dict(payload["config"])
        given = config.model == GIVEN_MODEL
        model = _given_architecture(path) if given else build_model(config)
        model.load_state_dict(payload["model"])
    except (KeyError, RuntimeError) as err:
        raise CheckpointError(
            f"checkpoint {path} does not match its own config ({type(err).__name__}); "
            "it was written by another version or edited"
        ) from err
    return model.eval()


def load(path: str | Path, which: str = "best") -> nn.Module:
    """The trained model of a run folder (``best``/``last``) or of a checkpoint file, in eval mode.

    Args:
        path: a run folder or a ``.pt`` checkpoint written by ``acert train``.
        which: in a run folder, ``"best"`` (falls back to ``"last"``) or ``"last"``.
    """
    return model_from_checkpoint(run_checkpoint(path, which), path)
