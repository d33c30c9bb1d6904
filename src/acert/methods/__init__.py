"""Training methods, each one object with one loss, selected by name.

``create_method(config)`` builds the method a config names; ``list_methods()`` names them all.
A method reads only the config fields it needs (``kappa``, ``eps_train``, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from acert.foundation.errors import ConfigError
from acert.methods.acert import ACERT, RadiusMemory
from acert.methods.base import Batch, LossTerms, Step, TrainingAttack, TrainingMethod
from acert.methods.cc_ibp import CCIBP
from acert.methods.crown_ibp import CROWNIBP
from acert.methods.exp_ibp import EXPIBP
from acert.methods.ibp import IBP
from acert.methods.loop import ACERTLoss, TrainingLoss
from acert.methods.mtl_ibp import MTLIBP
from acert.methods.pgd import PGDTraining
from acert.methods.sabr import SABR, sabr_box
from acert.methods.standard import Standard
from acert.methods.staps import STAPS
from acert.methods.taps import TAPS
from acert.methods.warmup import WarmupRegularizer
from acert.radius import TRAINING_SEARCH, SearchSettings

__all__ = [
    "ACERT",
    "CCIBP",
    "CROWNIBP",
    "EXPIBP",
    "IBP",
    "METHODS",
    "MTLIBP",
    "SABR",
    "STAPS",
    "TAPS",
    "ACERTLoss",
    "Batch",
    "LossTerms",
    "PGDTraining",
    "Standard",
    "Step",
    "TrainingAttack",
    "TrainingLoss",
    "TrainingMethod",
    "WarmupRegularizer",
    "create_method",
    "list_methods",
    "sabr_box",
]


def _regularizer(config: Any) -> WarmupRegularizer:
    """The warm-up regularisers of the config (docs/METHOD.md defaults where it leaves them
    unset)."""
    default = WarmupRegularizer()
    tight = default.lambda_tight if config.lambda_tight is None else config.lambda_tight
    relu = default.lambda_relu if config.lambda_relu is None else config.lambda_relu
    return WarmupRegularizer(tight, relu)


def _radius_search(config: Any) -> SearchSettings:
    """ACERT's training search with the config's strategy, iteration limit and tolerance."""
    return replace(
        TRAINING_SEARCH,
        strategy=config.radius_search,
        max_iter=config.radius_max_iter,
        rtol=config.radius_rtol,
    )


def _attack(config: Any) -> TrainingAttack:
    return TrainingAttack(config.pgd_steps, config.pgd_step_size, config.pgd_restarts)


def _taps_knobs(config: Any) -> dict[str, Any]:
    """The settings TAPS and STAPS share."""
    return {
        "head": config.taps_head,
        "grad_scale": config.taps_grad_scale,
        "connector": config.taps_connector,
        "attack": _attack(config),
        "regularizer": _regularizer(config),
    }


METHODS: dict[str, Callable[[Any], TrainingMethod]] = {
    "standard": lambda c: Standard(),
    "acert": lambda c: ACERT(
        kappa=c.kappa,
        regularizer=_regularizer(c),
        search=_radius_search(c),
        memory=RadiusMemory() if c.radius_warm_start else None,
    ),
    "ibp": lambda c: IBP(kappa=c.kappa, regularizer=_regularizer(c)),
    "crown-ibp": lambda c: CROWNIBP(kappa=c.kappa, regularizer=_regularizer(c)),
    "sabr": lambda c: SABR(lam=c.sabr_lambda, attack=_attack(c), regularizer=_regularizer(c)),
    "mtl-ibp": lambda c: MTLIBP(alpha=c.mtl_alpha, attack=_attack(c), regularizer=_regularizer(c)),
    "pgd": lambda c: PGDTraining(attack=_attack(c)),
    "cc-ibp": lambda c: CCIBP(alpha=c.cc_alpha, attack=_attack(c), regularizer=_regularizer(c)),
    "exp-ibp": lambda c: EXPIBP(alpha=c.exp_alpha, attack=_attack(c), regularizer=_regularizer(c)),
    "taps": lambda c: TAPS(**_taps_knobs(c)),
    "staps": lambda c: STAPS(lam=c.sabr_lambda, **_taps_knobs(c)),
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
