"""The config keys: one field each, and beside it its meaning and allowed values.

Each field of :class:`TrainConfig` is made by :func:`key` (``foundation.settings.setting``),
which keeps the key's help text and its :mod:`rule <acert.foundation.ranges>` in the field's
metadata. The keys of the training methods are the fields of their settings records, declared
beside each method (``methods/sabr.py``: ``SABRSettings``, ``sabr_lambda``) and found through
the method registry the first time a config needs them (:func:`method_keys`), so that importing
the config imports no training code. :func:`config_keys` is the one list of both: ``acert
train --help``, the validation of a resolved config (:func:`acert.config.validate`), YAML
files, ``--set`` and docs/CONFIG.md (:func:`acert.config.markdown_table`) all read it. A rule
that an object API users build also checks (the training attack, the radius search) is that
object's own rule object, so the two checks are one.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from typing import Any

from acert.config.devices import parse_device
from acert.data import dataset_info
from acert.foundation.layout import LAYOUTS
from acert.foundation.ranges import (
    ATTACK_RESTARTS,
    ATTACK_STEP_SIZE,
    ATTACK_STEPS,
    PGD_STEPS,
    Deferred,
    OneOf,
    Parsed,
    above,
    at_least,
    between,
)
from acert.foundation.settings import Key, SettingField, key_of, setting
from acert.models import INITS

# the rule of the bounds, read where that registry is, when first used
BOUND = Deferred("acert.evaluation.evaluate", "BOUND")

__all__ = [
    "GIVEN_METHOD",
    "GIVEN_MODEL",
    "LOGGERS",
    "SYSTEM_KEYS",
    "Key",
    "TrainConfig",
    "changed_keys",
    "config_key",
    "config_keys",
    "key",
    "method_keys",
]

GIVEN_MODEL = "given"
"""The ``model`` of a run whose network was given from Python (``acert.fit``): no registry
builds it; the run folder keeps it (``model.pt``)."""

GIVEN_METHOD = "given"
"""The ``method`` of a run trained by ``acert.fit`` with a method object that no registration
names: only the same object can resume it."""

LOGGERS = ("csv", "tensorboard")
"""Values of the config key ``logger``: metrics.csv alone, or TensorBoard event files beside it
(:mod:`acert.records.loggers`)."""

SYSTEM_KEYS = ("device", "threads", "layout", "logger", "data_dir", "out")
"""Config keys that say where and how a run computes, not what it computes: they may differ
when a run is resumed or found again by a sweep."""

key = setting
"""A config field with its default, help text and rule (``foundation.settings.setting``)."""


def _models() -> list[str]:
    from acert.models import list_models  # registries are read when a value is checked

    return [*list_models(), GIVEN_MODEL]


@dataclass(frozen=True)
class _MethodName(OneOf):
    """A registered method; ``adaptive-<base>`` of a base without a certified loss is refused
    with the list of the methods that take adaptive radii."""

    def check(self, value: Any, name: str) -> None:
        from acert.methods import check_adaptive_name

        if isinstance(value, str):
            check_adaptive_name(value)
        super().check(value, name)


def _methods() -> list[str]:
    from acert.methods import list_methods

    return [*list_methods(), GIVEN_METHOD]


_PIXEL_EPS = between(0, 1, low_open=True, unit="pixel units")
"""A radius ε of the ℓ∞ ball."""


@dataclass(init=False)
class TrainConfig:
    """Everything a training run depends on. Pixel units for every ε; a key left ``None``
    (null) takes the dataset's preset when the config is resolved, unless its help says what
    null means.

    The keys of the training methods (``kappa``, ``sabr_lambda``, ...; :func:`method_keys`)
    are no fields of this class: their values live in :attr:`method_settings`, one entry per
    key of every registered method's settings record, and read as attributes all the same
    (``config.kappa``). ``TrainConfig(kappa=0.25)`` and ``dataclasses.replace(config,
    kappa=0.25)`` take them as keyword arguments, like the fields.
    """

    # data
    dataset: str = key(
        "mnist5k",
        "the dataset to train and evaluate on",
        Parsed(
            dataset_info,
            "a dataset of `acert list`; given-CxHxW-K: data given to acert.fit; "
            "folder:PATH: image folders PATH/train/<class>/, PATH/test/<class>/",
        ),
    )
    data_dir: str | None = key(
        None, "folder holding the dataset files; null: $ACERT_DATA_DIR, else ~/.cache/acert/data"
    )
    train_limit: int | None = key(
        None,
        "train on a stratified, seeded subset of this many training images (at most the "
        "training split); null: all of them",
    )
    val_size: int | None = key(
        None,
        "validation images held out of the training images to select the best epoch (by "
        "validation acceps); 0: keep the last epoch. Preset: the dataset's split, at most a "
        "tenth of train_limit",
        at_least(0, whole=True),
    )
    # model
    model: str | None = key(
        None,
        "the network's architecture",
        OneOf(_models, "a model of `acert list`; given for a network given to acert.fit"),
    )
    init: str = key(
        "ibp",
        "initialisation: ibp (Shi et al. 2021; docs/METHOD.md, 'IBP initialisation') or "
        "default (PyTorch's)",
        INITS,
    )
    # method (its knobs: method_settings)
    method: str = key(
        "acert",
        "the training method (docs/METHOD.md, 'Training loss' and 'Baselines')",
        _MethodName(
            _methods, "a method of `acert list`; given for a method object given to acert.fit"
        ),
    )
    eps_max: float | None = key(
        None,
        "ε_max: the cap of the certified radii and of the ACR in every evaluation, and the "
        "default of eps_train",
        _PIXEL_EPS,
    )
    eps_train: float | None = key(
        None,
        "the ε the training schedule ramps to: the cap of ACERT's training radii, the fixed "
        "training ε of the other methods (their trade-off knob; docs/METHOD.md, Step 2)",
        _PIXEL_EPS,
    )
    lambda_tight: float | None = key(
        None,
        "weight λ_tight of the warm-up tightness regulariser (Shi et al. 2021; "
        "docs/METHOD.md, 'Warm-up regularisers')",
        at_least(0),
    )
    lambda_relu: float | None = key(
        None,
        "weight λ_relu of the warm-up ReLU-balance regulariser (docs/METHOD.md, "
        "'Warm-up regularisers')",
        at_least(0),
    )
    pgd_steps: int = key(
        10,
        "signed-gradient steps of the training attacks (PGD, SABR, MTL-, CC-, EXP-IBP) and of "
        "TAPS/STAPS's latent search",
        ATTACK_STEPS,
    )
    pgd_step_size: float | None = key(
        None, "step length of the training attacks, pixel units", ATTACK_STEP_SIZE
    )
    pgd_restarts: int = key(
        1,
        "random starts of the training attacks (and of TAPS/STAPS's latent search)",
        ATTACK_RESTARTS,
    )
    # optimisation
    epochs: int | None = key(None, "training epochs", at_least(1, whole=True))
    batch_size: int | None = key(
        None,
        "training batch size (a torchrun run's global batch, split evenly among the processes)",
        at_least(2, whole=True, why="batch-norm trains on batch statistics"),
    )
    lr: float | None = key(None, "peak learning rate of Adam's OneCycle schedule", above(0))
    stn_epochs: float = key(
        1.0,
        "epochs of standard training (ε = 0) before the ε ramp (docs/METHOD.md, Step 2)",
        at_least(0),
    )
    reg_epochs: float | None = key(
        None, "epochs of the ε ramp, in which the warm-up regularisers act", at_least(0)
    )
    grad_clip: float = key(10.0, "gradient norm clipped to", above(0))
    l1: float | None = key(None, "weight of the L1 penalty on the weights", at_least(0))
    # evaluation
    cert_eps: list[float] | None = key(  # noqa: RUF009 (key() makes a dataclasses.field)
        None,
        "radii (pixel units) at which the final evaluation reports certified and PGD "
        "accuracy; comma-separated on the command line; null: the dataset's, those up to "
        "eps_max (eps_max itself where it is below them all)",
    )
    eval_bound: str = key("ibp", "the bound that certifies the final test evaluation", BOUND)
    eval_pgd_steps: int = key(20, "PGD steps of the final test evaluation's attack", PGD_STEPS)
    eval_limit: int | None = key(
        None,
        "evaluate on a stratified, seeded subset of this many test images; null: all of them",
    )
    eval_seed: int | None = key(
        None,
        "seed of the eval_limit test subset and of acert certify --limit: one value for every "
        "run of a study certifies every model on the same images",
        at_least(0, whole=True, null="the run's seed"),
    )
    # system
    seed: int = key(
        0,
        "seed of the data subsets and splits, the initialisation and the training batches",
        at_least(0, whole=True),
    )
    device: str = key("cpu", "where the run computes", Parsed(parse_device, "cpu, cuda or cuda:N"))
    threads: int | None = key(
        None,
        "CPU threads of the run",
        at_least(1, whole=True, null="PyTorch's default, one per core"),
    )
    layout: str = key(
        "contiguous",
        "memory layout of the images and convolution weights in training: contiguous (NCHW, "
        "PyTorch's default) or channels-last (NHWC; faster convolutions on some CPUs, numbers "
        "that differ by rounding; docs/PERFORMANCE.md, 'Memory layout')",
        LAYOUTS,
    )
    logger: str = key(
        "csv",
        "csv: metrics.csv; tensorboard: event files in RUN/tensorboard as well",
        OneOf(LOGGERS),
    )
    out: str | None = key(None, "the run folder; null: runs/DATASET-METHOD-DATE-TIME")

    method_settings: dict[str, Any] = field(default_factory=dict)
    """Method key -> value, for every key of :func:`method_keys` (a method's own record of
    them: ``SABRSettings.read(config)``)."""

    def __init__(self, **values: Any) -> None:
        given = dict(values.pop("method_settings", None) or {})
        for item in _core_fields():
            value = values.pop(item.name) if item.name in values else item.default
            object.__setattr__(self, item.name, value)
        given.update(values)
        keys = method_keys()
        unknown = [name for name in given if name not in keys]
        if unknown:
            raise TypeError(
                f"TrainConfig.__init__() got an unexpected keyword argument {unknown[0]!r}"
            )
        settings = {name: given.get(name, item.default) for name, item in keys.items()}
        object.__setattr__(self, "method_settings", settings)

    def __getattr__(self, name: str) -> Any:
        # only reached for a name that is no field: a method key, or an error
        settings = self.__dict__.get("method_settings")
        if not name.startswith("__") and settings is not None:
            if name in settings:
                return settings[name]
            if name in method_keys():  # a method registered after this config was made
                return method_keys()[name].default
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _CORE_NAMES or name == "method_settings" or name not in method_keys():
            object.__setattr__(self, name, value)
        else:
            self.method_settings[name] = value

    def to_dict(self) -> dict[str, Any]:
        """Every key and its value, in the order of :func:`config_keys` (a flat mapping: what
        config.yaml holds)."""
        return {name: copy.deepcopy(getattr(self, name)) for name in config_keys()}

    @property
    def test_subset_seed(self) -> int:
        """The seed of the run's stratified test subsets: ``eval_seed``, else ``seed``."""
        return self.seed if self.eval_seed is None else self.eval_seed

    def as_flags(self) -> list[str]:
        """The command-line flags that give this config: one per key that differs from its
        default (``["--epochs", "2", "--cert-eps", "0.1,0.2"]``)."""
        flags = []
        for name, item in config_keys().items():
            value = getattr(self, name)
            if value != item.default:
                flags += ["--" + name.replace("_", "-"), _flag_text(value)]
        return flags


