"""Settings records: frozen dataclasses whose fields each carry a default, a help text and a rule.

A field made by :func:`setting` keeps its :class:`Key` (help text and :mod:`rule
<acert.foundation.ranges>`) in the field's metadata. The run config's own keys are such fields
(:class:`acert.config.TrainConfig`), and so are the keys of each training method: its settings
record, a subclass of :class:`Settings` declared beside the method and named in its
registration (``@register_method("sabr", settings=SABRSettings)``). The config reads the
records' fields as config keys (YAML, ``--set``, a flag each, ``--help``, docs/CONFIG.md); the
method reads its record back from a config with :meth:`Settings.read`.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from acert.foundation.ranges import Rule

__all__ = ["Key", "SettingField", "Settings", "key_of", "setting", "setting_fields"]

_METADATA = "acert"

Record = TypeVar("Record", bound="Settings")


@dataclass(frozen=True)
class Key:
    """What a setting means and what it may hold.

    Attributes:
        help: the meaning, one sentence (``--help`` and docs/CONFIG.md).
        rule: the allowed values (checked by :func:`acert.config.validate` and when a
            :class:`Settings` record is made); None: any value of the field's type.
    """

    help: str
    rule: Rule | None = None


def setting(default: Any, help: str, rule: Rule | None = None) -> Any:
    """A dataclass field with ``default``, its help text and its rule."""
    return field(default=default, metadata={_METADATA: Key(help, rule)})


def key_of(item: dataclasses.Field) -> Key | None:
    """The :class:`Key` of a field made by :func:`setting`, else None."""
    return item.metadata.get(_METADATA)


@dataclass(frozen=True)
class SettingField:
    """One setting of a record, as the config sees it: a config key.

    Attributes:
        name: the key (the field's name).
        type: the field's type (``float``, ``str | None``, ``list[float] | None``).
        default: the field's default.
        key: its help text and rule.
        record: the class that declares it (for a record inheriting it: the base's).
    """

    name: str
    type: Any
    default: Any
    key: Key
    record: type


@functools.cache
def setting_fields(record: type) -> tuple[SettingField, ...]:
    """The settings of a dataclass ``record``, in field order; a TypeError for a field that
    :func:`setting` did not make (every setting needs its help text) or that has no default."""
    hints = typing.get_type_hints(record)
    found = []
    for item in dataclasses.fields(record):
        key = key_of(item)
        if key is None or item.default is dataclasses.MISSING:
            raise TypeError(
                f"{record.__name__}.{item.name} needs setting(default, help, rule): every "
                "setting has a default, a help text and a rule"
            )
        owner = next(  # the first class of the hierarchy that holds this very field
            base
            for base in reversed(record.__mro__)
            if any(f is item for f in getattr(base, "__dataclass_fields__", {}).values())
        )
        found.append(SettingField(item.name, hints[item.name], item.default, key, owner))
    return tuple(found)


class Settings:
    """The base of a method's settings record (a frozen dataclass of :func:`setting` fields):
    each value is checked by its rule when the record is made, and :meth:`read` makes the
    record from any object that has its keys as attributes (a run's config)."""

    def __post_init__(self) -> None:
        for item in setting_fields(type(self)):
            if item.key.rule is not None:
                item.key.rule.check(getattr(self, item.name), item.name)

    @classmethod
    def read(cls: type[Record], source: Any) -> Record:
        """The record of the values ``source`` holds under the record's keys."""
        return cls(**{item.name: getattr(source, item.name) for item in setting_fields(cls)})
