"""Backward linear relaxation: CROWN (Zhang et al. 2018) and CROWN-IBP (Zhang et al. 2020).

A lower bound of a linear function ``A · h_k + bias`` of some layer's output is pushed back
layer by layer to the input, one rule per layer kind (``BACKWARD_RULES``). At a ReLU with
pre-activation bounds [l, u] the upper line is the chord and the lower line has slope 1 when
u >= -l, else 0 (the adaptive rule, METHOD.md "Threat model and certificates"); stable ReLUs are
exact. At the input the linear function is minimised over the clipped box in closed form.

CROWN bounds every ReLU's pre-activation with the same backward pass (intersected with IBP,
which is sound and never looser); CROWN-IBP takes the intermediate bounds from IBP and runs the
backward pass only from the output.

Backward state has shape (Q, S, *layer shape): Q queries, each tied to one batch row by
``rows`` (Q,), S specification rows per query. Queries are processed in chunks so that the
coefficient tensors stay under ``memory_budget`` elements.

The intermediate bounds of the convolutional part (every layer before the first Flatten or
Linear) run on patches instead (:mod:`acert.bounds.patches`): a neuron's coefficients only on
its receptive field, the same bounds up to rounding at a fraction of the time and memory. The
neurons after a Flatten/Linear and the output margins use the dense pass here, which is also
kept for every layer with ``use_patches=False``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from acert.bounds import ibp, patches
from acert.bounds.interval import Interval
from acert.bounds.layers import BatchStats, channel_affine, fold_batchnorm, folds_into
from acert.bounds.rounding import StepError, relu_step, step_errors
from acert.bounds.spec import folded_margin_layer, input_lower_bound, margin_matrix
from acert.errors import AcertError
from acert.models import Normalize

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "Relaxation",
    "crown_margins",
    "memory_budget",
    "relu_relaxation",
]

DEFAULT_MEMORY_BUDGET = 2**26
"""Elements of one chunk's coefficient tensor (256 MiB in float32)."""

_budget = [DEFAULT_MEMORY_BUDGET]


@contextlib.contextmanager
def memory_budget(elements: int) -> Iterator[None]:
    """Cap the coefficient tensor of every CROWN backward chunk in a block (peak memory is a
    small multiple of it); e.g. ``with memory_budget(2**24): certify(...)``."""
    if elements < 1:
        raise AcertError(f"the CROWN memory budget must be >= 1 element, got {elements}")
    _budget.append(elements)
    try:
        yield
    finally:
        _budget.pop()


@dataclass(frozen=True)
class Relaxation:
    """Linear bounds ``lower_slope·z <= relu(z) <= upper_slope·z + upper_intercept`` on [l, u]."""

    lower_slope: Tensor
    upper_slope: Tensor
    upper_intercept: Tensor


def relu_relaxation(pre: Interval) -> Relaxation:
    """The CROWN relaxation of ReLU on the pre-activation interval ``pre`` (B, ...)."""
    lower, upper = pre.lower, pre.upper
    unstable = (lower < 0) & (upper > 0)
    active = (lower >= 0).to(lower.dtype)
    width = torch.where(unstable, upper - lower, torch.ones_like(lower))
    upper_slope = torch.where(unstable, upper / width, active)
    upper_intercept = torch.where(unstable, -lower * upper_slope, torch.zeros_like(lower))
    lower_slope = torch.where(unstable, (upper >= -lower).to(lower.dtype), active)
    return Relaxation(lower_slope, upper_slope, upper_intercept)


@dataclass
class _Context:
    """What the backward rules need besides the coefficients."""

    rows: Tensor
    stats: BatchStats | None
    input_shape: tuple[int, ...]
    relaxation: Relaxation | None


def _dot(A: Tensor, v: Tensor) -> Tensor:
    """(Q, S) ``Σ A[q, s, ...] · v[q, ...]`` as a batched matrix product (no full-size temporary).

    Args:
        A: (Q, S, *shape) coefficients.
        v: (Q, *shape) one vector per query.
    """
    return torch.bmm(A.flatten(2), v.flatten(1).unsqueeze(-1)).squeeze(-1)


def _back_linear(layer: nn.Linear, A: Tensor, bias: Tensor, ctx: _Context) -> tuple[Tensor, Tensor]:
    return _back_linear_with(layer, layer.weight, layer.bias, A, bias, ctx)


