"""Training methods, each one object with one loss, selected by name.

``create_method(config)`` builds the method a config names; ``list_methods()`` names them all.
A method reads only the config fields it needs (``kappa``, ``eps_train``, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from acert.errors import ConfigError
from acert.methods.acert import ACERT
from acert.methods.base import Batch, LossTerms, Step, TrainingMethod
from acert.methods.standard import Standard
from acert.methods.warmup import WarmupRegularizer

__all__ = [
    "ACERT",
    "METHODS",
    "Batch",
    "LossTerms",
    "Standard",
    "Step",
    "TrainingMethod",
    "WarmupRegularizer",
    "create_method",
    "list_methods",
]


def _regularizer(config: Any) -> WarmupRegularizer:
    return WarmupRegularizer(config.lambda_tight, config.lambda_relu)


METHODS: dict[str, Callable[[Any], TrainingMethod]] = {
    "standard": lambda c: Standard(),
    "acert": lambda c: ACERT(
        kappa=c.kappa,
        regularizer=_regularizer(c),
        search=c.radius_search,
        max_iter=c.radius_max_iter,
    ),
}


def list_methods() -> list[str]:
    """Names accepted by ``--method``."""
    return sorted(METHODS)


def create_method(config: Any) -> TrainingMethod:
    """The training method named by ``config.method``, configured from the same config."""
    if config.method not in METHODS:
        raise ConfigError(
            f"unknown method {config.method!r}; choose one of {', '.join(list_methods())}"
        )
    return METHODS[config.method](config)
