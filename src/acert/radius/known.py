"""What the caller of a radius search already knows of its batch (:class:`KnownBatch`)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from acert.bounds import BatchStats
from acert.foundation.errors import AcertError

__all__ = ["KnownBatch"]


@dataclass(frozen=True)
class KnownBatch:
    """What the caller of a radius search already knows of its batch; what is None is
    computed (logits, stats) or done without (guess).

    Attributes:
        logits: (B, K) the clean logits of x (under ``stats`` where those are given).
        stats: clean-batch statistics for train-mode batch-norms (a batch-norm that normalises
            with the current batch needs them: no radius is a certificate of it otherwise).
        guess: (B,) a radius expected to be close (e.g. the sample's radius one epoch ago);
            where it lies in (0, cap) the search starts with a bracket around it, two
            evaluations at the guess and ``guess·(1 ± spread)`` (:class:`SearchSettings`),
            instead of one at the cap. Every bracket end is evaluated, so a wrong guess costs
            time, never soundness.
        beat: (B,) a radius below which the caller needs nothing (one another bound already
            certified, in a best-of cascade); where it lies in (0, cap) the search first
            evaluates the bound one tolerance above it: a sample it does not certify there
            gets radius 0 at that one evaluation, one it certifies is searched from there to
            the cap. Overrides ``guess``.
        cap_margin: (B,) where finite, the search's own margin at the cap less the floor, as
            the caller evaluated it (ACERT's training pass at the cap,
            :mod:`acert.methods.cap_first`): a sample that starts at the cap takes it instead
            of an evaluation. Only for a bound the caller computed exactly as the search would.
    """

    logits: Tensor | None = None
    stats: BatchStats | None = None
    guess: Tensor | None = None
    beat: Tensor | None = None
    cap_margin: Tensor | None = None

    def check(self, batch: int, classes: int) -> None:
        """One-line :class:`AcertError` unless logits and guess fit a batch of that size."""
        if self.logits is not None and (
            not isinstance(self.logits, Tensor) or tuple(self.logits.shape) != (batch, classes)
        ):
            raise AcertError(
                f"logits must be the ({batch}, {classes}) clean logits of x, got "
                f"{_shape(self.logits)}; pass model(x) or leave logits out"
            )
        for name in ("guess", "beat", "cap_margin"):
            radii = getattr(self, name)
            if radii is not None and (
                not isinstance(radii, Tensor)
                or tuple(radii.shape) != (batch,)
                or radii.is_complex()
            ):
                raise AcertError(
                    f"{name} must be a ({batch},) tensor of radii, one per sample, "
                    f"got {_shape(radii)}"
                )


def _shape(value: object) -> str:
    if isinstance(value, Tensor):
        return f"shape {tuple(value.shape)}"
    return type(value).__name__
