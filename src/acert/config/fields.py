"""The config keys: one field each, and beside it its meaning and allowed values.

Each field of :class:`TrainConfig` is made by :func:`key`, which keeps the key's help text and
its :mod:`rule <acert.foundation.ranges>` in the field's metadata. ``acert train --help``, the
validation of a resolved config (:func:`acert.config.validate`) and docs/CONFIG.md
(:func:`acert.config.markdown_table`) all read them from there. A rule that an object API users
build also checks (the training attack, the radius search) is that object's own rule object,
imported here, so the two checks are one.
"""

from __future__ import annotations

import dataclasses
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
    Rule,
    above,
    at_least,
    between,
)
from acert.models import INITS

# the rules of bounds and radius searches, read where those registries are, when first used
BOUND = Deferred("acert.evaluation.evaluate", "BOUND")
STRATEGY = Deferred("acert.radius.settings", "STRATEGY")

__all__ = [
    "GIVEN_METHOD",
    "GIVEN_MODEL",
    "LOGGERS",
    "SYSTEM_KEYS",
    "Key",
    "TrainConfig",
    "changed_keys",
    "config_key",
    "key",
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


@dataclass(frozen=True)
class Key:
    """What a config key means and what it may hold.

    Attributes:
        help: the meaning, one sentence (``--help`` and docs/CONFIG.md).
        rule: the allowed values, checked by :func:`acert.config.validate` on a resolved
            config; None: any value of the field's type (checks between keys aside).
    """

    help: str
    rule: Rule | None = None


_METADATA = "acert"


def key(default: Any, help: str, rule: Rule | None = None) -> Any:
    """A config field with ``default``, its help text and its rule."""
    return field(default=default, metadata={_METADATA: Key(help, rule)})


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


def _adaptive_bound(value: Any) -> None:
    if value is not None:
        OneOf(("ibp", "crown-ibp")).check(value, "adaptive_bound")


def _methods() -> list[str]:
    from acert.methods import list_methods

    return [*list_methods(), GIVEN_METHOD]


_UNIT = between(0, 1)
"""Weights and fractions."""

_PIXEL_EPS = between(0, 1, low_open=True, unit="pixel units")
"""A radius ε of the ℓ∞ ball."""


@dataclass
class TrainConfig:
    """Everything a training run depends on. Pixel units for every ε; a key left ``None``
    (null) takes the dataset's preset when the config is resolved, unless its help says what
    null means."""

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
    # method and its knobs
    method: str = key(
        "acert",
        "the training method (docs/METHOD.md, 'Training loss' and 'Baselines')",
        _MethodName(
            _methods, "a method of `acert list`; given for a method object given to acert.fit"
        ),
    )
    kappa: float = key(
        0.0,
        "weight κ of the clean loss in (1-κ)·L_rob + κ·L_std, the trade-off knob of ACERT, "
        "IBP and CROWN-IBP (docs/METHOD.md, Step 5)",
        _UNIT,
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
    radius_search: str = key(
        "brent", "search of ACERT's training radii (docs/METHOD.md, Step 3)", STRATEGY
    )
    radius_max_iter: int = key(
        10,
        "evaluations of ACERT's training radius search after the one at the cap",
        at_least(1, whole=True),
    )
    radius_rtol: float = key(
        1e-4,
        "relative tolerance of ACERT's training radius search: a sample stops once its bracket "
        "is within rtol of its radius (docs/METHOD.md, Step 3; docs/PERFORMANCE.md, "
        "'The training search: cost against benefit')",
        at_least(0),
    )
    radius_warm_start: bool = key(
        True, "start each sample's ACERT radius search from its radius of the last epoch"
    )
    adaptive_bound: str | None = key(
        None,
        "the bound of the training radius search of the adaptive-<base> methods (docs/METHOD.md, "
        "'Adaptive radii for every certified loss')",
        Parsed(
            _adaptive_bound,
            "ibp, crown-ibp, or null: the base's (crown-ibp for adaptive-crown-ibp, else ibp)",
        ),
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
    sabr_lambda: float = key(
        0.4, "λ of SABR and STAPS: the radius of the propagated box as a fraction of ε", _UNIT
    )
    mtl_alpha: float = key(0.5, "α of MTL-IBP: the loss α·L_IBP + (1-α)·L_adv", _UNIT)
    cc_alpha: float = key(
        0.5, "α of CC-IBP: the robust CE of the margins (1-α)·m_adv + α·m_IBP", _UNIT
    )
    exp_alpha: float = key(0.5, "α of EXP-IBP: the loss L_adv^(1-α) · L_IBP^α", _UNIT)
    taps_head: int = key(
        4,
        "TAPS/STAPS split: the model's last layers that form the PGD-searched head (fewer "
        "than the model's layers, checked when the method is built)",
        at_least(1, whole=True),
    )
    taps_grad_scale: float = key(
        4.0, "TAPS/STAPS factor w on the gradient of L_TAPS in L_TAPS · L_IBP", above(0)
    )
    taps_connector: float = key(
        0.5,
        "TAPS/STAPS gradient connector c: the share of the latent box's width at each end",
        between(0, 1, low_open=True),
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
        "accuracy; comma-separated on the command line",
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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def test_subset_seed(self) -> int:
        """The seed of the run's stratified test subsets: ``eval_seed``, else ``seed``."""
        return self.seed if self.eval_seed is None else self.eval_seed

    def as_flags(self) -> list[str]:
        """The command-line flags that give this config: one per key that differs from its
        default (``["--epochs", "2", "--cert-eps", "0.1,0.2"]``)."""
        flags = []
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            has_default = item.default is not dataclasses.MISSING
            default = item.default if has_default else item.default_factory()  # type: ignore[misc]
            if value != default:
                flags += ["--" + item.name.replace("_", "-"), _flag_text(value)]
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


def config_key(name: str) -> Key:
    """The :class:`Key` of config key ``name`` (KeyError for an unknown name)."""
    return _KEYS[name]


_KEYS: dict[str, Key] = {f.name: f.metadata[_METADATA] for f in dataclasses.fields(TrainConfig)}
