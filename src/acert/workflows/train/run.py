"""A training run: train from a config, keep checkpoints, evaluate the best model.

The loop itself is :func:`acert.workflows.train.loop.fit` (re-exported here); ``run`` builds what it
needs from a :class:`~acert.config.TrainConfig` (or takes it as :class:`RunInputs`, from
``acert.fit``), owns the run folder, resumes an
interrupted run from its last completed epoch, selects the best epoch by validation acceps
(docs/METHOD.md, "Certified radius and ACR") and writes the final test metrics.

Started by ``torchrun``, a run trains on several processes (:mod:`acert.foundation.process_group`):
each takes its share of every global batch, rank 0 alone writes the run folder, logs and progress.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from acert.bounds import bounds_form
from acert.config import TrainConfig, available_device, resolve
from acert.data import (
    BatchLoader,
    ImageSet,
    dataset_info,
    load_imageset,
    split_train_val,
    stratified_subset,
)
from acert.evaluation.evaluate import Evaluation, EvaluationSettings
from acert.evaluation.sharded import evaluate_sharded
from acert.foundation.errors import ConfigError
from acert.foundation.layout import model_in_layout
from acert.foundation.process_group import (
    World,
    broadcast_object,
    check_last_batch,
    launched_world,
    local_batch_size,
    process_device,
    process_group,
)
from acert.foundation.schedules import EpsSchedule
from acert.methods import TrainingMethod, create_method
from acert.records.loggers import check_logger, open_logger
from acert.records.runs import RunDir, build_model
from acert.workflows.train.callbacks import (
    BestEpoch,
    Checkpoints,
    EpochClock,
    EpochLine,
    EventFiles,
    Validation,
    wait_for_every_process,
)
from acert.workflows.train.loop import (
    EpochCallback,
    LoopSettings,
    TrainingDivergedError,
    TrainingParts,
    fit,
)
from acert.workflows.train.state import TrainState, checkpoint_payload, start_or_resume

__all__ = [
    "RunInputs",
    "TrainResult",
    "TrainingDivergedError",
    "fit",
    "run",
    "run_inputs",
    "training_sets",
]


@dataclass
class RunInputs:
    """What a run trains, selects on and tests: built from a config (:func:`run_inputs`) or
    given from Python (``acert.fit``).

    Attributes:
        model: the network to train.
        method: the training method (one object with one loss).
        train, val: the training set and the validation set of model selection (may be empty).
        test: the set of the final evaluation, read when training ends (None: no evaluation).
    """

    model: nn.Module
    method: TrainingMethod
    train: ImageSet
    val: ImageSet
    test: Callable[[], ImageSet | None]


def run_inputs(config: TrainConfig) -> RunInputs:
    """The model, method and data sets a resolved config names (seed the run first)."""
    model, method = build_model(config), create_method(config)
    train_set, val_set = training_sets(config)
    return RunInputs(model, method, train_set, val_set, lambda: _test_set(config))


@dataclass
class TrainResult:
    """A finished run: the best model (eval mode), its history and its test evaluation."""

    model: nn.Module
    history: list[dict[str, Any]]
    best_epoch: int
    test: Evaluation | None
    run_dir: Path | None
    config: TrainConfig


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)


def training_sets(config: TrainConfig) -> tuple[ImageSet, ImageSet]:
    """The training and validation sets a run of ``config`` trains and selects on (its
    ``train_limit`` subset, its seeded split); ``Batch.idx`` and radius memories index the
    training set's rows."""
    train = load_imageset(config.dataset, "train", config.data_dir)
    if config.train_limit is not None:
        if config.train_limit > len(train):
            raise ConfigError(
                f"train_limit {config.train_limit} exceeds the {len(train)} training images of "
                f"{config.dataset}; lower it or drop it"
            )
        train = stratified_subset(train, config.train_limit, seed=config.seed)
    if config.val_size > len(train) // 2:
        raise ConfigError(
            f"val_size {config.val_size} would leave fewer training than validation images "
            f"({len(train)} in all); use a val_size of at most {len(train) // 2}"
        )
    return split_train_val(train, config.val_size, seed=config.seed)


