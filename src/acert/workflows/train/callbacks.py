"""What a training run does after each epoch, one small callable each (an
:data:`~acert.workflows.train.loop.EpochCallback`), in this order:
validation, model selection, the clock, checkpoints, the event files, the printed line and the
barrier between the processes (:func:`epoch_callbacks`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from acert.evaluation.evaluate import Evaluation, EvaluationSettings
from acert.evaluation.sharded import evaluate_sharded
from acert.foundation.process_group import World, barrier
from acert.records.runs import RunDir
from acert.workflows.train.state import TrainState

__all__ = [
    "BestEpoch",
    "Checkpoints",
    "EpochClock",
    "EpochLine",
    "EventFiles",
    "Validation",
    "format_row",
    "wait_for_every_process",
]

Row = dict[str, Any]


@dataclass
class Validation:
    """IBP radii and clean accuracy on the validation images, into the row."""

    model: nn.Module
    x: Tensor
    y: Tensor
    world: World
    device: torch.device
    settings: EvaluationSettings
    last: Evaluation | None = None

    def __call__(self, state: TrainState, row: Row) -> None:
        self.last = evaluate_sharded(
            self.model, self.x, self.y, self.settings, self.world, device=self.device
        )
        self.model.train()
        row.update(val_acc=self.last.clean_accuracy, val_acr=self.last.acr)
        row.update(val_acceps=self.last.acceps)


@dataclass
class BestEpoch:
    """Model selection: the epoch of the best validation acceps once the warm-up is over (or
    the last epoch); ``state.best_epoch == state.epoch`` after an epoch that improved."""

    first_eligible: float
    epochs: int

    def __call__(self, state: TrainState, row: Row) -> None:
        eligible = state.epoch >= self.first_eligible or state.epoch == self.epochs
        score = row.get("val_acceps", -math.inf)
        if eligible and score > state.best_score:
            state.best_score, state.best_epoch = score, state.epoch


@dataclass
class EpochClock:
    """The run's wall time over its epochs (over every session of a resumed run)."""

    last: float = field(default_factory=time.perf_counter)

    def __call__(self, state: TrainState, row: Row) -> None:
        now = time.perf_counter()
        state.seconds, self.last = state.seconds + now - self.last, now


@dataclass
class Checkpoints:
    """``last`` after every epoch, ``best`` after an epoch that improved, and metrics.csv."""

    run_dir: RunDir
    payload: Callable[[TrainState], dict[str, Any]]

    def __call__(self, state: TrainState, row: Row) -> None:
        payload = self.payload(state)
        self.run_dir.save_checkpoint("last", payload)
        if state.best_epoch == state.epoch:
            self.run_dir.save_checkpoint("best", payload)
        self.run_dir.write_metrics(state.history)


@dataclass
class EventFiles:
    """The epoch's scalars and validation radii for ``--logger tensorboard``."""

    board: Any
    validation: Validation | None

    def __call__(self, state: TrainState, row: Row) -> None:
        last = None if self.validation is None else self.validation.last
        self.board.epoch(row, None if last is None else last.radii)


@dataclass
class EpochLine:
    """One printed line per epoch, with the time left."""

    log: Callable[[str], None]
    epochs: int
    first_epoch: int
    started: float = field(default_factory=time.perf_counter)

    def __call__(self, state: TrainState, row: Row) -> None:
        per_epoch = (time.perf_counter() - self.started) / (state.epoch - self.first_epoch)
        self.log(format_row(row, self.epochs, per_epoch))


def wait_for_every_process(state: TrainState, row: Row) -> None:
    """The checkpoints are on disk before any process reads them."""
    barrier()


def format_row(row: Row, epochs: int, seconds_per_epoch: float) -> str:
    """The printed line of an epoch's row."""
    done = row["epoch"]
    eta = seconds_per_epoch * (epochs - done)
    parts = [
        f"epoch {done}/{epochs}",
        f"loss {row.get('loss', float('nan')):.4f}",
        f"acc {100 * row.get('train_acc', 0):.1f}%",
        f"eps {row.get('eps', 0):.4g}",
    ]
    if "radius" in row:
        parts.append(f"radius {row['radius']:.4g}")
    if "val_acc" in row:
        parts.append(f"val acc {100 * row['val_acc']:.1f}% ACR {row['val_acr']:.4g}")
    parts.append(f"{row['epoch_seconds']:.1f}s, {eta / 60:.1f} min left")
    return "  ".join(parts)
