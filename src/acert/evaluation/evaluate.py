"""Clean, certified and empirical metrics of a model (docs/METHOD.md, "Certified radius and ACR").

- clean accuracy;
- per-sample certified radii (:mod:`acert.radius`) and their mean, the ACR, under the cap ε_max;
  with several bounds, per sample the largest of their radii (:func:`best_of`);
- certified accuracy at each requested ε, by one bound evaluation at that ε;
- acceps = sqrt((ACR / ε_max) · clean accuracy), the model-selection score;
- PGD accuracy at each ε, an empirical upper bound on the certified accuracy;
- :func:`attack_check`: certified radii against attack radii
(:func:`acert.radius.attacks.attack_radii`),
  an upper bound no sound certified radius exceeds.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from acert.bounds import METHODS, check_eps, check_inputs, crown, margin_bounds
from acert.bounds.arithmetic import arithmetic_record, ieee_arithmetic
from acert.foundation.errors import AcertError
from acert.foundation.ranges import PGD_STEPS, OneOf, above, at_least, between, settings_object
from acert.radius import KnownBatch, check_cap, radius_search
from acert.radius.attacks import pgd_attack

__all__ = [
    "BATCH_SIZE",
    "BOUND",
    "CROWN_MEMORY_MIB",
    "PGD_STEPS",
    "RADIUS",
    "Evaluation",
    "EvaluationSettings",
    "acceps",
    "attack_check",
    "attacked_radii",
    "best_label",
    "best_of",
    "cascade_radii",
    "check_settings",
    "evaluate",
    "float64_violations",
]


def acceps(acr: float, eps_max: float, clean_accuracy: float) -> float:
    """``sqrt((ACR / ε_max) · clean accuracy)`` (docs/METHOD.md), in [0, 1]."""
    return math.sqrt(max(acr, 0.0) / eps_max * max(clean_accuracy, 0.0))


@dataclass
class Evaluation:
    """Metrics of one model on one dataset split; accuracies are fractions in [0, 1]."""

    n: int
    bound: str
    eps_max: float
    clean_accuracy: float
    acr: float
    acceps: float
    certified_accuracy: dict[float, float]
    pgd_accuracy: dict[float, float]
    radius_evaluations: float
    radii: Tensor = field(repr=False)
    bound_radii: dict[str, Tensor] = field(default_factory=dict, repr=False)
    """Each bound's own radii when several were asked for (``radii`` is their maximum)."""
    arithmetic: dict[str, Any] = field(default_factory=dict)
    """What the certificates cover: the model computing in this dtype on this device, in IEEE
    arithmetic (:func:`acert.bounds.arithmetic.arithmetic_record`)."""

    def to_dict(self) -> dict:
        """JSON-ready metrics (radii left out)."""
        best = {"best_of": best_of(self.bound_radii)} if len(self.bound_radii) > 1 else {}
        return {
            "n": self.n,
            "bound": self.bound,
            "eps_max": self.eps_max,
            "clean_accuracy": self.clean_accuracy,
            "acr": self.acr,
            "acr_percent_of_eps_max": 100 * self.acr / self.eps_max,
            "acceps": self.acceps,
            "certified_accuracy": {
                f"{eps:.6g}": acc for eps, acc in self.certified_accuracy.items()
            },
            "pgd_accuracy": {f"{eps:.6g}": acc for eps, acc in self.pgd_accuracy.items()},
            "radius_evaluations_per_sample": self.radius_evaluations,
            **best,
            **({"arithmetic": self.arithmetic} if self.arithmetic else {}),
        }


RADIUS = between(0, 1, low_open=True, unit="pixel units")
"""A radius of the certified or PGD accuracy."""

BOUND = OneOf(lambda: sorted(METHODS))
"""A bound that certifies (:data:`acert.bounds.METHODS`; config key ``eval_bound``)."""


BATCH_SIZE = at_least(1, whole=True)
"""Samples per bound pass of an evaluation."""

CROWN_MEMORY_MIB = above(0, null="no cap")
"""Cap of each CROWN backward chunk's coefficients, MiB."""


