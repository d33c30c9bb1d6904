"""Adaptive radii for every certified loss (this project's extension, not in the paper).

ACERT trains each sample at its own certified radius with the IBP loss. :class:`Adaptive` does
the same for any method with a certified loss (:class:`~acert.methods.base.CertifiedLoss`):
ACERT's step 3 — the radius search capped at ε_s, without gradients, warm-started from the
:class:`~acert.methods.acert.RadiusMemory` — gives the radii r_i, and the base method's own loss
is evaluated at them (docs/METHOD.md, "Adaptive radii for every certified loss"). κ is the
base's own clean weight where it has one (IBP, CROWN-IBP), else the wrapper's
``(1-κ)·L_base(r) + κ·L_std``. ``adaptive-<base>`` is registered for every certified baseline;
``Adaptive(IBP(kappa=κ))`` is ACERT, to the bit (tests/methods/test_adaptive.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch.nn.functional as F
from torch import nn

from acert.bounds import clean_forward
from acert.foundation.errors import ConfigError
from acert.foundation.ranges import OneOf, Parsed
from acert.foundation.settings import setting

# the bases register themselves when imported; _register below reads their entries
from acert.methods import cc_ibp, crown_ibp, exp_ibp, mtl_ibp, sabr, staps, taps  # noqa: F401
from acert.methods.acert import ACERTSettings, RadiusMemory, adaptive_radii
from acert.methods.base import (
    MIN_WARMUP_EPS,
    Batch,
    CertifiedLoss,
    LossTerms,
    Step,
    standard_phase_terms,
    with_warmup,
)
from acert.methods.registry import TRAINING_METHODS, register_method
from acert.radius import TRAINING_SEARCH, SearchSettings
from acert.radius.settings import check_settings

__all__ = [
    "ADAPTIVE_BASES",
    "SEARCH_BOUNDS",
    "Adaptive",
    "AdaptiveSettings",
    "check_adaptive_name",
]

ADAPTIVE_BASES = ("crown-ibp", "sabr", "mtl-ibp", "cc-ibp", "exp-ibp", "taps", "staps")
"""The certified methods registered as ``adaptive-<base>``; IBP's adaptive version is ``acert``."""

SEARCH_BOUNDS = ("ibp", "crown-ibp")
"""Bounds the training radius search may use (config key ``adaptive_bound``)."""

PREFIX = "adaptive-"


def _search_bound(value: Any) -> None:
    if value is not None:
        OneOf(SEARCH_BOUNDS).check(value, "adaptive_bound")


@dataclass(frozen=True)
class AdaptiveSettings(ACERTSettings):
    """The config keys of every ``adaptive-<base>``: ACERT's (κ, the training search) and the
    search's bound; the base's own keys are the base's record's."""

    adaptive_bound: str | None = setting(
        None,
        "the bound of the training radius search of the adaptive-<base> methods (docs/METHOD.md, "
        "'Adaptive radii for every certified loss')",
        Parsed(
            _search_bound,
            "ibp, crown-ibp, or null: the base's (crown-ibp for adaptive-crown-ibp, else ibp)",
        ),
    )


