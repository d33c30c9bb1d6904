"""The registry of training methods: a method is one class with one decorator.

``@register_method("sabr", knobs={"sabr_lambda": "λ"}, settings=SABRSettings)`` on a class with
a ``loss`` and a ``from_config(config)`` classmethod gives it its name (``cls.name``), makes
``acert train --method sabr`` build it from the run's config, tells the trade-off figures how to
write the knobs a sweep moves along the method's front, and makes the fields of its settings
record (:class:`~acert.foundation.settings.Settings`, declared beside the method) config keys:
``sabr_lambda`` in YAML files, ``--set`` and ``--sabr-lambda``. ``methods/sabr.py`` is the
example to copy.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from acert.foundation.settings import SettingField, Settings, setting_fields

__all__ = [
    "TRAINING_METHODS",
    "MethodEntry",
    "knob_symbols",
    "method_setting_fields",
    "register_method",
]

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
        settings: the method's settings record (its fields are config keys), or None.
    """

    name: str
    method_class: type
    knobs: Mapping[str, str] = field(default_factory=dict)
    settings: type[Settings] | None = None

    def from_config(self, config: Any) -> Any:
        return self.method_class.from_config(config)


TRAINING_METHODS: dict[str, MethodEntry] = {}
"""Name -> entry of every registered training method (``acert list``)."""


def register_method(
    name: str,
    *,
    knobs: Mapping[str, str] | None = None,
    settings: type[Settings] | None = None,
) -> Callable[[MethodClass], MethodClass]:
    """Class decorator: registers the class as the training method ``name``, with the config
    keys of its ``settings`` record (a frozen dataclass of ``setting`` fields)."""

    def register(method_class: MethodClass) -> MethodClass:
        if name in TRAINING_METHODS:
            raise ValueError(f"a training method named {name!r} is registered already")
        if not callable(getattr(method_class, "from_config", None)):
            raise TypeError(f"{method_class.__name__} needs a from_config(config) classmethod")
        if settings is not None:
            _check_record(settings)
        method_class.name = name
        TRAINING_METHODS[name] = MethodEntry(name, method_class, dict(knobs or {}), settings)
        return method_class

    return register


def _check_record(record: type) -> None:
    """A TypeError unless ``record`` is a frozen Settings dataclass of settings; a ValueError
    for a key another registered record declares already (a key is declared once: a family of
    methods shares it by inheriting the record that declares it)."""
    params = getattr(record, "__dataclass_params__", None)
    if not (isinstance(record, type) and issubclass(record, Settings)) or not (
        params and params.frozen
    ):
        raise TypeError(f"settings record {record!r} must be a frozen dataclass of Settings")
    known = method_setting_fields()
    for item in setting_fields(record):
        other = known.get(item.name)
        if other is not None and other.record is not item.record:
            raise ValueError(
                f"config key {item.name!r} of {record.__name__} is declared by "
                f"{other.record.__name__} already; inherit that record to share the key"
            )


def method_setting_fields() -> dict[str, SettingField]:
    """Config key -> its setting, over the settings records of every registered method, in the
    order of registration."""
    records = tuple(entry.settings for entry in TRAINING_METHODS.values() if entry.settings)
    return dict(_fields_of(records))


@functools.lru_cache(maxsize=8)
def _fields_of(records: tuple[type, ...]) -> tuple[tuple[str, SettingField], ...]:
    found: dict[str, SettingField] = {}
    for record in records:
        for item in setting_fields(record):
            found.setdefault(item.name, item)
    return tuple(found.items())


def knob_symbols() -> dict[str, str]:
    """Config key -> its symbol in the figures, over every registered method."""
    return {
        key: symbol for entry in TRAINING_METHODS.values() for key, symbol in entry.knobs.items()
    }
