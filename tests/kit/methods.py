"""A small train-mode network, a batch and a step for the tests of the training methods."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn

from acert.config import TrainConfig, tiny_run
from acert.methods import TRAINING_METHODS, Batch, Step
from acert.models import Normalize

__all__ = ["loss_of", "make_batch", "method_run", "restored_registry", "small_net", "step"]


def small_net(seed: int = 0) -> nn.Sequential:
    """(1, 6, 6) -> 3 classes: conv-BN-ReLU, linear-BN-ReLU, linear; in train mode."""
    torch.manual_seed(seed)
    return nn.Sequential(
        Normalize([0.5], [0.3]),
        nn.Conv2d(1, 4, 3, stride=2, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 12),
        nn.BatchNorm1d(12),
        nn.ReLU(),
        nn.Linear(12, 3),
    ).train()


def make_batch(size: int = 24, seed: int = 1) -> Batch:
    """Images whose label is the brightest of three horizontal bands."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(size, 1, 6, 6, generator=generator)
    y = torch.stack([x[:, 0, 2 * k : 2 * k + 2].mean((1, 2)) for k in range(3)], 1).argmax(1)
    return Batch(x, y, torch.arange(size))


def step(eps: float = 0.02, eps_max: float = 0.04, warmup: bool = True) -> Step:
    return Step(index=50, epoch=3, eps=eps, eps_max=eps_max, warmup=warmup)


def loss_of(method, model: nn.Sequential, batch: Batch, at: Step, seed: int = 0) -> float:
    """The method's loss on a copy of ``model`` (running statistics untouched), fixed RNG."""
    torch.manual_seed(seed)
    return method.loss(copy.deepcopy(model), batch, at).loss.item()


@contextlib.contextmanager
def restored_registry() -> Iterator[None]:
    """The method registry as it was before the block, whatever the block registered."""
    saved = dict(TRAINING_METHODS)
    try:
        yield
    finally:
        TRAINING_METHODS.clear()
        TRAINING_METHODS.update(saved)


def method_run(method: str, **overrides) -> TrainConfig:
    """The tiny run of a certified method's run tests (train, resume, certify): no standard
    epoch, ε_max 0.1, a 40-image evaluation with a 1-step attack, 2-step training attacks and
    the dataset's learning rate; ``overrides`` on top."""
    return tiny_run(
        **{
            "method": method,
            "val_size": 20,
            "stn_epochs": 0,
            "eval_limit": 40,
            "eps_max": 0.1,
            "eval_pgd_steps": 1,
            "pgd_steps": 2,
            "lr": None,
            **overrides,
        }
    )
