"""Exact verification of tiny ReLU networks by mixed-integer linear programming (test utility).

Ground truth for the tests of the bound propagation and of the radius search: for one input
``x`` with label ``y`` and a radius ``eps``, the exact minimum of the margin ``f_y(x') - f_t(x')``
over the input set

    B(x, eps) = {x' : |x' - x|_inf <= eps, 0 <= x' <= 1}

for every other class ``t``. Any sound lower bound (IBP, CROWN, ...) must be <= that minimum.

Method. The model (a ``torch.nn.Sequential`` starting with :class:`acert.models.Normalize`) is
rewritten in float64 as ``A_L ∘ ReLU ∘ A_{L-1} ∘ ... ∘ ReLU ∘ A_1`` with dense affine maps
``A_k(h) = W_k h + b_k`` (:func:`affine_layers_float64`): Normalize and eval-mode BatchNorm are
diagonal maps, Conv2d is the matrix obtained by applying the convolution to the basis vectors,
Flatten is the identity, and consecutive affine modules are composed. Pre-activation bounds
``l <= z <= u`` come from plain interval arithmetic in float64 in this module (independent of
``acert.bounds``), widened by a relative 1e-9 so that float rounding cannot make them unsound.
Each ReLU ``h = max(z, 0)`` is then encoded exactly:

* ``l >= 0`` (stably active): ``h = z``;
* ``u <= 0`` (stably inactive): ``h = 0``;
* otherwise, with a binary ``a`` (big-M with M from the interval bounds):
  ``h >= z``, ``h >= 0``, ``h <= u a``, ``h <= z - l (1 - a)``.

One MILP per class ``t`` is solved with ``scipy.optimize.milp`` (HiGHS) with tight tolerances
(:data:`MILP_OPTIONS`); anything but an optimal status raises :class:`ExactVerificationError`.

Exactness. The value returned for class ``t`` is the float64 margin of the network evaluated at
the minimiser the solver returns (clipped into the box, so it is attained by a real input); it is
therefore never below the true minimum (beyond float64 evaluation rounding, ~1e-15 relative). It
is checked to agree with both the MILP objective and HiGHS' dual (lower) bound to within
``1e-6 * (1 + |value|)``, otherwise :class:`ExactVerificationError` is raised. In practice the
results are exact up to the solver tolerances, i.e. to about 1e-7 or better; tests should compare
with a tolerance of that order. Only meant for tiny networks: every layer becomes a dense matrix
and the MILP has one binary per unstable ReLU.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, OptimizeWarning, milp
from scipy.sparse import csr_array
from torch import Tensor, nn

from acert.models import Normalize

__all__ = [
    "MILP_OPTIONS",
    "ExactVerificationError",
    "affine_layers_float64",
    "exact_certified",
    "exact_min_margins",
    "exact_radius",
    "exact_worst_input",
    "forward_float64",
    "interval_bounds_float64",
]

AffineMap = tuple[np.ndarray, np.ndarray]
"""``(W, b)`` with ``W`` of shape (n_out, n_in) and ``b`` of shape (n_out,), both float64."""

MILP_OPTIONS: dict[str, float] = {
    "mip_rel_gap": 1e-9,
    "mip_abs_gap": 1e-10,
    "primal_feasibility_tolerance": 1e-9,
    "dual_feasibility_tolerance": 1e-9,
    "mip_feasibility_tolerance": 1e-9,
}
"""HiGHS options. Only ``mip_rel_gap`` is a documented ``milp`` option; scipy passes the others to
HiGHS verbatim (with a RuntimeWarning, silenced here). A value HiGHS rejects is an error."""

_BOUND_SLACK = 1e-9  # relative widening of the interval bounds (covers float64 rounding)
_CHECK_TOL = 1e-6  # agreement required between evaluated value, MILP objective and dual bound


class ExactVerificationError(RuntimeError):
    """The MILP solver did not report an optimal solution, or its answer failed a self-check."""


# --------------------------------------------------------------------------------------------
# Model -> float64 affine maps
# --------------------------------------------------------------------------------------------


def _leaves(model: nn.Module) -> Iterator[nn.Module]:
    """The modules of a (possibly nested) Sequential, in execution order."""
    if isinstance(model, nn.Sequential):
        for module in model:
            yield from _leaves(module)
    else:
        yield model


def _channel_vector(values: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
    """Per-channel ``values`` (channel = first per-sample axis) broadcast over ``shape``, flat."""
    if values.size != shape[0]:
        raise ValueError(f"{what} has {values.size} channels but its input has shape {shape}")
    return np.broadcast_to(values.reshape(-1, *([1] * (len(shape) - 1))), shape).ravel()


def _module_map(
    module: nn.Module, shape: tuple[int, ...]
) -> tuple[str, np.ndarray | None, np.ndarray | None, tuple[int, ...]]:
    """The map of one non-ReLU module on flattened inputs of per-sample ``shape``.

    Returns ``(kind, A, c, out_shape)``: kind ``"identity"`` (A, c unused), ``"diag"`` (the map
    ``x -> A * x + c`` with vectors A, c) or ``"dense"`` (``x -> A @ x + c``).
    """
    n = math.prod(shape)
    if isinstance(module, nn.Identity | nn.Flatten):
        if isinstance(module, nn.Flatten):
            if module.start_dim % (len(shape) + 1) == 0:
                raise ValueError("nn.Flatten must not flatten the batch dimension")
            shape = tuple(
                torch.empty(1, *shape).flatten(module.start_dim, module.end_dim).shape[1:]
            )
        return "identity", None, None, shape
    if isinstance(module, Normalize):
        ndim = len(shape) + 1
        mean = module.channel_view(module.mean.detach().cpu().double(), ndim).numpy()
        std = module.channel_view(module.std.detach().cpu().double(), ndim).numpy()
        try:
            mean = np.broadcast_to(mean, (1, *shape)).ravel()
            std = np.broadcast_to(std, (1, *shape)).ravel()
        except ValueError as exc:
            raise ValueError(f"Normalize {module.extra_repr()} does not fit input {shape}") from exc
        return "diag", 1.0 / std, -mean / std, shape
    if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
        if module.training:
            raise ValueError("BatchNorm layers must be in eval mode (call model.eval())")
        if module.running_mean is None or module.running_var is None:
            raise ValueError("BatchNorm without running statistics is not an affine map")
        if isinstance(module, nn.BatchNorm2d) != (len(shape) == 3):
            raise ValueError(f"{type(module).__name__} does not fit input of shape {shape}")
        mean = module.running_mean.detach().cpu().double().numpy()
        var = module.running_var.detach().cpu().double().numpy()
        scale = 1.0 / np.sqrt(var + module.eps)
        shift = -mean * scale
        if module.affine:
            weight = module.weight.detach().cpu().double().numpy()
            bias = module.bias.detach().cpu().double().numpy()
            scale, shift = weight * scale, weight * shift + bias
        return (
            "diag",
            _channel_vector(scale, shape, "BatchNorm"),
            _channel_vector(shift, shape, "BatchNorm"),
            shape,
        )
    if isinstance(module, nn.Linear):
        if shape[-1] != module.in_features:
            raise ValueError(f"Linear expects {module.in_features} features, input is {shape}")
        weight = module.weight.detach().cpu().double().numpy()
        bias = (
            module.bias.detach().cpu().double().numpy()
            if module.bias is not None
            else np.zeros(module.out_features)
        )
        copies = math.prod(shape[:-1])  # Linear acts on the last axis
        if copies > 1:
            weight, bias = np.kron(np.eye(copies), weight), np.tile(bias, copies)
        return "dense", weight, bias, (*shape[:-1], module.out_features)
    if isinstance(module, nn.Conv2d):
        if len(shape) != 3:
            raise ValueError(f"Conv2d needs a (C, H, W) input, got shape {shape}")
        conv = copy.deepcopy(module).cpu().double()
        conv.bias = None
        with torch.no_grad():
            basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
            out = conv(basis)  # row i: the convolution of the i-th basis vector
        out_shape = tuple(out.shape[1:])
        weight = out.reshape(n, -1).T.numpy().copy()
        if module.bias is not None:
            bias = module.bias.detach().cpu().double().numpy()
            bias = _channel_vector(bias, out_shape, "Conv2d bias")
        else:
            bias = np.zeros(weight.shape[0])
        return "dense", weight, bias, out_shape
    raise TypeError(f"exact verifier has no rule for {type(module).__name__}")


def affine_layers_float64(model: nn.Module, in_shape: Sequence[int]) -> list[AffineMap]:
    """The model as float64 affine maps ``[(W_1, b_1), ..., (W_L, b_L)]`` on flattened inputs.

    The network computes ``A_L(ReLU(A_{L-1}(... ReLU(A_1(x)))))`` with ``A_k(h) = W_k h + b_k``
    and ``x`` the C-order flattening of one input of shape ``in_shape``: consecutive affine
    modules (Normalize, Linear, Conv2d, eval BatchNorm, Flatten) are composed into one map and
    every ReLU separates two maps. A ReLU right after a ReLU is dropped (it is idempotent).

    Raises:
        TypeError: a module other than those above.
        ValueError: BatchNorm in training mode, or a layer that does not fit its input shape.
    """
    shape = tuple(int(s) for s in in_shape)
    n = math.prod(shape)
    W, b = np.eye(n), np.zeros(n)
    layers: list[AffineMap] = []
    after_relu = False  # the pending map is the identity and directly follows a ReLU
    for module in _leaves(model):
        if isinstance(module, nn.ReLU):
            if not after_relu:
                layers.append((W, b))
                W, b = np.eye(b.size), np.zeros(b.size)
                after_relu = True
            continue
        kind, A, c, shape = _module_map(module, shape)
        if kind == "diag":
            W, b = A[:, None] * W, A * b + c
        elif kind == "dense":
            W, b = A @ W, A @ b + c
        if kind != "identity":
            after_relu = False
    layers.append((W, b))
    return layers


def forward_float64(layers: Sequence[AffineMap], x: np.ndarray) -> np.ndarray:
    """The network of :func:`affine_layers_float64` on flattened inputs ``x`` (n_0,) or (N, n_0)."""
    h = np.asarray(x, dtype=np.float64)
    for k, (W, b) in enumerate(layers):
        h = h @ W.T + b
        if k < len(layers) - 1:
            h = np.maximum(h, 0.0)
    return h


def interval_bounds_float64(
    layers: Sequence[AffineMap], lo: np.ndarray, hi: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Interval bounds ``(l_k, u_k)`` on the pre-activations ``A_k(...)`` of every layer.

    For inputs in the box ``[lo, hi]`` (flattened). Bounds are widened by a relative 1e-9 so that
    they stay sound despite float64 rounding. The last entry bounds the logits.
    """
    lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    bounds = []
    for k, (W, b) in enumerate(layers):
        if k > 0:
            lo, hi = np.maximum(lo, 0.0), np.maximum(hi, 0.0)
        mid, rad = (hi + lo) / 2, (hi - lo) / 2
        center, spread = W @ mid + b, np.abs(W) @ rad
        slack = _BOUND_SLACK * (1.0 + np.abs(W) @ np.maximum(np.abs(lo), np.abs(hi)) + np.abs(b))
        lo, hi = center - spread - slack, center + spread + slack
        bounds.append((lo, hi))
    return bounds