def _flag_text(value: Any) -> str:
    """A key's value as the command line writes it (lists comma-separated, null, true)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(_flag_text(item) for item in value)
    return str(value)


def changed_keys(saved: TrainConfig, wanted: TrainConfig) -> list[str]:
    """The keys, other than :data:`SYSTEM_KEYS`, in which two configs differ."""
    old, new = saved.to_dict(), wanted.to_dict()
    return sorted(k for k, v in new.items() if k not in SYSTEM_KEYS and old.get(k) != v)


@functools.cache
def _core_fields() -> tuple[SettingField, ...]:
    """The keys that are fields of :class:`TrainConfig`: those of every run."""
    hints = typing.get_type_hints(TrainConfig)
    return tuple(
        SettingField(item.name, hints[item.name], item.default, key, TrainConfig)
        for item in dataclasses.fields(TrainConfig)
        if (key := key_of(item)) is not None
    )


_CORE_NAMES = frozenset(item.name for item in dataclasses.fields(TrainConfig))


def method_keys() -> dict[str, SettingField]:
    """The keys of the training methods: the fields of every registered method's settings
    record, in the order of registration. The first call imports the methods (which registers
    them); importing the config does not."""
    from acert.methods import method_setting_fields

    keys = method_setting_fields()
    clash = sorted(_CORE_NAMES & set(keys))
    if clash:
        record = keys[clash[0]].record.__name__
        raise TypeError(
            f"{record}.{clash[0]} is a key of every run already (TrainConfig); rename it"
        )
    return keys


def config_keys() -> dict[str, SettingField]:
    """Every config key -> its setting: the keys of every run (the fields of
    :class:`TrainConfig`) with the methods' keys after ``method``."""
    core = {item.name: item for item in _core_fields()}
    names = list(core)
    split = names.index("method") + 1
    return {
        **{name: core[name] for name in names[:split]},
        **method_keys(),
        **{name: core[name] for name in names[split:]},
    }


def config_key(name: str) -> Key:
    """The :class:`Key` of config key ``name`` (KeyError for an unknown name)."""
    return config_keys()[name].key
