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

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from acert.bounds import check_inputs, margin_bounds
from acert.bounds.arithmetic import arithmetic_record, ieee_arithmetic
from acert.evaluation.best import best_of, cascade_radii, certified_by_any
from acert.evaluation.settings import (
    BATCH_SIZE,
    BOUND,
    CROWN_MEMORY_MIB,
    RADIUS,
    EvaluationSettings,
    best_label,
    check_settings,
)
from acert.foundation.ranges import PGD_STEPS
from acert.radius import radius_search
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
                    by_bound = certified_by_any(model, xb, yb, eps, bounds)
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