# --------------------------------------------------------------------------------------------
# MILP encoding
# --------------------------------------------------------------------------------------------


@dataclass
class _Encoding:
    """Constraints shared by the MILPs of all classes for one network and one input box."""

    lb: np.ndarray
    ub: np.ndarray
    integrality: np.ndarray
    constraints: LinearConstraint | None
    n_in: int
    last: np.ndarray  # variable indices of the input of the final affine map
    n_binaries: int


def _encode(layers: Sequence[AffineMap], lo: np.ndarray, hi: np.ndarray) -> _Encoding:
    """Big-M encoding of the ReLU network on the box ``[lo, hi]`` (variables: x', h_k, a_k)."""
    n_in = lo.size
    lbs, ubs, ints = [lo.copy()], [hi.copy()], [np.zeros(n_in)]
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    row_lo: list[np.ndarray] = []
    row_hi: list[np.ndarray] = []
    n_var, n_row, n_bin = n_in, 0, 0
    prev = np.arange(n_in)

    def add_rows(W, h, js, lower, upper, extra_cols=None, extra_vals=None):
        """Rows ``lower <= h_j - W_j . prev [+ extra] <= upper`` for neurons ``js``."""
        nonlocal n_row
        k = js.size
        r, c = np.nonzero(W[js])
        rows.extend([n_row + r, n_row + np.arange(k)])
        cols.extend([prev[c], h[js]])
        vals.extend([-W[js][r, c], np.ones(k)])
        if extra_cols is not None:
            rows.append(n_row + np.arange(k))
            cols.append(extra_cols)
            vals.append(extra_vals)
        row_lo.append(np.broadcast_to(lower, (k,)).astype(np.float64))
        row_hi.append(np.broadcast_to(upper, (k,)).astype(np.float64))
        n_row += k

    bounds = interval_bounds_float64(layers, lo, hi)
    for (W, b), (l_k, u_k) in zip(layers[:-1], bounds[:-1], strict=True):
        m = b.size
        h = np.arange(n_var, n_var + m)
        n_var += m
        lbs.append(np.maximum(l_k, 0.0))
        ubs.append(np.maximum(u_k, 0.0))  # stably inactive neurons get h in [0, 0]
        ints.append(np.zeros(m))
        active = np.flatnonzero(l_k >= 0)
        unstable = np.flatnonzero((l_k < 0) & (u_k > 0))
        a = np.arange(n_var, n_var + unstable.size)
        n_var += unstable.size
        n_bin += unstable.size
        lbs.append(np.zeros(unstable.size))
        ubs.append(np.ones(unstable.size))
        ints.append(np.ones(unstable.size))
        # active: h = z
        add_rows(W, h, active, b[active], b[active])
        # unstable: h >= z
        add_rows(W, h, unstable, b[unstable], np.inf)
        # unstable: h <= z - l_k (1 - a)   <=>   h - W.prev - l_k a <= b - l_k
        lu, bu = l_k[unstable], b[unstable]
        add_rows(W, h, unstable, -np.inf, bu - lu, extra_cols=a, extra_vals=-lu)
        # unstable: h <= u_k a
        k = unstable.size
        rows.extend([n_row + np.arange(k)] * 2)
        cols.extend([h[unstable], a])
        vals.extend([np.ones(k), -u_k[unstable]])
        row_lo.append(np.full(k, -np.inf))
        row_hi.append(np.zeros(k))
        n_row += k
        prev = h

    constraints = None
    if n_row > 0:
        A = csr_array(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
            shape=(n_row, n_var),
        )
        constraints = LinearConstraint(A, np.concatenate(row_lo), np.concatenate(row_hi))
    return _Encoding(
        lb=np.concatenate(lbs),
        ub=np.concatenate(ubs),
        integrality=np.concatenate(ints),
        constraints=constraints,
        n_in=n_in,
        last=prev,
        n_binaries=n_bin,
    )


