"""Training methods, each one class with one loss, registered by name.

A method is one file: its class, decorated with :func:`register_method`, builds itself from a
run's config (``from_config``); ``methods/ibp.py`` is the example to copy. Every module of this
package is imported here (:func:`_import_every_module`), which registers its methods: a new
file needs no line anywhere else. ``create_method(config)`` builds the method a config names;
``list_methods()`` names them all. ``acert.fit`` also takes a method object of one's own,
registered or not.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from acert.foundation.errors import ConfigError
from acert.methods.acert import ACERT, ACERTSettings, RadiusMemory
from acert.methods.adaptive import (
    ADAPTIVE_BASES,
    Adaptive,
    AdaptiveSettings,
    check_adaptive_name,
)
from acert.methods.base import Batch, LossTerms, Step, TrainingAttack, TrainingMethod
from acert.methods.cc_ibp import CCIBP, CCIBPSettings
from acert.methods.crown_ibp import CROWNIBP
from acert.methods.exp_ibp import EXPIBP, EXPIBPSettings
from acert.methods.ibp import IBP, KappaSettings
from acert.methods.loop import ACERTLoss, TrainingLoss
from acert.methods.mtl_ibp import MTLIBP, MTLIBPSettings
from acert.methods.pgd import PGDTraining
from acert.methods.registry import (
    TRAINING_METHODS,
    MethodEntry,
    knob_symbols,
    method_setting_fields,
    register_method,
)
from acert.methods.sabr import SABR, SABRSettings, sabr_box
from acert.methods.standard import Standard
from acert.methods.staps import STAPS, STAPSSettings
from acert.methods.taps import TAPS, TAPSSettings
from acert.methods.warmup import WarmupRegularizer

__all__ = [
    "ACERT",
    "ADAPTIVE_BASES",
    "CCIBP",
    "CROWNIBP",
    "EXPIBP",
    "IBP",
    "MTLIBP",
    "SABR",
    "STAPS",
    "TAPS",
    "TRAINING_METHODS",
    "ACERTLoss",
    "ACERTSettings",
    "Adaptive",
    "AdaptiveSettings",
    "Batch",
    "CCIBPSettings",
    "EXPIBPSettings",
    "KappaSettings",
    "LossTerms",
    "MTLIBPSettings",
    "MethodEntry",
    "PGDTraining",
    "RadiusMemory",
    "SABRSettings",
    "STAPSSettings",
    "Standard",
    "Step",
    "TAPSSettings",
    "TrainingAttack",
    "TrainingLoss",
    "TrainingMethod",
    "WarmupRegularizer",
    "check_adaptive_name",
    "create_method",
    "knob_symbols",
    "list_methods",
    "method_setting_fields",
    "register_method",
    "sabr_box",
]


def _import_every_module() -> None:
    """Import each module of this package once, so that its registrations run."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_import_every_module()


def list_methods() -> list[str]:
    """Names accepted by ``--method``."""
    return sorted(TRAINING_METHODS)


def create_method(config: Any) -> TrainingMethod:
    """The training method named by ``config.method``, configured from the same config."""
    if config.method == "given":
        raise ConfigError(
            "this run was trained with a method object given to acert.fit; resume it with "
            "acert.fit(..., method=<the same object>, resume=True)"
        )
    check_adaptive_name(config.method)
    if config.method not in TRAINING_METHODS:
        raise ConfigError(
            f"unknown method {config.method!r}; choose one of {', '.join(list_methods())}"
        )
    return TRAINING_METHODS[config.method].from_config(config)
