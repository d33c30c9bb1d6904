"""The one training loop, and a run: train from a config, keep checkpoints, evaluate the best model.

``fit`` takes objects (model, method, loader, schedule, optimiser) and runs epochs; ``run``
builds those objects from a :class:`~acert.config.TrainConfig`, owns the run folder, resumes an
interrupted run from its last completed epoch, selects the best epoch by validation acceps
(METHOD.md, "Certified radius and ACR") and writes the final test metrics.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from acert.config import TrainConfig, resolve
from acert.data import (
    BatchLoader,
    ImageSet,
    dataset_info,
    load_imageset,
    split_train_val,
    stratified_subset,
)
from acert.errors import AcertError, CheckpointError
from acert.evaluate import Evaluation, evaluate
from acert.methods import Batch, Step, TrainingMethod, create_method
from acert.runs import RunDir, build_model
from acert.schedules import EpsSchedule

__all__ = ["TrainResult", "TrainingDivergedError", "fit", "run"]


class TrainingDivergedError(AcertError):
    """The loss became NaN or infinite."""


@dataclass
class TrainState:
    """What a checkpoint restores: the epochs done, the step, the history, the best epoch."""

    epoch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_score: float = -math.inf
    best_epoch: int = -1


@dataclass
class TrainResult:
    """A finished run: the best model (eval mode), its history and its test evaluation."""

    model: nn.Sequential
    history: list[dict[str, Any]]
    best_epoch: int
    test: Evaluation | None
    run_dir: Path | None
    config: TrainConfig


def _l1_penalty(model: nn.Module) -> torch.Tensor:
    return sum(
        m.weight.abs().sum() for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)
    )


def fit(
    model: nn.Sequential,
    method: TrainingMethod,
    loader: BatchLoader,
    schedule: EpsSchedule,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    epochs: int,
    state: TrainState,
    grad_clip: float = 10.0,
    l1: float = 0.0,
    end_of_epoch: Callable[[TrainState, dict[str, Any]], None] | None = None,
    progress: bool = True,
) -> TrainState:
    """Train from ``state.epoch`` to ``epochs``; call ``end_of_epoch(state, row)`` after each.

    Args:
        model: the network (put in train mode).
        method: its ``loss(model, batch, step)`` gives the objective.
        loader: training batches ``(x, y, idx)``.
        schedule: training ε of each step.
        optimizer, scheduler: stepped once per batch.
        epochs: total epochs of the run.
        state: where to start (a fresh or a restored state).
        grad_clip: maximum gradient norm (10).
        l1: weight of the L1 penalty on weights (TinyImageNet 1e-4).
        end_of_epoch: validation, checkpointing and logging.
        progress: show a progress bar per epoch.
    """
    for epoch in range(state.epoch, epochs):
        model.train()
        loader.set_epoch(epoch)
        started = time.perf_counter()
        sums: dict[str, float] = {}
        seen = 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
        for x, y, idx in bar:
            step = Step(
                state.step,
                epoch,
                schedule(state.step),
                schedule.eps_max,
                schedule.in_warmup(state.step),
            )
            terms = method.loss(model, Batch(x, y, idx), step)
            loss = terms.loss + l1 * _l1_penalty(model) if l1 > 0 else terms.loss
            if not torch.isfinite(loss):
                raise TrainingDivergedError(
                    f"the loss became {loss.item()} at epoch {epoch + 1}, step {state.step}; "
                    "the last good checkpoint is kept; lower --lr or check the data"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            scheduler.step()
            state.step += 1
            batch = x.shape[0]
            seen += batch
            accuracy = (terms.logits.argmax(1) == y).float().mean().item()
            for key, value in {
                "loss": loss.item(),
                "train_acc": accuracy,
                "eps": step.eps,
                **terms.metrics,
            }.items():
                sums[key] = sums.get(key, 0.0) + value * batch
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{accuracy:.3f}", eps=f"{step.eps:.3g}")
        row = {"epoch": epoch + 1, "step": state.step, "lr": scheduler.get_last_lr()[0]}
        row.update({key: value / max(seen, 1) for key, value in sums.items()})
        row["epoch_seconds"] = time.perf_counter() - started
        state.epoch = epoch + 1
        state.history.append(row)
        if end_of_epoch is not None:
            end_of_epoch(state, row)
    return state


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)


def _data(config: TrainConfig) -> tuple[ImageSet, ImageSet]:
    train = load_imageset(config.dataset, "train", config.data_dir)
    if config.train_limit is not None:
        train = stratified_subset(train, config.train_limit, seed=config.seed)
    return split_train_val(train, min(config.val_size, len(train) // 2), seed=config.seed)


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


def _format_row(row: dict[str, Any], epochs: int, elapsed: float) -> str:
    done = row["epoch"]
    eta = elapsed / done * (epochs - done)
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


def run(
    config: TrainConfig,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train the model a config describes, with checkpoints, model selection and a test evaluation.

    Args:
        config: the run's configuration (``None`` fields take the dataset presets).
        out: run folder; None keeps nothing on disk.
        resume: continue the run in ``out`` from its last completed epoch.
        progress: progress bars.
        log: where epoch summaries go (default: printed, flushed at once).
    """
    log = log or _print_now
    config = resolve(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    run_dir = RunDir(out).create() if out is not None else None
    state = TrainState()
    _seed_everything(config.seed)
    model = build_model(config).to(device)
    method = create_method(config)
    train_set, val_set = _data(config)
    info = dataset_info(config.dataset)
    loader = BatchLoader(
        train_set,
        config.batch_size,
        shuffle=True,
        augmentation=info.augmentation,
        drop_last=len(train_set) >= 2 * config.batch_size,
        seed=config.seed,
        device=device,
    )
    steps_per_epoch = len(loader)
    schedule = EpsSchedule(config.eps_train, steps_per_epoch, config.stn_epochs, config.reg_epochs)
    optimizer, scheduler = _optimizer(model, config, config.epochs * steps_per_epoch)
    if run_dir is not None:
        state = _start_or_resume(
            run_dir, config, resume, model, method, optimizer, scheduler, state
        )
    x_val, y_val = (val_set.floats(), val_set.labels) if len(val_set) else (None, None)
    started = time.perf_counter()

    def end_of_epoch(state: TrainState, row: dict[str, Any]) -> None:
        if x_val is not None:
            val = evaluate(model, x_val, y_val, config.eps_max, device=device, pgd_eps=[])
            model.train()
            row.update(val_acc=val.clean_accuracy, val_acr=val.acr, val_acceps=val.acceps)
        eligible = (
            state.epoch >= config.stn_epochs + config.reg_epochs or state.epoch == config.epochs
        )
        score = row.get("val_acceps", -math.inf)
        improved = x_val is not None and eligible and score > state.best_score
        if improved:
            state.best_score, state.best_epoch = score, state.epoch
        if run_dir is not None:
            payload = _payload(config, model, method, optimizer, scheduler, state)
            run_dir.save_checkpoint("last", payload)
            if improved:
                run_dir.save_checkpoint("best", payload)
            run_dir.write_metrics(state.history)
        log(_format_row(row, config.epochs, time.perf_counter() - started))

    state = fit(
        model,
        method,
        loader,
        schedule,
        optimizer,
        scheduler,
        config.epochs,
        state,
        config.grad_clip,
        config.l1,
        end_of_epoch,
        progress,
    )
    if run_dir is not None and run_dir.has_checkpoint("best"):
        model.load_state_dict(run_dir.load_checkpoint("best")["model"])
    test = _final_evaluation(model.eval(), config, device, progress)
    if run_dir is not None:
        _write_results(run_dir, test, state, time.perf_counter() - started)
    return TrainResult(
        model, state.history, state.best_epoch, test, run_dir.path if run_dir else None, config
    )


def _print_now(line: str) -> None:
    tqdm.write(line)
    sys.stdout.flush()


def _payload(config, model, method, optimizer, scheduler, state: TrainState) -> dict[str, Any]:
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
        "rng": torch.get_rng_state(),
    }


