"""The table of layer kinds, and the one walk over a model that every bound method follows.

:data:`LAYER_KINDS` holds every module type the bounds support, each with its rules for IBP,
CROWN (dense and on patches), the rounding of CROWN's backward steps, its output shape and its
checks (:class:`acert.bounds.steps.LayerKind`). :func:`walk` turns a model into steps: one per
layer, a batch-norm folded into the Linear/Conv2d before it, a residual block as a fork, its
body's steps and a join. IBP (:mod:`acert.bounds.ibp`), CROWN (:mod:`acert.bounds.crown`),
the patch pass (:mod:`acert.bounds.patches`) and the rounding bounds
(:mod:`acert.bounds.rounding`) all iterate these steps and dispatch on ``step.kind``; the list
of supported layers and the refusal of any other module come from the table too, and the walk
refuses an in-place layer whose write the forward pass would observe (:func:`_check_overwrite`).
docs/ARCHITECTURE.md, "Layer kinds", shows what adding a kind takes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from torch import nn

from acert.bounds.activations import DROPOUT, FLATTEN, IDENTITY, RELU
from acert.bounds.affine import CONV2D, LINEAR
from acert.bounds.normalisation import BATCHNORM1D, BATCHNORM2D, NORMALIZE
from acert.bounds.pooling import AVGPOOL2D, MAXPOOL2D
from acert.bounds.residual import RESIDUAL
from acert.bounds.steps import LayerKind, Step
from acert.foundation.errors import AcertError, UnsupportedModelError

__all__ = [
    "LAYER_KINDS",
    "SUPPORTED_LAYERS",
    "check_certifiable",
    "check_shapes",
    "check_supported",
    "kind_of",
    "walk",
]

LAYER_KINDS: tuple[LayerKind, ...] = (
    NORMALIZE,
    CONV2D,
    LINEAR,
    BATCHNORM1D,
    BATCHNORM2D,
    RELU,
    FLATTEN,
    AVGPOOL2D,
    MAXPOOL2D,
    IDENTITY,
    DROPOUT,
    RESIDUAL,
)
"""Every layer kind the bounds support; a new kind is one entry here."""

SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = tuple(kind.type for kind in LAYER_KINDS)

_KINDS: dict[type[nn.Module], LayerKind] = {kind.type: kind for kind in LAYER_KINDS}
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def kind_of(layer: nn.Module, where: str = "?") -> LayerKind:
    """The table's entry for ``layer``'s exact type (a subclass may override forward), else a
    one-line :class:`UnsupportedModelError` naming ``where`` and the supported layers."""
    kind = _KINDS.get(type(layer))
    if kind is None:
        names = ", ".join(t.__name__ for t in SUPPORTED_LAYERS)
        raise UnsupportedModelError(
            f"layer {where} ({type(layer).__name__}) has no bound rule; "
            f"supported layers are {names}"
        )
    return kind


def walk(layers: Iterable[nn.Module]) -> tuple[Step, ...]:
    """The steps of a chain of layers (:class:`acert.bounds.steps.Step`), in forward order.

    A batch-norm right after a kind that folds one (Linear, Conv2d) becomes that step's
    ``norm``; a residual block becomes a fork step, the steps of its body and a join step.
    Raises a one-line :class:`UnsupportedModelError` for a module without a kind, one its
    kind's check refuses, and an in-place layer whose write the forward pass can observe
    (:func:`_check_overwrite`).
    """
    steps: list[Step] = []
    _walk(list(layers), "", steps, (_MODEL_INPUT,))
    return tuple(steps)


_MODEL_INPUT = "the model's input (which the caller, the bounds and the attacks read again)"


def _walk(
    layers: list[nn.Module], prefix: str, steps: list[Step], readers: tuple[str, ...]
) -> tuple[str, ...]:
    """Append the steps of ``layers``; ``readers``: who reads the tensor the first layer gets
    after that layer has run (see :func:`_check_overwrite`). Returns the readers of the
    tensor the last layer gives."""
    position = 0
    while position < len(layers):
        layer, where = layers[position], f"{prefix}{position}"
        kind = kind_of(layer, where)
        if kind.check is not None and (problem := kind.check(layer)) is not None:
            raise UnsupportedModelError(f"layer {where} ({kind.name}) {problem}")
        _check_overwrite(layer, kind, where, readers)
        position += 1
        if kind.body is not None:
            fork = len(steps)
            steps.append(Step(fork, layer, kind))  # replaced once its join's index is known
            skip = f"the input of residual block {where}, which its sum x + body(x) reads again"
            _walk(list(getattr(layer, kind.body)), f"{where}.{kind.body}.", steps, (*readers, skip))
            join = len(steps)
            steps[fork] = Step(fork, layer, kind.fork or kind, None, where, join)
            steps.append(Step(join, layer, kind, None, where, fork))
            readers = ()  # the sum is a new tensor
            continue
        following = layers[position] if position < len(layers) else None
        norm = following if kind.folds_batchnorm and type(following) in _BATCHNORMS else None
        position += norm is not None
        steps.append(Step(len(steps), layer, kind, norm, where))
        readers = _readers_after(layer, kind, where, readers, norm is not None)
    return readers


def _writes_in_place(layer: nn.Module) -> bool:
    return bool(getattr(layer, "inplace", False))


def _readers_after(
    layer: nn.Module, kind: LayerKind, where: str, readers: tuple[str, ...], folded: bool
) -> tuple[str, ...]:
    """Who reads the layer's output again: its input's readers where the output may be the
    input itself or a view of it (``LayerKind.aliases``, an in-place layer), and autograd,
    which keeps a ReLU's output to compute its gradient."""
    if kind.type is nn.ReLU:
        kept = f"the output of layer {where} (ReLU), which autograd keeps for its gradient"
        return (*readers, kept) if _writes_in_place(layer) else (kept,)
    if not folded and (kind.aliases or _writes_in_place(layer)):
        return readers
    return ()