@dataclass
class Adaptive:
    """The loss of ``base`` at each sample's adaptive radius; L_std and the warm-up
    regularisers while ε_s = 0.

    Attributes:
        base: a method with a certified loss (``robust_terms``), e.g. ``TAPS()``.
        kappa: weight κ of the clean loss where the base has none (``(1-κ)·L_base + κ·L_std``);
            for IBP and CROWN-IBP the base's own κ applies and this one is unused.
        search: the training radius search (ACERT's, :data:`acert.radius.TRAINING_SEARCH`).
        bound: the bound the search certifies with, ``"ibp"`` or ``"crown-ibp"``.
        min_warmup_eps: floor of the radii during warm-up (1e-6).
        memory: last radius per training sample for warm starts (None: cold searches).
    """

    base: CertifiedLoss
    kappa: float = 0.0
    search: SearchSettings = TRAINING_SEARCH
    bound: str = "ibp"
    min_warmup_eps: float = MIN_WARMUP_EPS
    memory: RadiusMemory | None = field(default_factory=RadiusMemory)
    name: ClassVar[str] = "adaptive"
    base_name: ClassVar[str] = ""
    """The registered base method of a registered ``adaptive-<base>`` class."""
    default_bound: ClassVar[str] = "ibp"
    """The search's bound when the config's ``adaptive_bound`` is null (docs/PERFORMANCE.md,
    "Adaptive radii: the search's bound")."""

    @classmethod
    def from_config(cls, config: Any) -> Adaptive:
        """The base method of ``cls.base_name`` from the same config, κ, the training search,
        its bound (``adaptive_bound``) and the warm starts."""
        settings = AdaptiveSettings.read(config)
        return cls(
            base=TRAINING_METHODS[cls.base_name].from_config(config),
            kappa=settings.kappa,
            search=settings.search(),
            bound=settings.adaptive_bound or cls.default_bound,
            memory=settings.memory(),
        )

    def __post_init__(self) -> None:
        check_settings(self.search, "search")
        if self.bound not in SEARCH_BOUNDS:
            raise ConfigError(
                f"the adaptive radius search takes one of {', '.join(SEARCH_BOUNDS)}, "
                f"got {self.bound!r}"
            )

    def loss(self, model: nn.Module, batch: Batch, step: Step) -> LossTerms:
        """docs/METHOD.md, "Adaptive radii for every certified loss"."""
        check_model = getattr(self.base, "check_model", None)
        if check_model is not None:
            check_model(model)
        regularizer = self.base.regularizer
        logits, stats = clean_forward(model, batch.x)
        if step.eps == 0:
            return standard_phase_terms(
                model, batch, logits, stats, step, regularizer, self.min_warmup_eps
            )
        fraction = self.searched_fraction
        searched = step if fraction == 1 else dataclasses.replace(step, eps=fraction * step.eps)
        radii, evaluations = adaptive_radii(
            model,
            batch,
            searched,
            logits,
            stats,
            self.search,
            self.memory,
            self.min_warmup_eps,
            self.bound,
        )
        if fraction != 1:  # the ball whose small box the search certified, within the cap
            radii = (radii / fraction).clamp(max=step.eps)
        terms, bounds = self.base.robust_terms(model, batch, step, logits, stats, radii)
        if not self.base.owns_kappa and self.kappa > 0:
            loss_std = F.cross_entropy(logits, batch.y)
            mixed = (1 - self.kappa) * terms.loss + self.kappa * loss_std
            terms = LossTerms(mixed, logits, terms.metrics)
        terms.metrics["radius"] = radii.mean().item()
        terms = with_warmup(terms, regularizer, model, bounds, stats, step)
        terms.metrics.setdefault("certified", bounds.certified)
        terms.metrics["radius_evals"] = evaluations
        terms.radii = radii.detach()
        return terms

    @property
    def searched_fraction(self) -> float:
        """λ for a base that bounds a small box of half-width λ·ε (SABR, STAPS), else 1: the
        search certifies the box centred at the clean point, so that ε_i is the largest radius
        whose small box the search's bound certifies (docs/METHOD.md (M29))."""
        return float(getattr(self.base, "lam", 1.0))

    def state_dict(self) -> dict:
        return {} if self.memory is None else {"radius_memory": self.memory.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.memory is not None and "radius_memory" in state:
            self.memory.load_state_dict(state["radius_memory"])


def _register(base: str, default_bound: str = "ibp") -> type[Adaptive]:
    """The class of ``adaptive-<base>``, registered with κ and the base's knobs."""
    class_name = "Adaptive" + "".join(part.upper() for part in base.split("-"))
    attributes = {"base_name": base, "default_bound": default_bound, "__module__": __name__}
    adaptive = type(class_name, (Adaptive,), attributes)
    knobs = {"kappa": "κ", **TRAINING_METHODS[base].knobs}
    return register_method(PREFIX + base, knobs=knobs, settings=AdaptiveSettings)(adaptive)


# trained on CROWN-IBP margins, searched with them: +25% CROWN-IBP ACR for ~2x the step
AdaptiveCROWNIBP = _register("crown-ibp", default_bound="crown-ibp")
AdaptiveSABR = _register("sabr")
AdaptiveMTLIBP = _register("mtl-ibp")
AdaptiveCCIBP = _register("cc-ibp")
AdaptiveEXPIBP = _register("exp-ibp")
AdaptiveTAPS = _register("taps")
AdaptiveSTAPS = _register("staps")


def check_adaptive_name(name: str) -> None:
    """A one-line ConfigError for ``adaptive-<base>`` where the base has no certified loss."""
    if not name.startswith(PREFIX) or name in TRAINING_METHODS:
        return
    base = name[len(PREFIX) :]
    taken = ", ".join(PREFIX + known for known in ADAPTIVE_BASES)
    reason = (
        "adaptive IBP is the method acert"
        if base == "ibp"
        else f"{base} has no certified loss to train at adaptive radii"
    )
    raise ConfigError(
        f"unknown method {name!r}: {reason}; the methods with adaptive radii are acert, {taken}"
    )