def _solve(
    layers: Sequence[AffineMap],
    enc: _Encoding,
    lo: np.ndarray,
    hi: np.ndarray,
    y: int,
    t: int,
) -> tuple[float, np.ndarray]:
    """Minimum of ``f_y - f_t`` over the box and a flattened input attaining it."""
    W, b = layers[-1]
    c = np.zeros(enc.lb.size)
    c[enc.last] = W[y] - W[t]
    const = float(b[y] - b[t])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unrecognized options", category=RuntimeWarning)
        warnings.simplefilter("error", OptimizeWarning)  # e.g. HiGHS rejected an option value
        res = milp(
            c,
            integrality=enc.integrality,
            bounds=Bounds(enc.lb, enc.ub),
            constraints=enc.constraints,
            options=dict(MILP_OPTIONS),
        )
    if res.status != 0 or res.x is None:
        raise ExactVerificationError(
            f"HiGHS did not report an optimal solution for the margin y={y} vs t={t}: "
            f"status {res.status}, {res.message}"
        )
    x_star = np.clip(res.x[: enc.n_in], lo, hi)
    logits = forward_float64(layers, x_star)
    value = float(logits[y] - logits[t])
    tol = _CHECK_TOL * (1.0 + abs(value))
    objective = float(res.fun) + const
    if abs(objective - value) > tol:
        raise ExactVerificationError(
            f"MILP objective {objective!r} disagrees with the network at its minimiser "
            f"({value!r}) for y={y}, t={t}: the encoding or the solve is wrong"
        )
    dual = res.get("mip_dual_bound")
    if dual is not None and np.isfinite(dual) and value - (float(dual) + const) > tol:
        raise ExactVerificationError(
            f"MILP not solved to optimality for y={y}, t={t}: value {value!r}, "
            f"dual bound {float(dual) + const!r}"
        )
    return value, x_star


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _box(x: Tensor, eps: float) -> tuple[np.ndarray, np.ndarray]:
    eps = float(eps)
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    xf = x.detach().cpu().double().numpy().ravel()
    lo, hi = np.maximum(xf - eps, 0.0), np.minimum(xf + eps, 1.0)
    if np.any(lo > hi):
        raise ValueError(f"the box around x is empty: x lies outside [0, 1] by more than eps={eps}")
    return lo, hi


