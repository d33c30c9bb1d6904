"""What a run carries from epoch to epoch and across a resume (used by
:mod:`acert.workflows.train.run`).

``TrainState`` is the loop's position and history; :func:`checkpoint_payload` is everything a
``checkpoints/last.pt`` holds, and :func:`start_or_resume` starts a run folder or restores the
run it holds, refusing a resume under a different config.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from acert.config import TrainConfig, changed_keys
from acert.foundation.errors import CheckpointError
from acert.methods import TrainingMethod
from acert.records.runs import RunDir

__all__ = ["RESUME_KEYS", "TrainState", "checkpoint_payload", "start_or_resume"]

RESUME_KEYS = (
    "model",
    "optimizer",
    "scheduler",
    "method",
    "epoch",
    "step",
    "history",
    "best_score",
    "best_epoch",
    "rng",
)
"""What a resume restores from ``checkpoints/last.pt``."""


@dataclass
class TrainState:
    """What a checkpoint restores: the epochs done, the step, the history, the best epoch and
    the wall time spent on the completed epochs (over every session of the run)."""

    epoch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_score: float = -math.inf
    best_epoch: int = -1
    seconds: float = 0.0


def checkpoint_payload(
    config: TrainConfig,
    model: nn.Module,
    method: TrainingMethod,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainState,
) -> dict[str, Any]:
    """The contents of a checkpoint after ``state.epoch`` epochs."""
    return {
        "config": config.to_dict(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "method": method.state_dict(),
        "epoch": state.epoch,
        "step": state.step,
        "history": state.history,
        "best_score": state.best_score,
        "best_epoch": state.best_epoch,
        "seconds": state.seconds,
        "rng": torch.get_rng_state(),
    }


def start_or_resume(
    run_dir: RunDir,
    config: TrainConfig,
    resume: bool,
    model: nn.Module,
    method: TrainingMethod,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    write: bool = True,
    note: Callable[[str], None] = print,
) -> TrainState:
    """A fresh state (saving the config when ``write``) or the state of ``run_dir``'s last.pt.

    Resuming loads the model, optimiser, scheduler, method state and RNG from the checkpoint;
    every process of a multi-process run reads it. A run killed in its first epoch has its
    config.yaml but no checkpoint yet: resuming it (the same command re-issued, as a requeued
    cluster job does) starts it from the beginning, with a ``note``, if the config is the same.
    """
    has_last = run_dir.has_checkpoint("last")
    if not resume:
        if has_last:
            raise CheckpointError(
                f"{run_dir.path} already holds a run; "
                "pass --resume to continue it or choose another --out"
            )
        if write:
            run_dir.save_config(config)
        return TrainState()
    if not has_last and not run_dir.config_path.is_file():
        raise CheckpointError(
            f"nothing to resume in {run_dir.path} (no config.yaml, no checkpoints/last.pt); "
            "drop --resume"
        )
    changed = changed_keys(run_dir.load_config(), config)
    if changed:
        raise CheckpointError(
            f"--resume with a different config ({', '.join(changed)}); "
            "resume with the run's own settings (drop those flags)"
        )
    if not has_last:
        if write:
            note(
                f"note: {run_dir.path} holds no checkpoint yet (the run stopped in its first "
                "epoch); starting it from the beginning"
            )
            run_dir.remove_temporaries()
        return TrainState()
    payload = run_dir.load_checkpoint("last")
    if write:
        run_dir.remove_temporaries()  # a kill mid-write leaves its temporary file behind
    missing = [key for key in RESUME_KEYS if key not in payload]
    if missing:
        raise CheckpointError(
            f"{run_dir.checkpoint_path('last')} lacks {', '.join(missing)}, so the run cannot "
            "continue from it; train anew into another --out"
        )
    try:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        method.load_state_dict(payload["method"])
        torch.set_rng_state(payload["rng"])
    except (KeyError, RuntimeError, ValueError, TypeError) as err:
        raise CheckpointError(
            f"{run_dir.checkpoint_path('last')} does not fit the run's config "
            f"({type(err).__name__}); it was written by another version or edited"
        ) from err
    return TrainState(
        payload["epoch"],
        payload["step"],
        payload["history"],
        payload["best_score"],
        payload["best_epoch"],
        payload.get("seconds", 0.0),
    )
