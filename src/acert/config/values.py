"""Config values from text: the YAML file, ``key=value`` overrides, and each value converted to
its key's type (one-line ConfigErrors naming the key)."""

from __future__ import annotations

import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from acert.config.fields import TrainConfig, config_keys
from acert.foundation.errors import ConfigError

__all__ = ["config_from_dict", "load_yaml", "parse_override"]


def _field_types() -> dict[str, Any]:
    """Key -> its type, the methods' keys included."""
    return {name: item.type for name, item in config_keys().items()}


def _coerce(key: str, value: Any) -> Any:
    """``value`` converted to the type of field ``key``, or a ConfigError naming both."""
    annotation = _field_types()[key]
    allowed = (
        typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    )
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"config key {key!r} may not be null")
    for kind in (t for t in allowed if t is not type(None)):
        converted = _convert(kind, value)
        if converted is not _NO:
            return converted
    names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise ConfigError(f"config key {key!r} needs {names}, got {value!r}")


_NO = object()


def _convert(kind: Any, value: Any) -> Any:
    origin = typing.get_origin(kind)
    if origin is list:
        items = value if isinstance(value, list | tuple) else str(value).split(",")
        (item_kind,) = typing.get_args(kind)
        converted = [_convert(item_kind, item) for item in items if item != ""]
        return _NO if any(c is _NO for c in converted) else converted
    if kind is bool:
        if isinstance(value, bool):
            return value
        return {"true": True, "false": False}.get(str(value).lower(), _NO)
    if kind is int:
        if isinstance(value, bool):
            return _NO
        if isinstance(value, int):
            return value
        try:
            return int(str(value))
        except ValueError:
            return _NO
    if kind is float:
        if isinstance(value, bool):
            return _NO
        try:
            number = float(value)
        except (TypeError, ValueError):
            return _NO
        return number if math.isfinite(number) else _NO
    if kind is str:
        return value if isinstance(value, str) else _NO
    return _NO


def config_from_dict(values: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """A config with ``values`` applied over ``base`` (default: the field defaults)."""
    known = config_keys()
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown config key {unknown[0]!r}; valid keys are {', '.join(sorted(known))}"
        )
    merged = (base or TrainConfig()).to_dict()
    merged.update({key: _coerce(key, value) for key, value in values.items()})
    return TrainConfig(**merged)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file, or a ConfigError naming the file and the problem."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; pass a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(
            f"config file {path} is not valid YAML: {str(err).splitlines()[0]}"
        ) from err
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return values


def _is_text(key: str) -> bool:
    """Whether config key ``key`` holds a string (a name or a path)."""
    annotation = _field_types().get(key)
    allowed = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else ()
    return annotation is str or str in allowed


def parse_override(text: str) -> tuple[str, Any]:
    """``"key=value"`` -> (key, value): the text itself for a string key (so ``out=2024`` is a
    folder name), else the value parsed as a YAML scalar; dashes in the key read as
    underscores, as in the flags."""
    key, sep, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like key=value")
    if raw == "":
        return key, None
    if _is_text(key):
        return key, raw
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key, value
