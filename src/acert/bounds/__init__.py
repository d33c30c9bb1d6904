"""Sound bounds on the classification margins of feed-forward ReLU networks.

``margin_bounds(model, x, y, eps, method)`` returns lower bounds of ``f_y - f_t`` for every
t != y over the ℓ∞ ball of radius eps (pixel units, per sample) clipped to [0, 1]:

- ``"ibp"``: interval bound propagation (Gowal et al. 2019), :mod:`acert.bounds.ibp`;
- ``"crown-ibp"``: IBP intermediate bounds, CROWN backward pass from the output (Zhang et al. 2020);
- ``"crown"``: CROWN for every layer (Zhang et al. 2018), :mod:`acert.bounds.crown`.
"""

from __future__ import annotations

import copy
import itertools
import numbers
from collections.abc import Callable

import torch
from torch import Tensor, nn

from acert.bounds import crown, ibp
from acert.bounds.arithmetic import ieee_arithmetic
from acert.bounds.clean_pass import (
    BatchStats,
    check_fixed_normalisation,
    check_supported,
    clean_forward,
)
from acert.bounds.interval import Interval, as_eps, input_box
from acert.bounds.kinds import LAYER_KINDS, check_shapes, output_shapes, register_kind, walk
from acert.bounds.spec import margin_matrix, other_classes
from acert.bounds.tracing import bounds_form, last_layer
from acert.foundation.errors import AcertError
from acert.models.graph import INPUT

__all__ = [
    "CERTIFIED_DTYPES",
    "LAYER_KINDS",
    "METHODS",
    "BatchStats",
    "Interval",
    "MarginEvaluator",
    "as_eps",
    "bounds_form",
    "check_arithmetic",
    "check_batch",
    "check_eps",
    "check_input_dtype",
    "check_inputs",
    "check_model_input",
    "clean_forward",
    "input_box",
    "margin_bounds",
    "margin_bounds_on_box",
    "margin_evaluator",
    "margin_matrix",
    "model_dtype",
    "other_classes",
    "register_kind",
]


MarginEvaluator = Callable[[Interval, Tensor], Tensor]
"""``evaluate(box, y)``: (B, K-1) margin lower bounds of the boxes (B, ...) for labels y (B,)."""


def _ibp(model: nn.Module, stats: BatchStats | None, sound: bool) -> MarginEvaluator:
    head, last = ibp.prepare_head(model, stats, sound)
    return lambda box, y: ibp.last_layer_margins(last, head(box)[0], y, sound)


def _crown_ibp(model: nn.Module, stats: BatchStats | None, sound: bool) -> MarginEvaluator:
    return lambda box, y: crown.crown_margins(model, box, y, stats, intermediate="ibp", sound=sound)


def _crown(model: nn.Module, stats: BatchStats | None, sound: bool) -> MarginEvaluator:
    return lambda box, y: crown.crown_margins(
        model, box, y, stats, intermediate="crown", sound=sound
    )


Method = Callable[[nn.Module, "BatchStats | None", bool], MarginEvaluator]
"""``method(form, stats, sound)``: the method's evaluator for that network (its bounds form,
:func:`bounds_form`) and statistics."""
METHODS: dict[str, Method] = {
    "ibp": _ibp,
    "crown-ibp": _crown_ibp,
    "crown": _crown,
}


