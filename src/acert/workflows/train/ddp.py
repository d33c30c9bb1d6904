"""The loss a training step differentiates, wrapped so that several processes average its
gradients (``DistributedDataParallel``); :func:`acert.workflows.train.run.fit` calls it."""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import nn

from acert.foundation.process_group import World
from acert.methods import Batch, LossTerms, Step, TrainingMethod

__all__ = ["distributed_loss"]


class _MethodLoss(nn.Module):
    """A method's loss as the forward pass of a module that owns the model's parameters."""

    def __init__(self, model: nn.Module, method: TrainingMethod) -> None:
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, batch: Batch, step: Step) -> LossTerms:
        return self.method.loss(self.model, batch, step)


def distributed_loss(
    model: nn.Module, method: TrainingMethod, world: World
) -> Callable[[Batch, Step], LossTerms]:
    """``loss(batch, step) -> LossTerms``; across processes, one that averages the gradients.

    ``DistributedDataParallel`` prepares its gradient reducer in its forward pass, and a method
    runs the model layer by layer (clean pass, bound passes), not through ``model(x)``; so the
    whole ``method.loss`` is the forward pass of the wrapped module, and every parameter the
    loss touches, in any pass, is reduced. The model is used, not copied.
    """
    if not world.enabled:
        return functools.partial(method.loss, model)
    # device_ids=None: the batches are already on the model's device (cpu or cuda:LOCAL_RANK)
    return nn.parallel.DistributedDataParallel(_MethodLoss(model, method), device_ids=None)