def _back_linear_with(
    layer: nn.Linear,
    weight: Tensor,
    layer_bias: Tensor | None,
    A: Tensor,
    bias: Tensor,
    ctx: _Context,
) -> tuple[Tensor, Tensor]:
    if layer_bias is not None:
        bias = bias + A @ layer_bias
    return A @ weight, bias


def _back_conv(layer: nn.Conv2d, A: Tensor, bias: Tensor, ctx: _Context) -> tuple[Tensor, Tensor]:
    return _back_conv_with(layer, layer.weight, layer.bias, A, bias, ctx)


def _back_conv_with(
    layer: nn.Conv2d,
    weight: Tensor,
    layer_bias: Tensor | None,
    A: Tensor,
    bias: Tensor,
    ctx: _Context,
) -> tuple[Tensor, Tensor]:
    queries, specs = A.shape[:2]
    if layer_bias is not None:
        bias = bias + A.sum((-2, -1)) @ layer_bias
    out_h, out_w = A.shape[-2:]
    in_h, in_w = ctx.input_shape[-2:]
    output_padding = tuple(
        size_in - ((size_out - 1) * stride - 2 * pad + dil * (k - 1) + 1)
        for size_in, size_out, stride, pad, dil, k in zip(
            (in_h, in_w),
            (out_h, out_w),
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.kernel_size,
            strict=True,
        )
    )
    A_in = F.conv_transpose2d(
        A.flatten(0, 1),
        weight,
        None,
        layer.stride,
        layer.padding,
        output_padding,
        layer.groups,
        layer.dilation,
    )
    return A_in.view(queries, specs, *ctx.input_shape), bias


def _back_channel_affine(
    layer: nn.Module, A: Tensor, bias: Tensor, ctx: _Context
) -> tuple[Tensor, Tensor]:
    scale, shift = channel_affine(layer, ctx.stats)
    shape = (1, 1, -1) + (1,) * (A.dim() - 3)
    per_channel = A.flatten(3).sum(-1) if A.dim() > 3 else A
    # shift broadcasts like the forward pass does (Normalize may hold one value for all channels)
    return A * scale.view(shape), bias + per_channel @ shift.expand(per_channel.shape[-1])


def _back_relu(layer: nn.ReLU, A: Tensor, bias: Tensor, ctx: _Context) -> tuple[Tensor, Tensor]:
    relax = ctx.relaxation
    assert relax is not None
    lower_slope, upper_slope, upper_intercept = (
        t[ctx.rows].unsqueeze(1)
        for t in (relax.lower_slope, relax.upper_slope, relax.upper_intercept)
    )
    positive = A.clamp(min=0)
    negative = A - positive
    bias = bias + _dot(negative, upper_intercept.squeeze(1))
    return positive * lower_slope + negative * upper_slope, bias


def _back_flatten(
    layer: nn.Flatten, A: Tensor, bias: Tensor, ctx: _Context
) -> tuple[Tensor, Tensor]:
    return A.reshape(*A.shape[:2], *ctx.input_shape), bias


BackwardRule = Callable[[nn.Module, Tensor, Tensor, _Context], tuple[Tensor, Tensor]]
BACKWARD_RULES: dict[type[nn.Module], BackwardRule] = {
    nn.Linear: _back_linear,
    nn.Conv2d: _back_conv,
    Normalize: _back_channel_affine,
    nn.BatchNorm1d: _back_channel_affine,
    nn.BatchNorm2d: _back_channel_affine,
    nn.ReLU: _back_relu,
    nn.Flatten: _back_flatten,
}