def check_inputs(model: nn.Module, x: Tensor, y: Tensor, runs: bool = True) -> nn.Module:
    """The model's bounds form (:func:`bounds_form`: itself, or its traced graph), or a
    one-line :class:`AcertError` unless x, y fit a supported model.

    The public entry points (:func:`margin_bounds`, :func:`acert.radius.radius_search`,
    :func:`acert.evaluation.evaluate.evaluate`) take torch tensors only: numpy arrays and lists are
    refused, not converted, so that no dtype or device is chosen silently. ``runs=False``
    leaves out running the layers on the input's shape (:func:`check_model_input`, some
    milliseconds), for a caller that runs the model on x itself before any bound.
    """
    if not (isinstance(x, Tensor) and x.dim() >= 2):
        check_batch(x, y)  # its one-line error: without x's shape no model can be traced
    model = bounds_form(model, tuple(x.shape[1:]))
    check_supported(model)
    check_batch(x, y)
    num_classes = last_layer(model).out_features
    if num_classes < 2:
        raise AcertError(
            f"the model has {num_classes} output{'s' * (num_classes != 1)}; certification "
            "needs >= 2 classes "
            "(a margin is the true logit minus another class's)"
        )
    dtype = check_input_dtype(model, x)
    if runs:
        check_model_input(model, tuple(x.shape[1:]), dtype)
    else:
        check_shapes(model, tuple(x.shape[1:]))
    if not torch.isfinite(x).all():
        raise AcertError("inputs contain NaN or inf; clean the data before computing bounds")
    if x.min() < 0 or x.max() > 1:
        raise AcertError(
            f"inputs must be pixels in [0, 1], got values in [{x.min().item():.4g}, "
            f"{x.max().item():.4g}]; normalisation belongs in the model's Normalize layer"
        )
    if y.min() < 0 or y.max() >= num_classes:
        raise AcertError(
            f"labels must lie in [0, {num_classes}), got {y.min().item()}..{y.max().item()}"
        )
    return model


_LABEL_DTYPES = (torch.int64, torch.int32)


def check_batch(x: object, y: object) -> None:
    """One-line :class:`AcertError` unless x is a (B, ...) and y a (B,) tensor of integer
    labels with B >= 1: what every entry point needs before it looks at the model."""
    for name, value in (("x", x), ("y", y)):
        if not isinstance(value, Tensor):
            raise AcertError(
                f"{name} must be a torch.Tensor, got {_type_name(value)}; "
                f"pass torch.as_tensor({name}) (numpy arrays and lists are not converted)"
            )
    if x.dim() < 2 or y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise AcertError(
            f"x must be (B, ...) and y (B,), got x {tuple(x.shape)} and y {tuple(y.shape)}"
        )
    if x.shape[0] == 0:
        raise AcertError("x and y hold no samples (an empty batch); pass at least one input")
    if not x.is_floating_point():
        raise AcertError(f"inputs must be floating-point pixels in [0, 1], got {x.dtype}")
    if y.dtype not in _LABEL_DTYPES:
        raise AcertError(
            f"labels must be integer class indices (int64), got {y.dtype}; pass y.long()"
        )


CERTIFIED_DTYPES = (torch.float32, torch.float64)
"""The dtypes a model certifies in: the rounding allowances (:mod:`acert.bounds.allowances`) take
their unit roundoff and underflow floor from the dtype, but rest on γ_n = n·u staying far
below 1 and on a range that inputs' products cannot leave, which float16 and bfloat16
(u = 2⁻¹¹, 2⁻⁸; a 784-term sum already has n·u > 1 in bfloat16) do not give."""


def model_dtype(model: nn.Module, default: torch.dtype = torch.float32) -> torch.dtype:
    """The one dtype of the model's floating-point parameters and buffers (``default`` when it
    has none), or a one-line :class:`AcertError` when they mix dtypes or it is not one of
    :data:`CERTIFIED_DTYPES`."""
    dtypes: dict[torch.dtype, str] = {}
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if tensor.is_floating_point():
            dtypes.setdefault(tensor.dtype, name)
    if len(dtypes) > 1:
        found = ", ".join(f"{dtype} ({name})" for dtype, name in dtypes.items())
        raise AcertError(
            f"the model mixes dtypes {found}; convert it to one: model.float() or model.double()"
        )
    dtype = next(iter(dtypes), default)
    if dtype not in CERTIFIED_DTYPES:
        raise AcertError(
            f"the model computes in {dtype}, which acert does not certify (its rounding "
            "allowances hold for float32 and float64 only); convert it: model.float() or "
            "model.double()"
        )
    return dtype