def _check_overwrite(
    layer: nn.Module, kind: LayerKind, where: str, readers: tuple[str, ...]
) -> None:
    """Refuse an in-place layer (``inplace=True``) whose input is read again after it wrote it:
    the model's input, a residual block's input (``x + body(x)`` would add the overwritten x:
    the model computes ``relu(x) + body(relu(x))``, the bounds ``x + body(relu(x))``), or a
    ReLU's output, which autograd keeps; directly or through layers that pass their input on
    as it is or as a view (Identity, Dropout, Flatten). Elsewhere (a ReLU right after a
    Conv2d, a batch-norm or a sum) the write is exact: no one reads the old values."""
    if not _writes_in_place(layer) or not readers:
        return
    arguments = f"{layer.p}, " if isinstance(layer, nn.Dropout) else ""
    raise UnsupportedModelError(
        f"layer {where} ({kind.name}(inplace=True)) overwrites {readers[-1]}, so the model "
        f"computes another function than the chain of its layers; use nn.{kind.name}"
        f"({arguments.rstrip(', ')}) instead of nn.{kind.name}({arguments}inplace=True)"
    )


def _modules(step: Step) -> Iterator[tuple[nn.Module, str]]:
    """The step's layer and its folded batch-norm, each with its name in the model."""
    yield step.layer, step.where
    if step.norm is not None:
        head, _, last = step.where.rpartition(".")
        yield step.norm, f"{head}.{int(last) + 1}" if head else str(int(last) + 1)