@dataclass
class _Network:
    """A model prepared for backward passes: layers, their input shapes, ReLU relaxations."""

    layers: Sequence[nn.Module]
    input_shapes: list[tuple[int, ...]]
    box: Interval
    stats: BatchStats | None
    relaxations: dict[int, Relaxation]
    errors: dict[int, StepError]
    """The rounding bound of each backward step (:mod:`acert.bounds.rounding`); empty for
    the plain arithmetic of a training objective."""

    def lower_bound(
        self, end: int, A: Tensor, bias: Tensor, rows: Tensor, error: Tensor | None = None
    ) -> Tensor:
        """Minimum over the input box of ``A · h + bias``, h the output of ``layers[:end]``.

        Args:
            end: number of leading layers the linear function sits on.
            A: (Q, S, *shape of h) coefficients.
            bias: (Q, S) constants.
            rows: (Q,) batch row of each query.
            error: (Q, S) rounding already incurred in forming A and bias (the last layer's).

        Returns:
            (Q, S) lower bounds, less the rounding of every step and of the input step.
        """
        position = end - 1
        bias_magnitude = bias.abs()  # Σ|each layer's contribution|: they may cancel in the sum
        error = torch.zeros_like(bias) if error is None else error
        while position >= 0:
            layer = self.layers[position]
            before = self.layers[position - 1] if position > 0 else None
            previous = bias
            if position in self.errors:
                error = error + self.errors[position].rows(rows).cost(A, _dot)
            if folds_into(before, layer):
                # batch-norm folded into the layer before it: one pass over A instead of two
                ctx = _Context(rows, self.stats, self.input_shapes[position - 1], None)
                weight, layer_bias = fold_batchnorm(before, layer, self.stats)
                with_rule = _back_linear_with if isinstance(before, nn.Linear) else _back_conv_with
                A, bias = with_rule(before, weight, layer_bias, A, bias, ctx)
                position -= 2
            else:
                ctx = _Context(
                    rows, self.stats, self.input_shapes[position], self.relaxations.get(position)
                )
                A, bias = BACKWARD_RULES[type(layer)](layer, A, bias, ctx)
                position -= 1
            bias_magnitude = bias_magnitude + (bias - previous).abs()
        centre, radius = self.box.centre[rows], self.box.radius[rows]
        terms = centre[0].numel() if centre.numel() else 0
        return input_lower_bound(A, bias, bias_magnitude, centre, radius, _dot, terms) - error


def _input_shapes(
    layers: Sequence[nn.Module], box: Interval, stats: BatchStats | None
) -> list[tuple[int, ...]]:
    shapes = []
    h = box.centre[:1]
    with torch.no_grad():
        for layer in layers:
            shapes.append(tuple(h.shape[1:]))
            h = ibp.RULES[type(layer)](layer, stats, True)(Interval(h, torch.zeros_like(h))).centre
    return shapes


def _is_affine_exact(layers: Sequence[nn.Module]) -> bool:
    """IBP is exact on a chain with no ReLU and at most one non-diagonal affine map."""
    if any(isinstance(layer, nn.ReLU) for layer in layers):
        return False
    return sum(isinstance(layer, nn.Linear | nn.Conv2d) for layer in layers) <= 1


def _crown_preactivation(
    net: _Network, end: int, ibp_bounds: Interval, budget: int, use_patches: bool
) -> Interval:
    """CROWN bounds of the output of ``layers[:end]`` for its IBP-unstable neurons, ∩ IBP:
    on patches (:mod:`acert.bounds.patches`) for a conv-stage layer, else dense."""
    if use_patches and patches.supports(net.layers[:end], ibp_bounds.shape[1:]):
        return patches.preactivation_bounds(net, end, ibp_bounds, budget)
    return _dense_preactivation(net, end, ibp_bounds, budget)


