"""The registry of training methods: a method is one class with one decorator.

``@register_method("sabr", knobs={"sabr_lambda": "λ"})`` on a class with a ``loss`` and a
``from_config(config)`` classmethod gives it its name (``cls.name``), makes ``acert train
--method sabr`` build it from the run's config, and tells the trade-off figures how to write the
knobs a sweep moves along the method's front. ``methods/ibp.py`` is the example to copy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = ["TRAINING_METHODS", "MethodEntry", "knob_symbols", "register_method"]

MethodClass = TypeVar("MethodClass", bound=type)


@dataclass(frozen=True)
class MethodEntry:
    """One registered training method.

    Attributes:
        name: the name of ``--method`` and of ``acert list``.
        method_class: the class; ``method_class.from_config(config)`` builds it from a run's
            config (it reads the keys it needs).
        knobs: the config keys that move the method along its trade-off, each with the symbol
            the figures write beside a point (``{"kappa": "κ"}``).
    """

    name: str
    method_class: type
    knobs: Mapping[str, str] = field(default_factory=dict)

    def from_config(self, config: Any) -> Any:
        return self.method_class.from_config(config)


TRAINING_METHODS: dict[str, MethodEntry] = {}
"""Name -> entry of every registered training method (``acert list``)."""


def register_method(
    name: str, *, knobs: Mapping[str, str] | None = None
) -> Callable[[MethodClass], MethodClass]:
    """Class decorator: registers the class as the training method ``name``."""

    def register(method_class: MethodClass) -> MethodClass:
        if name in TRAINING_METHODS:
            raise ValueError(f"a training method named {name!r} is registered already")
        if not callable(getattr(method_class, "from_config", None)):
            raise TypeError(f"{method_class.__name__} needs a from_config(config) classmethod")
        method_class.name = name
        TRAINING_METHODS[name] = MethodEntry(name, method_class, dict(knobs or {}))
        return method_class

    return register


def knob_symbols() -> dict[str, str]:
    """Config key -> its symbol in the figures, over every registered method."""
    return {
        key: symbol for entry in TRAINING_METHODS.values() for key, symbol in entry.knobs.items()
    }