def _optimizer(model: nn.Module, config: TrainConfig, total_steps: int):
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=config.lr,
        total_steps=max(total_steps, 2),
        pct_start=0.3,
        anneal_strategy="linear",
        three_phase=True,
        div_factor=25.0,
        final_div_factor=100.0,
        cycle_momentum=False,
    )
    return optimizer, scheduler


def run(
    config: TrainConfig,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    inputs: RunInputs | None = None,
) -> TrainResult:
    """Train the model a config describes, with checkpoints, model selection and a test evaluation.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the processes join a process group for the run, each
    on ``cuda:LOCAL_RANK`` when ``config.device`` is CUDA, and train on shares of every global
    batch of ``config.batch_size``; rank 0's config and folder are used, and only rank 0 writes.

    Args:
        config: the run's configuration (``None`` fields take the dataset presets).
        out: run folder; None keeps nothing on disk.
        resume: continue the run in ``out`` from its last completed epoch.
        progress: progress bars.
        log: where epoch summaries go (default: printed, flushed at once).
        inputs: the model, method and data to train on (default: those ``config`` names).
    """
    config = resolve(config)
    check_logger(config.logger)  # a missing package fails before anything trains
    world = launched_world()
    local_batch_size(config.batch_size, world.world_size)
    device = process_device(available_device(config.device), world)
    with process_group(world, device):
        config, out = broadcast_object((config, out))
        return _run(
            config,
            inputs,
            out,
            resume,
            progress and world.is_main,
            log or _print_now,
            world,
            device,
        )