def _start_or_resume(
    run_dir, config, resume, model, method, optimizer, scheduler, state
) -> TrainState:
    has_last = run_dir.has_checkpoint("last")
    if not resume:
        if has_last:
            raise CheckpointError(
                f"{run_dir.path} already holds a run; "
                "pass --resume to continue it or choose another --out"
            )
        run_dir.save_config(config)
        return state
    if not has_last:
        raise CheckpointError(
            f"nothing to resume in {run_dir.path} (no checkpoints/last.pt); drop --resume"
        )
    saved = run_dir.load_config()
    if saved.to_dict() != config.to_dict():
        changed = sorted(k for k, v in config.to_dict().items() if saved.to_dict().get(k) != v)
        raise CheckpointError(
            f"--resume with a different config ({', '.join(changed)}); "
            "resume with the run's own settings"
        )
    payload = run_dir.load_checkpoint("last")
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    method.load_state_dict(payload["method"])
    torch.set_rng_state(payload["rng"])
    return TrainState(
        payload["epoch"],
        payload["step"],
        payload["history"],
        payload["best_score"],
        payload["best_epoch"],
    )


def _final_evaluation(
    model: nn.Sequential, config: TrainConfig, device, progress: bool
) -> Evaluation:
    test = load_imageset(config.dataset, "test", config.data_dir)
    if config.eval_limit is not None:
        test = stratified_subset(test, config.eval_limit, seed=config.seed)
    return evaluate(
        model,
        test.floats(),
        test.labels,
        config.eps_max,
        config.cert_eps,
        config.eval_bound,
        pgd_steps=config.eval_pgd_steps,
        device=device,
        progress=progress,
    )


def _write_results(run_dir: RunDir, test: Evaluation, state: TrainState, seconds: float) -> None:
    from acert.plots import radius_histogram

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