def check_input_dtype(model: nn.Module, x: Tensor) -> torch.dtype:
    """The model's dtype (:func:`model_dtype`), or a one-line :class:`AcertError` unless the
    inputs ``x`` have it too."""
    dtype = model_dtype(model, x.dtype)
    if x.dtype != dtype:
        fix = f"x.to({dtype})"
        if x.dtype in CERTIFIED_DTYPES:
            fix = f"convert one to the other: {fix} or model.to({x.dtype})"
        raise AcertError(
            f"inputs are {x.dtype} but the model computes in {dtype} (its parameters); {fix}"
        )
    return dtype


def check_model_input(model: nn.Module, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """One-line :class:`AcertError` unless ``model`` takes inputs of ``shape`` (no batch) and
    ``dtype``: each layer's rank and every residual body's shape in its bounds form
    (:func:`check_shapes`), then the model's forward pass itself, run on shapes alone (the
    ``meta`` device: no arithmetic, no random numbers drawn, no running statistics touched),
    and the bounds form's steps, each of whose output shapes must be its kind's rule's, so
    that no bound is computed for a model that cannot run on the input."""
    graph = bounds_form(model, shape)
    check_shapes(graph, shape)
    example = torch.empty((2, *shape), dtype=dtype, device="meta")
    meta = _on_meta(model)
    if meta is None:
        return  # a module that cannot be copied: the bounds' own pass will tell
    try:
        with torch.no_grad():
            meta(example)
    except (RuntimeError, ValueError, IndexError, TypeError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise AcertError(f"input of shape {shape} does not fit the model: {first_line}") from err
    meta_graph = meta if graph is model else _on_meta(graph)
    if meta_graph is not None:
        _check_shape_rules(meta_graph, example)


def _check_shape_rules(meta: nn.Module, example: Tensor) -> None:
    """One line where a kind's shape rule (a registered kind's, :func:`register_kind`) says
    another output shape than its layer gives on the (meta) example: the backward passes
    shape their coefficients by the rules."""
    steps = walk(meta)
    shapes = output_shapes(steps, tuple(example.shape[1:]))
    values: dict[int, Tensor] = {INPUT: example}
    with torch.no_grad():
        for step in steps:
            out = step.kind.run(step, *(values[i] for i in step.inputs))
            if step.norm is not None:
                out = step.norm(out)
            if tuple(out.shape[1:]) != shapes[step.index]:
                raise AcertError(
                    f"layer {step.where} ({step.kind.name}) gives outputs of shape "
                    f"{tuple(out.shape[1:])}, but its kind's shape rule says "
                    f"{shapes[step.index]}; fix the rule of the LayerKind registered for it"
                )
            values[step.index] = out


def _on_meta(model: nn.Module) -> nn.Module | None:
    """A copy of ``model`` whose parameters and buffers are on the ``meta`` device (no data
    copied), shared as in the model: a module used at two places, or a tied weight, stays one.
    Not ``torch.func.functional_call``: it leaves a module used at two places holding the
    meta tensors after the call (torch 2.13). None where some attribute cannot be copied."""
    memo: dict[int, object] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = (
            nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
        )
    try:
        return copy.deepcopy(model, memo)
    except (TypeError, RuntimeError, copy.Error):  # an attribute that cannot be copied
        return None


def check_arithmetic() -> None:
    """One-line :class:`AcertError` when ``torch.autocast`` is on: the model would compute its
    layers in float16/bfloat16, which no certificate covers (:data:`CERTIFIED_DTYPES`)."""
    for device in ("cpu", "cuda"):
        if _autocast_on(device):
            raise AcertError(
                f"torch.autocast is on for {device}, so the model computes in float16/bfloat16, "
                "a precision no certificate covers; certify outside the autocast block"
            )


def _autocast_on(device: str) -> bool:
    try:
        return torch.is_autocast_enabled(device)
    except TypeError:  # torch < 2.4 asks per device
        return torch.is_autocast_cpu_enabled() if device == "cpu" else torch.is_autocast_enabled()


def check_eps(eps: object, name: str = "eps") -> None:
    """One-line :class:`AcertError` unless ``eps`` is a number or a torch tensor of numbers
    (its shape and values are checked where it is broadcast, :func:`as_eps`)."""
    if isinstance(eps, Tensor):
        if eps.dtype != torch.bool and not eps.is_complex():
            return
    elif isinstance(eps, numbers.Real) and not isinstance(eps, bool):
        return
    raise AcertError(
        f"{name} must be a number or a torch tensor of radii in pixel units, "
        f"got {_type_name(eps)} {_short(eps)}"
    )


def _type_name(value: object) -> str:
    kind = type(value)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def margin_bounds_on_box(
    model: nn.Module,
    box: Interval,
    y: Tensor,
    method: str = "ibp",
    stats: BatchStats | None = None,
    sound: bool = True,
) -> Tensor:
    """Lower bounds of the margins over an input box; no input checks (hot paths use this).

    Args:
        model: a supported model (see :func:`check_inputs`), traced before (a
            :func:`margin_bounds` or :func:`check_inputs` of it) unless it is a chain.
        box: (B, ...) input interval inside [0, 1].
        y: (B,) labels.
        method: one of ``METHODS``.
        stats: clean-batch statistics, needed when a batch-norm is in train mode.
        sound: widen for floating-point rounding (certificates); False gives the plain
            arithmetic of a training objective (:data:`acert.bounds.ibp.Rule`).

    Returns:
        (B, K-1) lower bounds of ``f_y - f_t``, t != y in increasing order.
    """
    bounds_form(model, tuple(box.centre.shape[1:]))  # traced (once) where it is not a chain
    return margin_evaluator(model, method, stats, sound)(box, y)


def margin_evaluator(
    model: nn.Module,
    method: str = "ibp",
    stats: BatchStats | None = None,
    sound: bool = True,
) -> MarginEvaluator:
    """:func:`margin_bounds_on_box` of one network for many boxes (a radius search's): IBP's
    interval maps are prepared once (:func:`acert.bounds.ibp.prepare`), so each evaluation
    only propagates. Make it in the autograd mode it is used in.
    """
    if method not in METHODS:
        raise AcertError(f"unknown bound method {method!r}; choose one of {', '.join(METHODS)}")
    return METHODS[method](bounds_form(model), stats, sound)


def margin_bounds(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    method: str = "ibp",
    stats: BatchStats | None = None,
) -> Tensor:
    """Lower bounds of ``f_y - f_t`` for every t != y over the clipped ℓ∞ ball.

    Args:
        model: ``nn.Sequential`` or :class:`acert.models.GraphNet` of the layers of
            :data:`LAYER_KINDS` (Normalize, Conv2d, Linear, BatchNorm1d/2d, ReLU, LeakyReLU,
            Flatten, AvgPool2d, MaxPool2d, Identity, Dropout, Add, Concat, residual blocks),
            ending in Linear, or any ``nn.Module`` whose forward is made of them and of the
            functional forms :mod:`acert.bounds.tracing` maps onto them (traced once into a
            graph, :func:`bounds_form`). Batch-norm uses running statistics in eval mode; one
            that normalises with the current batch (train mode) needs ``stats`` (a training
            objective's bounds) and is refused without them, as is Dropout in train mode: no
            certificate holds for them.
        x: (B, C, H, W) or (B, D) inputs in [0, 1], B >= 1, a torch tensor of the model's
            dtype (numpy arrays and lists are refused, not converted: pass ``torch.as_tensor``).
        y: (B,) int64 labels (int32 is accepted too).
        eps: radius in pixel units, a number or a (B,) tensor.
        method: ``"ibp"``, ``"crown-ibp"`` or ``"crown"``.
        stats: clean-batch statistics from :func:`clean_forward`.

    Returns:
        (B, K-1) lower bounds; the sample is certified at eps when all are > 0.
    """
    check_arithmetic()
    model = check_inputs(model, x, y)
    check_eps(eps)
    check_fixed_normalisation(model, stats)
    box = input_box(x, eps)
    try:
        with ieee_arithmetic(x.dtype, x.device):
            return margin_bounds_on_box(model, box, y, method, stats)
    except RuntimeError as err:
        first_line = str(err).strip().splitlines()[0]
        raise AcertError(
            f"input of shape {tuple(x.shape[1:])} does not fit the model: {first_line}"
        ) from err