def _run(
    config: TrainConfig,
    inputs: RunInputs | None,
    out: str | Path | None,
    resume: bool,
    progress: bool,
    log: Callable[[str], None],
    world: World,
    device: torch.device,
) -> TrainResult:
    """:func:`run` on one process of ``world`` (possibly the only one)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    _seed_everything(config.seed)
    inputs = inputs or run_inputs(config)
    model, method = model_in_layout(inputs.model.to(device), config.layout), inputs.method
    train_set, val_set = inputs.train, inputs.val
    bounds_form(model, train_set.shape)  # traced once (and checked) before anything is written
    loader = _loader(config, train_set, device, world)
    run_dir = RunDir(out) if out is not None else None
    if run_dir is not None and world.is_main:
        run_dir.create()  # only now: bad data or config leaves no folder behind
    steps_per_epoch = len(loader)
    schedule = EpsSchedule(config.eps_train, steps_per_epoch, config.stn_epochs, config.reg_epochs)
    optimizer, scheduler = _optimizer(model, config, config.epochs * steps_per_epoch)
    state = TrainState()
    if run_dir is not None:
        state = start_or_resume(
            run_dir, config, resume, model, method, optimizer, scheduler, world.is_main, log
        )
    parts = TrainingParts(model, method, loader, schedule, optimizer, scheduler)
    board = open_logger(config, out) if world.is_main else None  # --logger tensorboard
    place = _Place(run_dir, world, device)
    callbacks = _epoch_callbacks(config, parts, val_set, place, board, state.epoch, log)
    settings = LoopSettings(config.epochs, config.grad_clip, config.l1, progress, config.layout)
    try:
        state = fit(parts, settings, state, callbacks, world)
    except TrainingDivergedError as err:
        if run_dir is None or not run_dir.has_checkpoint("last"):
            raise TrainingDivergedError(f"{err}; lower --lr or check the data") from None
        raise TrainingDivergedError(
            f"{err}; {run_dir.checkpoint_path('last')} keeps the last good epoch; lower --lr "
            "or check the data, and train into another --out"
        ) from None
    if board is not None:
        board.close()
    final_started = time.perf_counter()
    if run_dir is not None and run_dir.has_checkpoint("best"):
        model.load_state_dict(run_dir.load_checkpoint("best")["model"])
    test_set = inputs.test()
    test = None
    if test_set is not None:
        test = _final_evaluation(model.eval(), test_set, config, device, progress, world)
    if run_dir is not None and world.is_main and test is not None:
        seconds = state.seconds + time.perf_counter() - final_started
        _write_results(run_dir, test, state, seconds)
    return TrainResult(
        model, state.history, state.best_epoch, test, run_dir.path if run_dir else None, config
    )


@dataclass(frozen=True)
class _Place:
    """Where a process of a run trains: its run folder (None: none), its world and device."""

    run_dir: RunDir | None
    world: World
    device: torch.device


def _epoch_callbacks(
    config: TrainConfig,
    parts: TrainingParts,
    val_set: ImageSet,
    place: _Place,
    board: Any,
    first_epoch: int,
    log: Callable[[str], None],
) -> list[EpochCallback]:
    """What the run does after each epoch (:mod:`acert.workflows.train.callbacks`), in order."""
    callbacks: list[EpochCallback] = []
    validation = None
    if len(val_set):
        settings = EvaluationSettings(config.eps_max, pgd_eps=())  # IBP radii, no attack
        validation = Validation(
            parts.model, val_set.floats(), val_set.labels, place.world, place.device, settings
        )
        callbacks += [validation, BestEpoch(config.stn_epochs + config.reg_epochs, config.epochs)]
    callbacks.append(EpochClock())
    if place.run_dir is not None and place.world.is_main:
        payload = partial(
            checkpoint_payload, config, parts.model, parts.method, parts.optimizer, parts.scheduler
        )
        callbacks.append(Checkpoints(place.run_dir, payload))
    if board is not None:
        callbacks.append(EventFiles(board, validation))
    if place.world.is_main:
        callbacks.append(EpochLine(log, config.epochs, first_epoch))
    callbacks.append(wait_for_every_process)
    return callbacks


def _loader(
    config: TrainConfig, train_set: ImageSet, device: torch.device, world: World
) -> BatchLoader:
    """The global batches of one process's run; every process iterates all of them."""
    # a last batch of one image cannot train batch-norm; it is dropped too
    drop_last = len(train_set) >= 2 * config.batch_size or len(train_set) % config.batch_size == 1
    check_last_batch(len(train_set), config.batch_size, drop_last, world)
    return BatchLoader(
        train_set,
        config.batch_size,
        shuffle=True,
        augmentation=dataset_info(config.dataset).augmentation,
        drop_last=drop_last,
        seed=config.seed,
        device=device,
    )


def _print_now(line: str) -> None:
    tqdm.write(line)
    sys.stdout.flush()


def _test_set(config: TrainConfig) -> ImageSet:
    """The test split a config names (its ``eval_limit`` stratified subset, drawn with
    ``eval_seed``)."""
    test = load_imageset(config.dataset, "test", config.data_dir)
    if config.eval_limit is not None:
        test = stratified_subset(test, config.eval_limit, seed=config.test_subset_seed)
    return test


def _final_evaluation(
    model: nn.Module,
    test: ImageSet,
    config: TrainConfig,
    device: torch.device,
    progress: bool,
    world: World,
) -> Evaluation:
    settings = EvaluationSettings(
        config.eps_max, config.cert_eps, (config.eval_bound,), pgd_steps=config.eval_pgd_steps
    )
    return evaluate_sharded(
        model, test.floats(), test.labels, settings, world, device=device, progress=progress
    )


def _write_results(run_dir: RunDir, test: Evaluation, state: TrainState, seconds: float) -> None:
    from acert.records.plots import radius_histogram

    metrics = {
        **test.to_dict(),
        "best_epoch": state.best_epoch,
        "epochs": state.epoch,
        "train_seconds": seconds,
    }
    run_dir.write_test_metrics(metrics)
    run_dir.save_radii(test.radii)
    radius_histogram(
        test.radii, test.eps_max, run_dir.histogram_path, title=f"certified radii ({test.bound})"
    )