def _classes(layers: Sequence[AffineMap], y: int) -> list[int]:
    num_classes = layers[-1][1].size
    if num_classes < 2:
        raise ValueError(f"need at least 2 logits, the model has {num_classes}")
    if not 0 <= int(y) < num_classes:
        raise ValueError(f"label {y} out of range for {num_classes} classes")
    return [t for t in range(num_classes) if t != int(y)]


def _min_margins(
    layers: Sequence[AffineMap], x: Tensor, y: int, eps: float, stop_at_nonpositive: bool
) -> np.ndarray:
    lo, hi = _box(x, eps)
    classes = _classes(layers, y)
    enc = _encode(layers, lo, hi)
    margins = []
    for t in classes:
        value, _ = _solve(layers, enc, lo, hi, int(y), t)
        margins.append(value)
        if stop_at_nonpositive and value <= 0:
            break
    return np.asarray(margins, dtype=np.float64)


def exact_min_margins(model: nn.Sequential, x: Tensor, y: int, eps: float) -> np.ndarray:
    """Exact minimum of ``f_y(x') - f_t(x')`` over ``B(x, eps)`` for every class ``t != y``.

    Args:
        model: Normalize followed by Flatten / Linear / Conv2d / eval BatchNorm / ReLU modules.
        x: one input, shape (C, H, W) or (D,), without batch dimension, in [0, 1].
        y: the label.
        eps: the L-inf radius, >= 0; the set is also clipped to [0, 1].

    Returns:
        float64 array of shape (K - 1,), classes in increasing order with ``y`` left out. Exact up
        to the solver tolerances (about 1e-7; see the module docstring).
    """
    layers = affine_layers_float64(model, tuple(x.shape))
    return _min_margins(layers, x, y, eps, stop_at_nonpositive=False)