def check_supported(model: nn.Module) -> nn.Sequential:
    """Return ``model`` if the bounds have a rule for each of its layers, else raise a one-line
    :class:`UnsupportedModelError`.

    The model must be a plain ``nn.Sequential`` that computes the chain of its layers (no
    ``forward`` of its own or hooks, on it or any module in it), every layer with a kind in
    the table that accepts it, and the last layer ``nn.Linear`` (the margin specification is
    folded into it).
    """
    if not isinstance(model, nn.Sequential) or len(model) == 0:
        raise UnsupportedModelError(
            f"bounds need a non-empty torch.nn.Sequential, got {type(model).__name__}; "
            "build the model from acert.models or as nn.Sequential(Normalize(...), ...)"
        )
    _check_computes_its_layers(model)
    walk(model)
    if not isinstance(model[-1], nn.Linear):
        raise UnsupportedModelError(
            f"the last layer must be nn.Linear (the margin specification is folded into it), "
            f"got {type(model[-1]).__name__}"
        )
    return model


def _check_computes_its_layers(model: nn.Sequential) -> None:
    """Refuse a model whose forward pass is not the chain of its layers: the bounds follow the
    layers, so a ``forward`` of its own (a subclass's, or one set on the instance) or a hook
    that changes inputs or outputs would make them bound another function than the model's."""
    name = type(model).__name__
    if type(model).forward is not nn.Sequential.forward or "forward" in vars(model):
        raise UnsupportedModelError(
            f"{name} defines its own forward, which the bounds cannot follow; certify an "
            "nn.Sequential of its layers (nn.Sequential(*model)) that computes the same function"
        )
    hooked = [
        f"{f'layer {where}' if where else 'the model'} ({type(module).__name__})"
        for where, module in model.named_modules()
        if module._forward_hooks or module._forward_pre_hooks or "forward" in vars(module)
    ]
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        hooked.append("every module (a global forward hook)")
    if hooked:
        raise UnsupportedModelError(
            f"forward hooks or a replaced forward on {', '.join(hooked)} change what the model "
            "computes, which the bounds cannot follow; remove them (handle.remove()) first"
        )


def check_certifiable(model: nn.Sequential) -> None:
    """Refuse layers whose current mode makes ``model(x)`` no function of x alone (each kind's
    ``certify_check``: a batch-norm that normalises with the current batch, Dropout in train
    mode); training objectives, which pass clean-batch statistics, do not call this."""
    for step in walk(model):
        for module, where in _modules(step):
            kind = kind_of(module, where)
            if kind.certify_check is not None and (problem := kind.certify_check(module)):
                raise UnsupportedModelError(f"layer {where} ({kind.name}) {problem}")


_RANK_HINTS = {
    2: "not (B, D); a Flatten is missing before layer {where}",
    4: "not (B, C, H, W); pass images of shape (B, C, H, W) and flatten only after the last "
    "convolution",
}


def check_shapes(model: nn.Sequential, shape: tuple[int, ...]) -> None:
    """One-line :class:`AcertError` unless each layer gets a tensor of the rank its kind takes
    (Linear a (B, D) one, Conv2d, BatchNorm2d and the poolings a (B, C, H, W) one) and every
    residual block's body keeps the shape of its input, for inputs of ``shape`` (no batch)."""
    forks: dict[int, tuple[int, ...]] = {}
    for step in walk(model):
        if step.role == "fork":
            forks[step.index] = shape
        if step.role == "join" and shape != forks[step.partner]:
            raise AcertError(
                f"layer {step.where} (Residual) adds its body's output of shape {shape} to its "
                f"input of shape {forks[step.partner]}; the body must keep the shape of its input"
            )
        modules = list(_modules(step))
        _check_rank(*modules[0], shape)
        shape = tuple(step.kind.shape(step.layer, shape))
        for module, where in modules[1:]:
            _check_rank(module, where, shape)


def _check_rank(module: nn.Module, where: str, shape: tuple[int, ...]) -> None:
    rank = kind_of(module, where).input_rank
    if rank is not None and len(shape) + 1 != rank:
        hint = _RANK_HINTS.get(rank, f"not a {rank}-D one").format(where=where)
        raise AcertError(
            f"layer {where} ({type(module).__name__}) gets a {len(shape) + 1}-D tensor, {hint}"
        )
