"""Run configuration: one flat dataclass, dataset presets, YAML files and command-line overrides.

Precedence, lowest first: the field defaults, the dataset's preset (METHOD.md, "Optimisation"),
a YAML file, then ``key=value`` overrides. A field left ``None`` takes the dataset's value when
the config is resolved; the resolved config is what a run folder stores.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from acert.data import DATASETS, dataset_info
from acert.errors import ConfigError

__all__ = [
    "GIVEN_MODEL",
    "LOGGERS",
    "PRESETS",
    "SYSTEM_KEYS",
    "TrainConfig",
    "available_device",
    "changed_keys",
    "check_resolved",
    "config_from_dict",
    "load_yaml",
    "parse_device",
    "parse_override",
    "resolve",
]


@dataclass
class TrainConfig:
    """Everything a training run depends on. Pixel units for every ε."""

    # data
    dataset: str = "mnist5k"
    data_dir: str | None = None
    train_limit: int | None = None
    val_size: int | None = None
    # model
    model: str | None = None
    init: str = "ibp"
    # method and its knobs
    method: str = "acert"
    kappa: float = 0.0
    eps_max: float | None = None
    eps_train: float | None = None
    radius_search: str = "brent"
    radius_max_iter: int = 10
    radius_warm_start: bool = True
    lambda_tight: float | None = None
    lambda_relu: float | None = None
    pgd_steps: int = 10
    pgd_step_size: float | None = None
    pgd_restarts: int = 1
    sabr_lambda: float = 0.4
    mtl_alpha: float = 0.5
    cc_alpha: float = 0.5
    exp_alpha: float = 0.5
    taps_head: int = 4
    taps_grad_scale: float = 4.0
    taps_connector: float = 0.5
    # optimisation
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    stn_epochs: float = 1.0
    reg_epochs: float | None = None
    grad_clip: float = 10.0
    l1: float | None = None
    # evaluation
    cert_eps: list[float] | None = None
    eval_bound: str = "ibp"
    eval_pgd_steps: int = 20
    eval_limit: int | None = None
    # system
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    logger: str = "csv"
    out: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict[str, Any]] = {name: d.preset.values() for name, d in DATASETS.items()}
"""Per-dataset values for the fields left ``None``: a view of each dataset record's ``preset``
(:mod:`acert.data.registry`; METHOD.md, "Optimisation")."""

_GENERIC = {"lambda_tight": 0.5, "lambda_relu": 0.5, "l1": 0.0}

GIVEN_MODEL = "given"
"""The ``model`` of a run whose network was given from Python (``acert.fit``): no registry
builds it; the run folder keeps it (``model.pt``)."""

LOGGERS = ("csv", "tensorboard")
"""Values of the config key ``logger``: metrics.csv alone, or TensorBoard event files beside it
(:mod:`acert.loggers`)."""

SYSTEM_KEYS = ("device", "threads", "logger", "data_dir", "out")
"""Config keys that say where and how a run computes, not what it computes: they may differ
when a run is resumed or found again by a sweep."""


def changed_keys(saved: TrainConfig, wanted: TrainConfig) -> list[str]:
    """The keys, other than :data:`SYSTEM_KEYS`, in which two configs differ."""
    old, new = saved.to_dict(), wanted.to_dict()
    return sorted(k for k, v in new.items() if k not in SYSTEM_KEYS and old.get(k) != v)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


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
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ConfigError(
            f"unknown config key {unknown[0]!r}; valid keys are {', '.join(sorted(_FIELDS))}"
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


def _default_val_size(preset: int, train_limit: int | None) -> int:
    """The dataset's validation size, but at most a tenth of a limited training set (the
    presets hold out 5-12% of the full training splits)."""
    return preset if train_limit is None else min(preset, train_limit // 10)


def resolve(config: TrainConfig) -> TrainConfig:
    """Fill every ``None`` from the dataset (registry and preset) and check the values."""
    info = dataset_info(config.dataset)
    preset = {**_GENERIC, **info.preset.values()}
    filled: dict[str, Any] = {
        **{k: v for k, v in preset.items() if getattr(config, k) is None},
        "val_size": _default_val_size(info.val_size, config.train_limit)
        if config.val_size is None
        else config.val_size,
        "eps_max": info.eps_max if config.eps_max is None else config.eps_max,
        "cert_eps": list(info.cert_eps) if config.cert_eps is None else config.cert_eps,
    }
    eps_max = filled["eps_max"]
    filled["eps_train"] = eps_max if config.eps_train is None else config.eps_train
    resolved = dataclasses.replace(config, **filled)
    validate(resolved)
    return resolved


_RESOLVED_KEYS = tuple(
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
    missing = [key for key in _RESOLVED_KEYS if getattr(config, key) is None]
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


def validate(config: TrainConfig) -> None:
    """Raise a ConfigError for values out of range or inconsistent with each other."""
    classes = dataset_info(config.dataset).num_classes
    checks = [
        (0 < config.eps_max < 1, f"eps_max must lie in (0, 1) pixel units, got {config.eps_max}"),
        (
            0 < config.eps_train < 1,
            f"eps_train must lie in (0, 1) pixel units, got {config.eps_train}",
        ),
        (0 <= config.kappa <= 1, f"kappa must lie in [0, 1], got {config.kappa}"),
        (config.epochs >= 1, f"epochs must be >= 1, got {config.epochs}"),
        (
            config.batch_size >= 2,
            f"batch_size must be >= 2 (batch-norm trains on batch statistics), "
            f"got {config.batch_size}",
        ),
        (config.lr > 0, f"lr must be > 0, got {config.lr}"),
        (
            config.stn_epochs >= 0 and config.reg_epochs >= 0,
            "stn_epochs and reg_epochs must be >= 0",
        ),
        (config.val_size >= 0, f"val_size must be >= 0, got {config.val_size}"),
        (
            config.train_limit is None or config.train_limit >= classes,
            f"train_limit must be >= {classes} (an image of every class), got {config.train_limit}",
        ),
        (
            config.eval_limit is None or config.eval_limit >= classes,
            f"eval_limit must be >= {classes} (an image of every class), got {config.eval_limit}",
        ),
        (0 <= config.sabr_lambda <= 1, f"sabr_lambda must lie in [0, 1], got {config.sabr_lambda}"),
        (0 <= config.mtl_alpha <= 1, f"mtl_alpha must lie in [0, 1], got {config.mtl_alpha}"),
        (0 <= config.cc_alpha <= 1, f"cc_alpha must lie in [0, 1], got {config.cc_alpha}"),
        (0 <= config.exp_alpha <= 1, f"exp_alpha must lie in [0, 1], got {config.exp_alpha}"),
        (config.taps_head >= 1, f"taps_head must be >= 1, got {config.taps_head}"),
        (config.taps_grad_scale > 0, f"taps_grad_scale must be > 0, got {config.taps_grad_scale}"),
        (0 < config.taps_connector <= 1, f"taps_connector in (0, 1], got {config.taps_connector}"),
        (config.grad_clip > 0, f"grad_clip must be > 0, got {config.grad_clip}"),
        (config.radius_max_iter >= 1, "radius_max_iter must be >= 1"),
        (config.l1 >= 0, f"l1 must be >= 0, got {config.l1}"),
        (
            config.lambda_tight >= 0 and config.lambda_relu >= 0,
            f"lambda_tight and lambda_relu must be >= 0, got {config.lambda_tight}, "
            f"{config.lambda_relu}",
        ),
        (
            config.pgd_steps >= 0 and config.pgd_restarts >= 1,
            f"pgd_steps must be >= 0 and pgd_restarts >= 1, got {config.pgd_steps}, "
            f"{config.pgd_restarts}",
        ),
        (
            config.pgd_step_size is None or config.pgd_step_size > 0,
            f"pgd_step_size must be > 0 or null, got {config.pgd_step_size}",
        ),
        (
            config.eval_pgd_steps >= 0,
            f"eval_pgd_steps must be >= 0 (0 skips the attack), got {config.eval_pgd_steps}",
        ),
        (config.seed >= 0, f"seed must be >= 0, got {config.seed}"),
        (
            config.threads is None or config.threads >= 1,
            f"threads must be >= 1 or null (PyTorch's default), got {config.threads}",
        ),
        (
            config.logger in LOGGERS,
            f"unknown logger {config.logger!r}; choose one of {', '.join(LOGGERS)}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    from acert.bounds import METHODS as BOUNDS  # the registries, imported only when checked
    from acert.methods import list_methods
    from acert.models import list_models
    from acert.radius import SEARCHES

    for key, name, known in (
        ("model", config.model, [*list_models(), GIVEN_MODEL]),
        ("method", config.method, list_methods()),
        ("eval_bound", config.eval_bound, sorted(BOUNDS)),
        ("radius_search", config.radius_search, sorted(SEARCHES)),
    ):
        if name not in known:
            raise ConfigError(f"unknown {key} {name!r}; choose one of {', '.join(known)}")
    parse_device(config.device)
    for eps in config.cert_eps:
        if not 0 < eps <= config.eps_max:
            raise ConfigError(
                f"certification eps {eps} must lie in (0, eps_max={config.eps_max}]; "
                "raise eps_max or drop that eps"
            )


def parse_device(name: str) -> torch.device:
    """The torch device ``name`` names (cpu, cuda, cuda:N), or a ConfigError."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from err
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r} is not supported; use cpu, cuda or cuda:N")
    return device


def available_device(name: str) -> torch.device:
    """:func:`parse_device`, and a ConfigError when this machine does not have the device."""
    device = parse_device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {name!r} asked for, but this PyTorch build or machine has no CUDA; "
                "use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s)"
            )
    return device