@dataclass(frozen=True)
class EvaluationSettings:
    """What an evaluation computes and how; a bad value is refused here, when the object is made.

    Attributes:
        eps_max: cap of the radius search and of the ACR, a number in (0, 1].
        cert_eps: radii at which the certified accuracy is reported, each in (0, 1]; kept as a
            tuple, a radius given twice once.
        bounds: ``"ibp"``, ``"crown-ibp"`` or ``"crown"``, or several of them (a tuple; one
            name alone is taken as a tuple of one): then each sample's radius is the largest
            of the bounds' radii (each is sound, so their maximum is) and a sample is
            certified at ε when any of the bounds certifies it.
        pgd_eps: radii for the PGD accuracy, each in (0, 1] (None: ``cert_eps``; ``()``: none).
        pgd_steps: PGD steps (one random restart), >= 0; 0 skips the attack.
        batch_size: samples per bound pass, >= 1.
        crown_memory_mib: cap of each CROWN backward chunk's coefficients in MiB (> 0), or
            None: no cap (:func:`acert.bounds.crown.memory_budget`).
        cascade: with several bounds, search each later bound only where it can raise the
            radius (:func:`cascade_radii`): on the samples the earlier bounds leave below the
            cap, from the radius they reached. Each sample's radius is the same best-of (up to
            the search's tolerance) at a fraction of the cost; a bound's own radii
            (``bound_radii``) are then those it added, 0 where it was not searched.
    """

    eps_max: float
    cert_eps: tuple[float, ...] = ()
    bounds: tuple[str, ...] = ("ibp",)
    pgd_eps: tuple[float, ...] | None = None
    pgd_steps: int = 20
    batch_size: int = 256
    crown_memory_mib: float | None = None
    cascade: bool = False

    def __post_init__(self) -> None:
        check_cap(self.eps_max, None)
        object.__setattr__(self, "cert_eps", _radii(self.cert_eps, "cert_eps"))
        object.__setattr__(self, "bounds", _bound_names(self.bounds))
        if self.pgd_eps is not None:
            object.__setattr__(self, "pgd_eps", _radii(self.pgd_eps, "pgd_eps"))
        PGD_STEPS.check(self.pgd_steps, "pgd_steps")
        BATCH_SIZE.check(self.batch_size, "batch_size")
        CROWN_MEMORY_MIB.check(self.crown_memory_mib, "crown_memory_mib")
        if not isinstance(self.cascade, bool):
            raise AcertError(f"cascade must be True or False, got {self.cascade!r}")

    @property
    def label(self) -> str:
        """The name of the certificate (:func:`best_label` of ``bounds``)."""
        return best_label(self.bounds)

    def memory_budget(self, x: Tensor) -> contextlib.AbstractContextManager[None]:
        """The CROWN memory cap for inputs like ``x`` (a no-op without ``crown_memory_mib``)."""
        if self.crown_memory_mib is None:
            return contextlib.nullcontext()
        return crown.memory_budget(max(1, int(self.crown_memory_mib * 2**20 / x.element_size())))


