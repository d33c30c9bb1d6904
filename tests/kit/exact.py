"""Exact verification of tiny networks by mixed-integer linear programming (test utility).

Ground truth for the tests of the bound propagation and of the radius search: for one input
``x`` with label ``y`` and a radius ``eps``, the exact minimum of the margin ``f_y(x') - f_t(x')``
over the input set

    B(x, eps) = {x' : |x' - x|_inf <= eps, 0 <= x' <= 1}

for every other class ``t``. Any sound lower bound (IBP, CROWN, ...) must be <= that minimum.

Method. The model (a ``torch.nn.Sequential`` of the layers the bounds support) is read in float64
as a list of operations on flattened vectors (:func:`network_float64`): affine maps, ReLU, max
pooling, and the fork and join of residual blocks (:class:`acert.models.Residual`, ``x +
body(x)``). Every module whose layer kind is not a relaxed one (``LayerKind.exactness`` in
:mod:`acert.bounds.kinds`: Normalize, Linear, Conv2d, eval-mode BatchNorm, AvgPool2d, Flatten,
Identity, eval-mode Dropout, and any linear kind added later) becomes a dense affine map by
applying a float64 copy of the module to the basis vectors (its offset: to the zero vector);
only the classification comes from the table, the maps from the modules' own forward passes.
Consecutive affine maps are composed. The MILP's variables are the input x' and the outputs of
the nonlinear operations; every quantity in between is an affine expression of them, whose
interval bounds ``l <= z <= u`` come from plain interval arithmetic over the variables' bounds
in this module, widened by a relative 1e-9 so that float rounding cannot make them unsound:

* ReLU ``h = max(z, 0)``: ``h = z`` where ``l >= 0``, ``h = 0`` where ``u <= 0``, otherwise a
  binary ``a`` (big-M with M from the bounds): ``h >= z``, ``h >= 0``, ``h <= u a``,
  ``h <= z - l (1 - a)``;
* max pooling ``y = max_i z_i`` over a window: ``y >= z_i`` for all i; ``y <= z_k`` where the
  input k with the largest lower bound is above every other upper bound; otherwise a binary
  ``a_i`` per input that can be the maximum (``u_i >= max_j l_j``), ``Σ a_i = 1`` and
  ``y <= z_i + (max_j u_j - l_i)(1 - a_i)``;
* a residual block: its join adds the expressions of the body's output and of the block's input.

One MILP per class ``t`` is solved with ``scipy.optimize.milp`` (HiGHS) with tight tolerances
(:data:`MILP_OPTIONS`); anything but an optimal status raises :class:`ExactVerificationError`.

Exactness. The value returned for class ``t`` is the margin of a float64 copy of the *torch
model* evaluated at the minimiser the solver returns (clipped into the box, so it is attained by
a real input); it is therefore never below the true minimum (beyond float64 evaluation
rounding, ~1e-15 relative). It is checked to agree with both the MILP objective and HiGHS' dual
(lower) bound to within ``1e-6 * (1 + |value|)``, otherwise :class:`ExactVerificationError` is
raised: a wrong encoding of any module cannot go unnoticed. In practice the results are exact up
to the solver tolerances, i.e. to about 1e-7 or better; tests should compare with a tolerance of
that order. Only meant for tiny networks: every affine map becomes a dense matrix and the MILP
has a binary per unstable ReLU and per candidate of an undecided max-pooling window.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import Bounds, OptimizeWarning, milp
from torch import Tensor, nn

from tests.kit.exact_milp import Encoding, Op, encode, forward_float64, network_float64, padded

__all__ = [
    "MILP_OPTIONS",
    "ExactVerificationError",
    "Op",
    "count_binaries",
    "exact_certified",
    "exact_min_margins",
    "exact_radius",
    "exact_worst_input",
    "forward_float64",
    "network_float64",
]

MILP_OPTIONS: dict[str, float] = {
    "mip_rel_gap": 1e-9,
    "mip_abs_gap": 1e-10,
    "primal_feasibility_tolerance": 1e-9,
    "dual_feasibility_tolerance": 1e-9,
    "mip_feasibility_tolerance": 1e-9,
}
"""HiGHS options. Only ``mip_rel_gap`` is a documented ``milp`` option; scipy passes the others to
HiGHS verbatim (with a RuntimeWarning, silenced here). A value HiGHS rejects is an error."""

RETRY_OPTIONS: dict[str, float] = {"mip_rel_gap": 1e-9, "mip_abs_gap": 1e-10}
"""Options of a second solve where HiGHS fails with :data:`MILP_OPTIONS` (its "solve error" on
some max-pooling encodings); the answer passes the same self-checks."""

_CHECK_TOL = 1e-6  # agreement required between evaluated value, MILP objective and dual bound


class ExactVerificationError(RuntimeError):
    """The MILP solver did not report an optimal solution, or its answer failed a self-check."""


def _solve(
    net: _Network, enc: Encoding, M: np.ndarray, c: np.ndarray, y: int, t: int
) -> tuple[float, np.ndarray]:
    """Minimum of ``f_y - f_t`` over the box and a flattened input attaining it."""
    objective = padded(M[y : y + 1] - M[t : t + 1], enc.n_var)[0]
    const = float(c[y] - c[t])
    lb, ub = enc.bounds()
    for options in (MILP_OPTIONS, RETRY_OPTIONS):
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="Unrecognized options", category=RuntimeWarning
            )
            warnings.simplefilter("error", OptimizeWarning)  # e.g. HiGHS rejected an option value
            res = milp(
                objective,
                integrality=np.concatenate(enc.integrality),
                bounds=Bounds(lb, ub),
                constraints=enc.constraints(),
                options=dict(options),
            )
        if res.status == 0 and res.x is not None:
            break
    if res.status != 0 or res.x is None:
        raise ExactVerificationError(
            f"HiGHS did not report an optimal solution for the margin y={y} vs t={t}: "
            f"status {res.status}, {res.message}"
        )
    x_star = np.clip(res.x[: net.lo.size], net.lo, net.hi)
    logits = net.logits(x_star)
    value = float(logits[y] - logits[t])
    tol = _CHECK_TOL * (1.0 + abs(value))
    found = float(res.fun) + const
    if abs(found - value) > tol:
        raise ExactVerificationError(
            f"MILP objective {found!r} disagrees with the network at its minimiser "
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


@dataclass
class _Network:
    """A model read for the verifier: its operations, a float64 copy of the torch model (the
    self-check's reference) and the input box."""

    ops: list[Op]
    model64: nn.Module
    shape: tuple[int, ...]
    lo: np.ndarray
    hi: np.ndarray

    def logits(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            inputs = torch.from_numpy(x.reshape(1, *self.shape).copy())
            return self.model64(inputs)[0].numpy()


def _network(model: nn.Module, x: Tensor, eps: float) -> _Network:
    eps = float(eps)
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    shape = tuple(x.shape)
    ops = network_float64(model, shape)
    xf = x.detach().cpu().double().numpy().ravel()
    lo, hi = np.maximum(xf - eps, 0.0), np.minimum(xf + eps, 1.0)
    if np.any(lo > hi):
        raise ValueError(f"the box around x is empty: x lies outside [0, 1] by more than eps={eps}")
    return _Network(ops, copy.deepcopy(model).cpu().double().eval(), shape, lo, hi)


def _classes(M: np.ndarray, y: int) -> list[int]:
    num_classes = M.shape[0]
    if num_classes < 2:
        raise ValueError(f"need at least 2 logits, the model has {num_classes}")
    if not 0 <= int(y) < num_classes:
        raise ValueError(f"label {y} out of range for {num_classes} classes")
    return [t for t in range(num_classes) if t != int(y)]


def _min_margins(model: nn.Module, x: Tensor, y: int, eps: float, stop: bool) -> np.ndarray:
    net = _network(model, x, eps)
    enc, M, c = encode(net.ops, net.lo, net.hi)
    margins = []
    for t in _classes(M, y):
        value, _ = _solve(net, enc, M, c, int(y), t)
        margins.append(value)
        if stop and value <= 0:
            break
    return np.asarray(margins, dtype=np.float64)


def exact_min_margins(model: nn.Sequential, x: Tensor, y: int, eps: float) -> np.ndarray:
    """Exact minimum of ``f_y(x') - f_t(x')`` over ``B(x, eps)`` for every class ``t != y``.

    Args:
        model: an eval-mode ``nn.Sequential`` of supported layers (see the module docstring).
        x: one input, shape (C, H, W) or (D,), without batch dimension, in [0, 1].
        y: the label.
        eps: the L-inf radius, >= 0; the set is also clipped to [0, 1].

    Returns:
        float64 array of shape (K - 1,), classes in increasing order with ``y`` left out. Exact up
        to the solver tolerances (about 1e-7; see the module docstring).
    """
    return _min_margins(model, x, y, eps, stop=False)


def exact_worst_input(model: nn.Sequential, x: Tensor, y: int, eps: float, t: int) -> Tensor:
    """An input of ``B(x, eps)`` attaining the minimum of ``f_y - f_t``; float64, shape of ``x``."""
    net = _network(model, x, eps)
    enc, M, c = encode(net.ops, net.lo, net.hi)
    if int(t) not in _classes(M, y):
        raise ValueError(f"t={t} must be a class other than y={y}")
    _, x_star = _solve(net, enc, M, c, int(y), int(t))
    return torch.from_numpy(x_star.reshape(tuple(x.shape)).copy())


def exact_certified(model: nn.Sequential, x: Tensor, y: int, eps: float) -> bool:
    """Whether every exact margin ``f_y - f_t`` is > 0 on all of ``B(x, eps)``."""
    return bool(np.all(_min_margins(model, x, y, eps, stop=True) > 0))


def count_binaries(model: nn.Sequential, x: Tensor, eps: float) -> int:
    """Binary variables of the MILP of ``B(x, eps)`` (0: the network is affine on the box)."""
    net = _network(model, x, eps)
    return encode(net.ops, net.lo, net.hi)[0].n_binaries


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
    if not exact_certified(model, x, y, 0.0):
        return 0.0
    if exact_certified(model, x, y, eps_max):
        return float(eps_max)
    good, bad = 0.0, float(eps_max)
    while bad - good > tol:
        mid = (good + bad) / 2
        if mid <= good or mid >= bad:  # float resolution reached
            break
        if exact_certified(model, x, y, mid):
            good = mid
        else:
            bad = mid
    return good
