"""A config made whole and checked: every null the dataset fills, then every key's rule and the
checks between keys.

Each key's own rule sits beside its field (:mod:`acert.config.fields`); the checks that involve
two keys (or a key and the dataset) are :data:`CROSS_CHECKS`, here. docs/CONFIG.md lists both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from acert.config.fields import TrainConfig, config_key, config_keys
from acert.data import DATASETS, dataset_info
from acert.foundation.errors import ConfigError

__all__ = ["CROSS_CHECKS", "PRESETS", "CrossCheck", "check_key", "check_resolved", "resolve"]

PRESETS: dict[str, dict[str, Any]] = {name: d.preset.values() for name, d in DATASETS.items()}
"""Per-dataset values for the fields left ``None``: a view of each dataset record's ``preset``
(:mod:`acert.data.registry`; docs/METHOD.md, "Optimisation")."""

_GENERIC = {"lambda_tight": 0.5, "lambda_relu": 0.5, "l1": 0.0}


def _default_val_size(preset: int, train_limit: int | None) -> int:
    """The dataset's validation size, but at most a tenth of a limited training set (the
    presets hold out 5-12% of the full training splits)."""
    return preset if train_limit is None else min(preset, train_limit // 10)


def resolve(config: TrainConfig) -> TrainConfig:
    """Fill every ``None`` from the dataset (registry and preset) and check the values."""
    info = dataset_info(config.dataset)
    preset = {**_GENERIC, **info.preset.values()}
    filled: dict[str, Any] = {
        "dataset": info.name,  # image folders by their absolute path, so a run names them anywhere
        **{k: v for k, v in preset.items() if getattr(config, k) is None},
        "val_size": _default_val_size(info.val_size, config.train_limit)
        if config.val_size is None
        else config.val_size,
        "eps_max": info.eps_max if config.eps_max is None else config.eps_max,
    }
    eps_max = filled["eps_max"]
    filled["cert_eps"] = (
        _preset_radii_within(info.cert_eps, eps_max) if config.cert_eps is None else config.cert_eps
    )
    filled["eps_train"] = eps_max if config.eps_train is None else config.eps_train
    resolved = dataclasses.replace(config, **filled)
    validate(resolved)
    return resolved


def _preset_radii_within(radii: tuple[float, ...], eps_max: float) -> list[float]:
    """The dataset's certification radii up to ``eps_max`` (a cap set below the dataset's keeps
    those it covers), or ``[eps_max]`` where it covers none."""
    return [eps for eps in radii if eps <= eps_max] or [eps_max]


RESOLVED_KEYS = tuple(
    dict.fromkeys(
        [
            *_GENERIC,
            *(key for preset in PRESETS.values() for key in preset),
            "val_size",
            "eps_max",
            "eps_train",
            "cert_eps",
        ]
    )
)
"""The keys :func:`resolve` fills: never null in a resolved config."""


def check_resolved(config: TrainConfig, source: str) -> TrainConfig:
    """``config`` if it is a resolved config (what a run folder stores), else a ConfigError
    naming ``source``: a key :func:`resolve` fills is missing, or a value is out of range."""
    missing = [key for key in RESOLVED_KEYS if getattr(config, key) is None]
    if missing:
        raise ConfigError(
            f"{source} lacks {', '.join(missing)}: it is not the resolved config `acert train` "
            "writes; restore it from another copy of the run or train anew"
        )
    try:
        validate(config)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from err
    return config


def check_key(name: str, value: Any) -> None:
    """A one-line ConfigError unless ``value`` is allowed for config key ``name`` by its own
    rule (checks between keys aside)."""
    rule = config_key(name).rule
    if rule is not None:
        rule.check(value, name)


@dataclass(frozen=True)
class CrossCheck:
    """A check of a key against another key or the dataset.

    Attributes:
        key: the key it constrains.
        rule: the constraint in words (docs/CONFIG.md).
        problem: the error message for a resolved config that breaks it, else None.
    """

    key: str
    rule: str
    problem: Callable[[TrainConfig], str | None]


def _an_image_of_every_class(key: str) -> Callable[[TrainConfig], str | None]:
    def problem(config: TrainConfig) -> str | None:
        value, classes = getattr(config, key), dataset_info(config.dataset).num_classes
        if value is None or value >= classes:
            return None
        return f"{key} must be >= {classes} (an image of every class), got {value}"

    return problem


def _certified_radii(config: TrainConfig) -> str | None:
    for eps in config.cert_eps:
        if not 0 < eps <= config.eps_max:
            return (
                f"certification eps {eps} must lie in (0, eps_max={config.eps_max}]; "
                "raise eps_max or leave that eps out of cert_eps (--cert-eps)"
            )
    return None


CROSS_CHECKS = (
    CrossCheck(
        "train_limit",
        ">= the dataset's number of classes (an image of every class), or null",
        _an_image_of_every_class("train_limit"),
    ),
    CrossCheck("cert_eps", "each in (0, eps_max]", _certified_radii),
    CrossCheck(
        "eval_limit",
        ">= the dataset's number of classes (an image of every class), or null",
        _an_image_of_every_class("eval_limit"),
    ),
)
"""The checks between keys, after every key's own rule has passed."""


def validate(config: TrainConfig) -> None:
    """Raise a ConfigError for a value its key's rule refuses, in the order of the keys, then
    for values inconsistent with each other (:data:`CROSS_CHECKS`)."""
    for name in config_keys():
        check_key(name, getattr(config, name))
    for check in CROSS_CHECKS:
        message = check.problem(config)
        if message is not None:
            raise ConfigError(message)
