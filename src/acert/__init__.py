"""acert: adaptive certified training (ACERT) with sound bound propagation and certified radii.

``acert.fit(model, data, eps_max=..., epochs=...)`` trains a network of your own,
``acert.certify(model, data, eps_max=...)`` certifies it, ``acert.ACERTLoss`` is the ACERT loss
for a training loop of your own, and ``acert.load(run)`` returns a trained model; ``acert.data``,
``acert.bounds``, ``acert.radius`` and ``acert.models`` are the library's main modules. They
are imported on first use, so ``import acert`` itself does nothing.
"""

from __future__ import annotations

import importlib
from typing import Any

from acert.foundation import moved_modules

__all__ = ["ACERTLoss", "bounds", "certify", "data", "fit", "load", "models", "radius"]
__version__ = "0.1.0"

_MODULES = {"bounds", "data", "models", "radius", "methods", "evaluate", "train", "plots"}
"""``acert.evaluate``, ``acert.train`` and ``acert.plots`` are old paths (DeprecationWarning)."""


_API = {"fit": "acert.api", "certify": "acert.api", "ACERTLoss": "acert.methods"}


moved_modules.install()


def __getattr__(name: str) -> Any:
    if name == "load":
        from acert.records.runs import load

        return load
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    if name in _MODULES:
        return importlib.import_module(f"acert.{name}")
    raise AttributeError(f"module 'acert' has no attribute {name!r}")
