"""PGD (Madry et al. 2018) on the clipped ℓ∞ ball, as a pure function.

An attack only ever finds counterexamples, so its accuracy is an upper bound on the certified
accuracy; the tests use it to try to break every certificate the project reports.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from acert.bounds import as_eps
from acert.bounds.spec import other_classes

__all__ = ["eval_mode", "margin_loss", "pgd_attack"]


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
