"""Where a run's epochs are logged: ``metrics.csv`` always, TensorBoard event files on request.

``--logger tensorboard`` (config key ``logger``) writes, beside ``metrics.csv``, event files
under ``RUN/tensorboard/`` through PyTorch's own writer (``torch.utils.tensorboard``, which needs
the ``tensorboard`` package: ``pip install "acert[tensorboard]"``). One point per epoch, the
epoch number as the step:

- ``loss/train`` and each term of the method (``loss/loss_rob``, ``loss/loss_nat``, ...);
- ``accuracy/train_clean``, ``accuracy/train_certified`` (at the training ε, from the loss's
  own bound), ``accuracy/val_clean`` and ``accuracy/val_certified_<ε>`` at each ``cert_eps``
  (the share of validation samples whose certified radius reaches ε);
- ``eps/train``, the mean training ε of the epoch;
- ``radius/train_mean`` (the training radii, e.g. ACERT's adaptive ones), ``radius/val_acr``,
  ``radius/val_median``, ``radius/val_at_cap`` and ``radius/val_zero`` (shares of the
  validation samples certified at ε_max and not at all), and the histogram ``radius/val`` of
  the validation samples' certified radii;
- ``score/val_acceps``, ``lr``, ``time/epoch_seconds`` and any other number of the epoch's row
  under ``metrics/<name>``.

``tensorboard --logdir RUN`` (or ``--logdir STUDY`` for a sweep) shows them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor

from acert.config import LOGGERS, TrainConfig, check_key
from acert.foundation.errors import ConfigError

__all__ = ["LOGGERS", "EpochLogger", "TensorBoardLogger", "check_logger", "open_logger"]

TENSORBOARD_FOLDER = "tensorboard"

_NAMES = {
    "loss": "loss/train",
    "train_acc": "accuracy/train_clean",
    "certified": "accuracy/train_certified",
    "val_acc": "accuracy/val_clean",
    "eps": "eps/train",
    "radius": "radius/train_mean",
    "val_acr": "radius/val_acr",
    "val_acceps": "score/val_acceps",
    "lr": "lr",
    "epoch_seconds": "time/epoch_seconds",
}
_SKIPPED = ("epoch", "step")


class EpochLogger(Protocol):
    """What the training loop calls after each epoch's checkpoint, and once at the end."""

    def epoch(self, row: dict[str, Any], val_radii: Tensor | None) -> None: ...

    def close(self) -> None: ...


def check_logger(name: str) -> None:
    """A ConfigError naming the fix when logger ``name`` is unknown or its package missing."""
    check_key("logger", name)
    if name == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "--logger tensorboard needs the tensorboard package; install it with "
            "pip install 'acert[tensorboard]' (or pip install tensorboard), or use --logger csv"
        )


def open_logger(config: TrainConfig, folder: str | Path | None) -> EpochLogger | None:
    """The extra logger ``config.logger`` asks for in run folder ``folder`` (None for csv,
    whose metrics.csv the run folder writes itself, or for a run kept nowhere)."""
    check_logger(config.logger)
    if config.logger == "csv" or folder is None:
        return None
    return TensorBoardLogger(Path(folder) / TENSORBOARD_FOLDER, config.eps_max, config.cert_eps)


class TensorBoardLogger:
    """Scalars and the radius histogram of each epoch as TensorBoard event files."""

    def __init__(self, folder: str | Path, eps_max: float, cert_eps: list[float]) -> None:
        check_logger("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))
        self.eps_max = eps_max
        self.cert_eps = list(cert_eps)

    def scalars(self, row: dict[str, Any], val_radii: Tensor | None) -> dict[str, float]:
        """The tags and values one epoch logs (its histogram aside)."""
        values: dict[str, float] = {}
        for key, value in row.items():
            if key in _SKIPPED or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if key in _NAMES:
                values[_NAMES[key]] = float(value)
            elif key.startswith("loss_"):
                values[f"loss/{key}"] = float(value)
            else:
                values[f"metrics/{key}"] = float(value)
        if val_radii is not None and val_radii.numel():
            radii = val_radii.detach().double().cpu()
            for eps in self.cert_eps:
                share = (radii >= eps).double().mean().item()
                values[f"accuracy/val_certified_{eps:g}"] = share
            values["radius/val_median"] = radii.median().item()
            values["radius/val_at_cap"] = (radii >= self.eps_max).double().mean().item()
            values["radius/val_zero"] = (radii <= 0).double().mean().item()
        return values

    def epoch(self, row: dict[str, Any], val_radii: Tensor | None) -> None:
        step = int(row["epoch"])
        for tag, value in self.scalars(row, val_radii).items():
            self.writer.add_scalar(tag, value, step)
        if val_radii is not None and val_radii.numel():
            self.writer.add_histogram("radius/val", val_radii.detach().float().cpu(), step)
        self.writer.flush()  # on disk with the epoch's checkpoint and metrics.csv

    def close(self) -> None:
        self.writer.close()