def _radii(values: object, name: str) -> tuple[float, ...]:
    """``values`` as a tuple of radii in (0, 1], each once."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise AcertError(f"{name} must be a sequence of radii such as (0.1, 0.2), got {values!r}")
    radii = tuple(values)
    for eps in radii:
        check_eps(eps, name)
        if isinstance(eps, Tensor) and eps.numel() != 1:
            raise AcertError(
                f"{name} holds a tensor of shape {tuple(eps.shape)}; pass one number per radius"
            )
        RADIUS.check(float(eps), name)
    return tuple(dict.fromkeys(radii))


def _bound_names(bounds: object) -> tuple[str, ...]:
    """``bounds`` as a tuple of bound names, each once."""
    names = (bounds,) if isinstance(bounds, str) else bounds
    if not isinstance(names, Iterable) or not (names := tuple(names)):
        raise AcertError(f"bounds must name one or more of {', '.join(METHODS)}, got {bounds!r}")
    for name in names:
        BOUND.check(name, "bound")
    return tuple(dict.fromkeys(names))


def check_settings(value: object) -> EvaluationSettings:
    """``value`` if it is an :class:`EvaluationSettings`, else a one-line :class:`AcertError`."""
    return settings_object(
        value,
        EvaluationSettings,
        "settings",
        "acert.evaluation.evaluate.EvaluationSettings",
        "e.g. EvaluationSettings(eps_max=0.1, cert_eps=(0.1,))",
    )


def best_label(bounds: Sequence[str]) -> str:
    """The name of a best-of certificate: ``"best"`` over every bound of
    :data:`acert.bounds.METHODS`, else ``"best-ibp+crown"`` and the like."""
    if len(bounds) == 1:
        return bounds[0]
    if set(bounds) == set(METHODS):
        return "best"
    return "best-" + "+".join(bounds)


def best_of(bound_radii: dict[str, Tensor]) -> dict[str, Any]:
    """Which bound gave each sample its best radius, and each bound's own ACR.

    ``won[b]`` counts the samples whose radius under ``b`` is strictly larger than under
    every other bound; ``won["tie"]`` those where several share the largest (among them the
    misclassified samples, 0 under every bound, and those certified at the cap by several),
    so the counts add up to the number of samples.
    """
    names = list(bound_radii)
    stacked = torch.stack([bound_radii[name].double() for name in names])
    at_top = stacked == stacked.max(0).values
    alone = at_top.sum(0) == 1
    winners = at_top[:, alone].double().argmax(0)
    won = {name: int((winners == i).sum()) for i, name in enumerate(names)}
    won["tie"] = int((~alone).sum())
    acr = {name: stacked[i].mean().item() for i, name in enumerate(names)}
    return {"bounds": names, "won": won, "acr": acr}


def attacked_radii(
    cert_eps: Sequence[float], pgd_eps: Sequence[float] | None, pgd_steps: int
) -> list[float]:
    """The radii to report PGD accuracy at: ``pgd_eps`` (default ``cert_eps``), none without
    attack steps (an attack of 0 steps would report the clean accuracy as PGD accuracy)."""
    if pgd_steps <= 0:
        return []
    return list(dict.fromkeys(cert_eps if pgd_eps is None else pgd_eps))


def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    settings: EvaluationSettings,
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Evaluation:
    """Evaluate a model in eval mode.

    Args:
        model: a supported model (:func:`acert.bounds.margin_bounds`); put in eval mode for
            the evaluation, its layers' modes restored afterwards.
        x: (N, ...) inputs in [0, 1]; y: (N,) int64 labels; torch tensors (numpy arrays are
            refused, not converted: pass ``torch.as_tensor``). The whole data set is checked
            before any work (a bad label in the last chunk is found before the first is
            certified).
        settings: the cap, the radii, the bounds, the attack and the chunk size.
        device: where to compute.
        progress: show a progress bar.
    """
    settings = check_settings(settings)
    modes = [(module, module.training) for module in model.modules()]
    try:
        # the bounds and the forward pass whose prediction they certify, in IEEE arithmetic
        # (x is checked inside: a bad one gets its one-line error there)
        dtype = x.dtype if isinstance(x, Tensor) and x.is_floating_point() else torch.float32
        with ieee_arithmetic(dtype, device):
            return _evaluate(model.to(device).eval(), x, y, settings, device, progress)
    finally:
        for module, training in modes:
            module.training = training


def _evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    settings: EvaluationSettings,
    device: str | torch.device,
    progress: bool,
) -> Evaluation:
    check_inputs(model, x, y)
    eps_max, cert_eps, bounds = settings.eps_max, settings.cert_eps, settings.bounds
    pgd_eps = attacked_radii(cert_eps, settings.pgd_eps, settings.pgd_steps)
    batch_size = settings.batch_size
    per_bound: dict[str, list[Tensor]] = {name: [] for name in bounds}
    evaluations, correct = [], []
    certified = {eps: 0 for eps in cert_eps}
    robust = {eps: 0 for eps in pgd_eps}
    generator = torch.Generator().manual_seed(0)
    chunks = range(0, x.shape[0], batch_size)
    bar = tqdm(chunks, desc=f"certify ({settings.label})", disable=not progress, leave=False)
    with settings.memory_budget(x):
        for start in bar:
            xb = x[start : start + batch_size].to(device)
            yb = y[start : start + batch_size].to(device)
            with torch.no_grad():
                correct.append(model(xb).argmax(1) == yb)
                spent = torch.zeros(xb.shape[0], dtype=torch.float64)
                if settings.cascade:
                    found, spent = cascade_radii(model, xb, yb, eps_max, bounds)
                else:
                    found = {}
                    for name in bounds:
                        result = radius_search(model, xb, yb, eps_max, name)
                        found[name] = result.radius.cpu()
                        spent += result.evaluations.cpu()
                for name, radii in found.items():
                    per_bound[name].append(radii)
                for eps in cert_eps:
                    # a sample counts only where the model's own forward pass classifies it right
                    by_bound = _certified_by_any(model, xb, yb, eps, bounds)
                    certified[eps] += (by_bound & correct[-1]).sum().item()
            evaluations.append(spent)
            for eps in pgd_eps:
                adversarial = pgd_attack(
                    model, xb, yb, eps, steps=settings.pgd_steps, generator=generator
                )
                with torch.no_grad():
                    robust[eps] += (model(adversarial).argmax(1) == yb).sum().item()
    n = x.shape[0]
    bound_radii = {name: torch.cat(parts) for name, parts in per_bound.items()}
    radius = torch.stack(list(bound_radii.values())).max(0).values
    clean = torch.cat(correct).float().mean().item()
    acr = radius.mean().item()
    return Evaluation(
        n=n,
        bound=settings.label,
        eps_max=eps_max,
        clean_accuracy=clean,
        acr=acr,
        acceps=acceps(acr, eps_max, clean),
        certified_accuracy={eps: count / n for eps, count in certified.items()},
        pgd_accuracy={eps: count / n for eps, count in robust.items()},
        radius_evaluations=torch.cat(evaluations).float().mean().item(),
        radii=radius,
        bound_radii=bound_radii if len(bounds) > 1 else {},
        arithmetic=arithmetic_record(x.dtype, device),
    )


def cascade_radii(
    model: nn.Module, x: Tensor, y: Tensor, eps_max: float, bounds: Sequence[str]
) -> tuple[dict[str, Tensor], Tensor]:
    """Each sample's best-of radius, the bounds tried in turn, each only where it can help.

    The first bound searches every sample. A later bound skips the samples already certified
    at the cap (no radius can exceed it); where the best radius r so far lies in (0, cap) it is
    first evaluated at r and searches [r, cap] only if it certifies there (``KnownBatch.beat``),
    so a bound that cannot beat r costs one evaluation, not a search. Every radius returned is
    a point its bound certifies, so the best of them is sound, as for the full best-of.

    Returns:
        per bound its (N,) radii on the CPU (0 where it was skipped or fell below r), and the
        (N,) bound evaluations spent per sample.
    """
    found: dict[str, Tensor] = {}
    at_cap = float(torch.tensor(eps_max, dtype=x.dtype))  # a radius at the cap, as searched
    best = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    spent = torch.zeros(x.shape[0], dtype=torch.float64)
    for index, name in enumerate(bounds):
        cap = torch.full_like(best, eps_max)
        cap[best >= at_cap] = 0.0  # nothing to gain: no radius exceeds the cap
        known = KnownBatch(beat=best.to(x.dtype)) if index > 0 else None
        result = radius_search(model, x, y, cap.to(x.dtype), name, known=known)
        found[name] = result.radius.cpu()
        spent += result.evaluations.cpu().double()
        best = torch.maximum(best, result.radius.double())
    return found, spent


def _certified_by_any(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, bounds: Sequence[str]
) -> Tensor:
    """(B,) whether any of the bounds certifies each sample at eps (each bound evaluated only
    on the samples the ones before it left uncertified)."""
    certified = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for name in bounds:
        rest = torch.nonzero(~certified, as_tuple=True)[0]
        if rest.numel() == 0:
            break
        certified[rest] = margin_bounds(model, x[rest], y[rest], eps, name).min(1).values > 0
    return certified


def float64_violations(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    radii: Tensor,
    bound: str = "ibp",
    batch_size: int = 256,
) -> Tensor:
    """Indices of samples whose float32 certificate fails when recomputed in float64.

    Every positive radius is re-checked with a float64 copy of the model, inputs and radii;
    a sample violates when its float64 margin lower bound at the radius is not positive.

    Args:
        model: the model that produced the radii (not modified).
        x: (N, ...) inputs; y: (N,) labels; radii: (N,) reported radii.
        bound: the bound method the radii were computed with.
        batch_size: samples per pass.

    Returns:
        (V,) int64 indices into the N samples (empty when every certificate holds).
    """
    model64 = copy.deepcopy(model).double().eval()
    device = next(model64.parameters()).device
    bad = []
    for start in range(0, x.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        r = radii[rows].to(device, torch.float64)
        certified = r > 0
        if not certified.any():
            continue
        xb, yb = x[rows].to(device, torch.float64), y[rows].to(device)
        with torch.no_grad():
            lb = margin_bounds(model64, xb[certified], yb[certified], r[certified], bound)
        failed = torch.nonzero(certified, as_tuple=True)[0][lb.min(1).values <= 0]
        bad.append(failed.cpu() + start)
    return torch.cat(bad) if bad else torch.empty(0, dtype=torch.long)


def attack_check(certified: Tensor, attacked: Tensor, eps_max: float) -> dict[str, Any]:
    """Certified radii against attack radii, JSON-ready.

    A sound certified radius never exceeds the distance of an input the model misclassifies,
    so a sample whose attack radius lies below its certified radius (capped at ``eps_max``,
    as both are) exposes an unsound certificate or a wrong attack.

    Args:
        certified: (N,) certified radii; attacked: (N,) attack radii, pixel units.
        eps_max: the cap both share.

    Returns:
        ``acr_attack`` (mean attack radius), ``gap`` (it minus the ACR), ``violations`` (how
        many samples break the order), ``violating_samples`` (their indices) and, when there
        are any, ``worst``: the sample with the largest excess and both of its radii.
    """
    claimed = torch.clamp(certified.double().cpu(), max=eps_max)
    attacked = attacked.double().cpu()
    excess = claimed - attacked
    bad = torch.nonzero(excess > 0, as_tuple=True)[0]
    check: dict[str, Any] = {
        "acr_attack": attacked.mean().item(),
        "gap": (attacked - certified.double().cpu()).mean().item(),
        "violations": int(bad.numel()),
        "violating_samples": bad.tolist(),
    }
    if bad.numel():
        worst = int(excess.argmax())
        check["worst"] = {
            "sample": worst,
            "certified": certified[worst].item(),
            "attack": attacked[worst].item(),
        }
    return check