def _dense_preactivation(net: _Network, end: int, ibp_bounds: Interval, budget: int) -> Interval:
    """CROWN bounds by the dense backward pass: coefficients on whole layer tensors."""
    lower, upper = ibp_bounds.lower.flatten(1).clone(), ibp_bounds.upper.flatten(1).clone()
    unstable = (lower < 0) & (upper > 0)
    shape = ibp_bounds.shape[1:]
    widest = max(math.prod(s) for s in [*net.input_shapes[:end], tuple(shape)])
    chunk = max(1, budget // (2 * widest))
    # one sample at a time: its unstable neurons are the specification rows of one query, so
    # the per-sample relaxations broadcast instead of being copied for every neuron
    for row in torch.nonzero(unstable.any(1), as_tuple=True)[0].tolist():
        neurons = torch.nonzero(unstable[row], as_tuple=True)[0]
        for start in range(0, neurons.numel(), chunk):
            n = neurons[start : start + chunk]
            k = n.numel()
            A = torch.zeros(1, 2 * k, math.prod(shape), dtype=lower.dtype, device=lower.device)
            spec = torch.arange(k, device=n.device)
            A[0, spec, n] = 1.0
            A[0, k + spec, n] = -1.0
            bias = torch.zeros(1, 2 * k, dtype=lower.dtype, device=lower.device)
            rows = torch.tensor([row], device=n.device)
            bounds = net.lower_bound(end, A.view(1, 2 * k, *shape), bias, rows)[0]
            lower[row, n] = torch.maximum(lower[row, n], bounds[:k])
            upper[row, n] = torch.minimum(upper[row, n], -bounds[k:])
    return Interval.from_bounds(lower.view_as(ibp_bounds.lower), upper.view_as(ibp_bounds.upper))


def _prepare(
    layers: Sequence[nn.Module],
    box: Interval,
    stats: BatchStats | None,
    intermediate: str,
    budget: int,
    use_patches: bool,
    sound: bool = True,
) -> _Network:
    errors = step_errors(layers, box, stats) if sound else {}
    net = _Network(layers, _input_shapes(layers, box, stats), box, stats, {}, errors)
    h, start = box, 0
    relu_positions = [i for i, layer in enumerate(layers) if isinstance(layer, nn.ReLU)]
    for position in relu_positions:
        pre, _ = ibp.propagate(layers[start:position], h, stats, sound)
        if intermediate == "crown" and not _is_affine_exact(layers[:position]):
            pre = _crown_preactivation(net, position, pre, budget, use_patches)
        net.relaxations[position] = relu_relaxation(pre)
        if sound:
            net.errors[position] = relu_step(pre, net.relaxations[position].upper_intercept)
        h = ibp.RULES[nn.ReLU](layers[position], stats, sound)(pre)
        start = position + 1
    return net


def crown_margins(
    model: nn.Sequential,
    box: Interval,
    y: Tensor,
    stats: BatchStats | None = None,
    intermediate: str = "crown",
    memory_budget: int | None = None,
    use_patches: bool = True,
    sound: bool = True,
) -> Tensor:
    """Lower bounds of ``f_y - f_t`` for t != y by a backward pass from the output.

    Args:
        model: a supported ``nn.Sequential`` ending in ``nn.Linear``.
        box: input interval (B, ...), already clipped to the domain.
        y: (B,) labels.
        stats: clean-batch statistics for train-mode batch-norms.
        intermediate: ``"crown"`` (CROWN) or ``"ibp"`` (CROWN-IBP) pre-activation bounds.
        memory_budget: elements per chunk of backward coefficients (default: the innermost
            :func:`memory_budget` block, else ``DEFAULT_MEMORY_BUDGET``).
        use_patches: bound the neurons of convolutional layers on their receptive fields
            (:mod:`acert.bounds.patches`); False runs the dense pass everywhere (the same bounds
            up to rounding, much slower; kept for tests and comparisons).
        sound: IBP intermediate bounds widened for rounding (False for a training objective:
            see :data:`acert.bounds.ibp.Rule`).

    Returns:
        (B, K-1) lower bounds, classes in increasing order with y left out.
    """
    layers = list(model)
    last = layers[-1]
    assert isinstance(last, nn.Linear)
    memory_budget = _budget[-1] if memory_budget is None else memory_budget
    net = _prepare(layers, box, stats, intermediate, memory_budget, use_patches, sound)
    A, bias = folded_margin_layer(last, y)
    if bias is None:
        bias = torch.zeros(A.shape[:2], dtype=A.dtype, device=A.device)
    rows = torch.arange(y.shape[0], device=y.device)
    error = _last_layer_error(net, len(layers) - 1, y)
    widest = max(math.prod(shape) for shape in net.input_shapes)
    chunk = max(1, memory_budget // (A.shape[1] * widest))
    return torch.cat(
        [
            net.lower_bound(
                len(layers) - 1,
                A[s : s + chunk],
                bias[s : s + chunk],
                rows[s : s + chunk],
                None if error is None else error[s : s + chunk],
            )
            for s in range(0, y.shape[0], chunk)
        ]
    )


def _last_layer_error(net: _Network, position: int, y: Tensor) -> Tensor | None:
    """(B, K-1) the rounding of the logits ``z_y`` and ``z_t`` that the model computes and of
    the folded rows ``W_y - W_t``: each logit's own rounding bound, added, so that the
    cancellation of ``W_y`` against ``W_t`` cannot hide it; None for plain arithmetic."""
    if position not in net.errors:
        return None
    step = net.errors[position]
    spec = margin_matrix(y, step.elementwise.shape[1], step.elementwise.dtype).abs()
    return torch.bmm(spec, step.elementwise.unsqueeze(-1)).squeeze(-1) + step.absolute[:, None]
