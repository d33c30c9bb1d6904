"""The one training loop: epochs of optimisation steps of a method's loss (``fit``).

:mod:`acert.workflows.train.run` builds what it needs from a config (or takes it from
``acert.fit``) and owns the run folder; this module only trains. Under ``torchrun`` each process
takes its share of every global batch (:mod:`acert.foundation.process_group`) and the gradients are
averaged (:mod:`acert.workflows.train.ddp`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from acert.bounds import bounds_form
from acert.data import BatchLoader
from acert.foundation.errors import AcertError
from acert.foundation.layout import in_layout
from acert.foundation.process_group import World, mean_metrics, seed_process, shard
from acert.foundation.schedules import EpsSchedule
from acert.methods import Batch, Step, TrainingMethod
from acert.workflows.train.ddp import distributed_loss
from acert.workflows.train.state import TrainState

__all__ = ["EpochCallback", "LoopSettings", "TrainingDivergedError", "TrainingParts", "fit"]

EpochCallback = Callable[["TrainState", dict[str, Any]], None]
"""Called after each epoch with the state and the epoch's row of the history (validation,
checkpoints, logs: :mod:`acert.workflows.train.callbacks`)."""


@dataclass
class TrainingParts:
    """What the loop trains, and with what.

    Attributes:
        model: the network (put in train mode); its parameters are trained, its bounds form
            (:func:`acert.bounds.bounds_form`, traced before the loop) is what the loss sees.
        method: its ``loss(form, batch, step)`` gives the objective.
        loader: training batches ``(x, y, idx)``; the global batches when several processes
            train, each process taking its share (:func:`acert.foundation.process_group.shard`).
        schedule: training ε of each step.
        optimizer, scheduler: stepped once per batch.
    """

    model: nn.Module
    method: TrainingMethod
    loader: BatchLoader
    schedule: EpsSchedule
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


@dataclass(frozen=True)
class LoopSettings:
    """How the loop trains.

    Attributes:
        epochs: total epochs of the run.
        grad_clip: maximum gradient norm (10).
        l1: weight of the L1 penalty on weights (TinyImageNet 1e-4).
        progress: show a progress bar per epoch.
        layout: memory layout of the batches (:mod:`acert.foundation.layout`).
    """

    epochs: int
    grad_clip: float = 10.0
    l1: float = 0.0
    progress: bool = True
    layout: str = "contiguous"


class TrainingDivergedError(AcertError):
    """The loss became NaN or infinite."""


def _l1_penalty(model: nn.Module) -> torch.Tensor:
    return sum(
        m.weight.abs().sum() for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)
    )


def fit(
    parts: TrainingParts,
    settings: LoopSettings,
    state: TrainState,
    callbacks: Sequence[EpochCallback] = (),
    world: World | None = None,
) -> TrainState:
    """Train from ``state.epoch`` (a fresh or a restored state) to ``settings.epochs``; call
    each of ``callbacks`` in turn with ``(state, row)`` after each epoch. ``world``: the
    processes training together (default: this one alone)."""
    world = world or World()
    model, loader, schedule = parts.model, parts.loader, parts.schedule
    optimizer, epochs = parts.optimizer, settings.epochs
    form = bounds_form(model)  # the graph the losses bound (traced when the run began)
    compute_loss = distributed_loss(form, parts.method, world)
    for epoch in range(state.epoch, epochs):
        model.train()
        form.train()  # a graph's own flag, which an attack's eval_mode restores
        loader.set_epoch(epoch)
        seed_process(loader.seed, epoch, world)
        started = time.perf_counter()
        totals: dict[str, tuple[float, float]] = {}
        last_lr = optimizer.param_groups[0]["lr"]
        bar = tqdm(
            loader, desc=f"epoch {epoch + 1}/{epochs}", disable=not settings.progress, leave=False
        )
        for x, y, idx in bar:
            rows, weight = shard(x.shape[0], world)
            step = Step(
                state.step,
                epoch,
                schedule(state.step),
                schedule.eps_max,
                schedule.in_warmup(state.step),
            )
            batch = Batch(in_layout(x[rows], settings.layout), y[rows], idx[rows])
            last_lr = optimizer.param_groups[0]["lr"]
            values = _train_step(compute_loss, parts, settings, batch, step, weight)
            state.step += 1
            size = batch.x.shape[0]
            for key, value in values.items():
                total, count = totals.get(key, (0.0, 0.0))
                totals[key] = (total + value * size, count + size)
            bar.set_postfix(
                loss=f"{values['loss']:.3f}",
                acc=f"{values['train_acc']:.3f}",
                eps=f"{step.eps:.3g}",
            )
        # the rate of the epoch's last update (after the final update the scheduler's next
        # rate lies past the end of its cycle)
        row = {"epoch": epoch + 1, "step": state.step, "lr": last_lr}
        row.update(mean_metrics(totals))
        row["epoch_seconds"] = time.perf_counter() - started
        state.epoch = epoch + 1
        state.history.append(row)
        for callback in callbacks:
            callback(state, row)
    return state


def _train_step(
    compute_loss: Callable[[Batch, Step], Any],
    parts: TrainingParts,
    settings: LoopSettings,
    batch: Batch,
    step: Step,
    weight: float,
) -> dict[str, float]:
    """One optimisation step; the batch's loss, accuracy, ε and the method's metrics."""
    model, optimizer, l1 = parts.model, parts.optimizer, settings.l1
    terms = compute_loss(batch, step)
    loss = terms.loss + l1 * _l1_penalty(model) if l1 > 0 else terms.loss
    if not torch.isfinite(loss):
        raise TrainingDivergedError(
            f"the loss became {loss.item()} at epoch {step.epoch + 1}, step {step.index}"
        )
    optimizer.zero_grad(set_to_none=True)
    (loss if weight == 1 else loss * weight).backward()
    nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
    optimizer.step()
    parts.scheduler.step()
    accuracy = (terms.logits.argmax(1) == batch.y).float().mean().item()
    return {"loss": loss.item(), "train_acc": accuracy, "eps": step.eps, **terms.metrics}