def exact_worst_input(model: nn.Sequential, x: Tensor, y: int, eps: float, t: int) -> Tensor:
    """An input of ``B(x, eps)`` attaining the minimum of ``f_y - f_t``; float64, shape of ``x``."""
    layers = affine_layers_float64(model, tuple(x.shape))
    if int(t) not in _classes(layers, y):
        raise ValueError(f"t={t} must be a class other than y={y}")
    lo, hi = _box(x, eps)
    _, x_star = _solve(layers, _encode(layers, lo, hi), lo, hi, int(y), int(t))
    return torch.from_numpy(x_star.reshape(tuple(x.shape)).copy())


def exact_certified(model: nn.Sequential, x: Tensor, y: int, eps: float) -> bool:
    """Whether every exact margin ``f_y - f_t`` is > 0 on all of ``B(x, eps)``."""
    layers = affine_layers_float64(model, tuple(x.shape))
    return _certified(layers, x, y, eps)


def _certified(layers: Sequence[AffineMap], x: Tensor, y: int, eps: float) -> bool:
    return bool(np.all(_min_margins(layers, x, y, eps, stop_at_nonpositive=True) > 0))


def exact_radius(
    model: nn.Sequential, x: Tensor, y: int, eps_max: float, tol: float = 1e-6
) -> float:
    """Exact certified radius, to within ``tol``, by bisection on :func:`exact_certified`.

    Certification is monotone in eps, so the certified radii form an interval ``[0, r*)``.
    Returns 0.0 if ``x`` itself is not classified as ``y`` (with margin > 0), ``eps_max`` if
    certified at ``eps_max``, and otherwise the certified lower end ``r`` of a final bracket
    ``[r, r + d]`` with ``d <= tol`` whose upper end is not certified.
    """
    if not (eps_max >= 0 and math.isfinite(eps_max)):
        raise ValueError(f"eps_max must be finite and >= 0, got {eps_max}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    layers = affine_layers_float64(model, tuple(x.shape))
    if not _certified(layers, x, y, 0.0):
        return 0.0
    if _certified(layers, x, y, eps_max):
        return float(eps_max)
    good, bad = 0.0, float(eps_max)
    while bad - good > tol:
        mid = (good + bad) / 2
        if mid <= good or mid >= bad:  # float resolution reached
            break
        if _certified(layers, x, y, mid):
            good = mid
        else:
            bad = mid
    return good
