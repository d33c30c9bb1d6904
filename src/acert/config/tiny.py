"""The tiny run: seconds on the embedded digits, for tests, smoke checks and the reference run
of ``acert bench``. One record of its keys, and presets that change a few of them."""

from __future__ import annotations

from typing import Any

from acert.config.fields import TrainConfig

__all__ = ["BENCH_RUN", "TINY_RUN", "tiny_run"]

TINY_RUN: dict[str, Any] = {
    "dataset": "mnist5k",
    "model": "mlp-small",
    "train_limit": 300,
    "val_size": 60,
    "epochs": 3,
    "reg_epochs": 1,
    "stn_epochs": 1,
    "batch_size": 50,
    "eval_limit": 100,
    "cert_eps": [0.1],
    "eval_pgd_steps": 2,
    "lr": 2e-3,
}
"""A run of a few seconds: 300 digits, an MLP, three epochs (one standard, one ramp)."""

BENCH_RUN: dict[str, Any] = {
    "dataset": "mnist5k",
    "model": "mlp-small",
    "train_limit": 1500,
    "val_size": 0,
    "epochs": 4,
    "reg_epochs": 2,
    "eval_limit": 100,
    "eval_pgd_steps": 0,
    "cert_eps": [0.4],
}
"""The reference run of ``acert bench`` (its model trained far enough for the radius search to
meet trained-model radii); the other keys keep their defaults."""


def tiny_run(preset: dict[str, Any] | None = None, **overrides: Any) -> TrainConfig:
    """The config of ``preset`` (:data:`TINY_RUN` when None) with ``overrides``;
    ``tiny_run(epochs=2).as_flags()`` gives the same run as command-line flags."""
    return TrainConfig(**{**(TINY_RUN if preset is None else preset), **overrides})
