"""PGD (Madry et al. 2018) on the clipped ℓ∞ ball, as a pure function, and the attack radius.

An attack only ever finds counterexamples, so its accuracy is an upper bound on the certified
accuracy; the tests use it to try to break every certificate the project reports.
:func:`attack_radii` turns it into a per-sample upper bound on the minimal adversarial radius,
which no sound certified radius can exceed (``acert certify --attack``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from acert.bounds import as_eps
from acert.bounds.spec import other_classes
from acert.foundation.errors import AcertError

__all__ = ["AttackSearch", "attack_radii", "eval_mode", "margin_loss", "pgd_attack"]


def margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    """(B,) ``max_{t != y} z_t - z_y``; positive exactly when the prediction is wrong."""
    others = logits.gather(1, other_classes(y, logits.shape[1]))
    return others.max(1).values - logits.gather(1, y.unsqueeze(1)).squeeze(1)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block in eval mode (batch-norm running stats untouched), then restore the mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def pgd_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    steps: int = 20,
    step_size: float | Tensor | None = None,
    restarts: int = 1,
    loss: str = "margin",
    generator: torch.Generator | None = None,
) -> Tensor:
    """The most adversarial point PGD finds in ``{x' : |x' - x|_∞ <= eps} ∩ [0, 1]``.

    Args:
        model: classifier; used in its current mode.
        x: (B, ...) inputs in [0, 1].
        y: (B,) labels.
        eps: radius, a number or (B,) per sample, pixel units.
        steps: signed-gradient steps per restart.
        step_size: step length; default ``2.5 · eps / steps``.
        restarts: random starts, each uniform in the set (Madry et al.).
        loss: ``"margin"`` (``max_t z_t - z_y``) or ``"ce"`` (cross-entropy).
        generator: random source for the starts.

    Returns:
        (B, ...) the point with the largest margin loss seen (x itself included), so a
        misclassification found at any step is kept.
    """
    eps_t = as_eps(eps, x.shape[0], x).view(-1, *([1] * (x.dim() - 1)))
    alpha = 2.5 * eps_t / max(steps, 1) if step_size is None else step_size
    if isinstance(alpha, Tensor) and alpha.dim() == 1:
        alpha = alpha.view_as(eps_t)
    lower, upper = (x - eps_t).clamp(0, 1), (x + eps_t).clamp(0, 1)
    best = x.detach().clone()
    with torch.no_grad():
        best_loss = margin_loss(model(best), y)
    for _ in range(restarts):
        noise = torch.rand(x.shape, generator=generator, device="cpu").to(x.device, x.dtype)
        point = lower + noise * (upper - lower)
        for step in range(steps + 1):
            point = point.detach().requires_grad_(step < steps)
            with torch.set_grad_enabled(step < steps):
                logits = model(point)
                margins = margin_loss(logits, y)
            with torch.no_grad():
                improved = margins > best_loss
                best[improved] = point[improved].detach()
                best_loss = torch.where(improved, margins, best_loss)
            if step == steps:
                break
            objective = (
                margins.sum() if loss == "margin" else F.cross_entropy(logits, y, reduction="sum")
            )
            (grad,) = torch.autograd.grad(objective, point)
            point = torch.minimum(torch.maximum(point + alpha * grad.sign(), lower), upper)
    return best.detach()


@dataclass(frozen=True)
class AttackSearch:
    """How :func:`attack_radii` looks for the smallest flipping ε.

    Attributes:
        steps: PGD steps (margin loss) at each probed ε.
        restarts: random starts of PGD at each probed ε.
        iterations: bisection steps after the probe at the cap; the bracket of a flipped
            sample shrinks to at most ``eps_max / 2**iterations``.
    """

    steps: int = 20
    restarts: int = 3
    iterations: int = 10

    def check(self) -> None:
        """One-line :class:`AcertError` unless every setting is a positive whole number."""
        for name in ("steps", "restarts", "iterations"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AcertError(f"--attack-{name} must be a whole number >= 1, got {value!r}")


def attack_radii(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps_max: float,
    search: AttackSearch | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per sample, the smallest ℓ∞ distance at which PGD finds a misclassified input.

    Bisection on ε in [0, eps_max]: PGD (margin loss, random restarts) runs at the cap, then
    at the middle of each flipped sample's bracket. Every flip found is a concrete input of
    ``[0, 1]`` that the model misclassifies, and the radius reported is the exact distance of
    the closest one found (float64 of the float32 difference), so it is an upper bound on the
    sample's true minimal adversarial radius — and never below a sound certified radius.
    A sample misclassified clean gets 0; one that PGD never flips gets ``eps_max``, the cap
    the certified radii share.

    Args:
        model: classifier; evaluated in eval mode (its mode is restored).
        x: (B, ...) inputs in [0, 1]; y: (B,) labels.
        eps_max: cap of the search, pixel units.
        search: PGD steps, restarts and bisection steps (default :class:`AttackSearch`).
        generator: random source of the restarts (default: seeded with 0).

    Returns:
        (B,) float64 attack radii in [0, eps_max].
    """
    search = search or AttackSearch()
    generator = generator or torch.Generator().manual_seed(0)
    radius = torch.full((x.shape[0],), float(eps_max), dtype=torch.float64, device=x.device)
    with eval_mode(model):
        with torch.no_grad():
            wrong = model(x).argmax(1) != y
        radius[wrong] = 0.0
        rows = torch.nonzero(~wrong, as_tuple=True)[0]
        lo = torch.zeros_like(radius)

        def probe(rows: Tensor, eps: Tensor) -> Tensor:
            """Attack ``rows`` at ``eps``; lower their radius to each flip's distance, and
            return which flipped."""
            xs, ys = x[rows], y[rows]
            point = pgd_attack(
                model, xs, ys, eps, search.steps, restarts=search.restarts, generator=generator
            )
            with torch.no_grad():
                flipped = model(point).argmax(1) != ys
            distance = (point.double() - xs.double()).flatten(1).abs().amax(1)
            hit = rows[flipped]
            radius[hit] = torch.minimum(radius[hit], distance[flipped])
            return flipped

        rows = rows[probe(rows, radius[rows])]  # only samples flipped at the cap are bisected
        for _ in range(search.iterations):
            if rows.numel() == 0:
                break
            mid = (lo[rows] + radius[rows]) / 2
            flipped = probe(rows, mid)
            lo[rows[~flipped]] = mid[~flipped]
            lo[rows] = torch.minimum(lo[rows], radius[rows])  # a flip below lo resets it
    return radius
