"""The model as float64 operations and their mixed-integer encoding, for :mod:`exact`.

tests/exact.py explains the method; this module reads a model (:func:`network_float64`) and
builds the constraints of the network on an input box (:func:`encode`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import LinearConstraint
from scipy.sparse import csr_array
from torch import nn
from torch.nn.modules.utils import _pair

from acert.bounds.kinds import kind_of
from acert.foundation.errors import UnsupportedModelError
from acert.models import Residual

__all__ = ["Encoding", "Op", "encode", "forward_float64", "network_float64", "padded"]

_BOUND_SLACK = 1e-9  # relative widening of the interval bounds (covers float64 rounding)


# --------------------------------------------------------------------------------------------
# Model -> float64 operations
# --------------------------------------------------------------------------------------------


@dataclass
class Op:
    """One operation on flattened vectors.

    Attributes:
        kind: ``"affine"`` (``W h + b``), ``"relu"``, ``"maxpool"`` (output j is the maximum of
            the inputs ``windows[j]``), ``"fork"`` (a residual block's input, kept) or
            ``"join"`` (the kept input added to the current vector).
        W, b: the affine map, float64.
        windows: (n_out, K) input indices of each max-pooling window.
    """

    kind: str
    W: np.ndarray | None = None
    b: np.ndarray | None = None
    windows: np.ndarray | None = field(default=None, repr=False)


def _leaves(model: nn.Module) -> Iterator[nn.Module]:
    """The modules of a (possibly nested) plain Sequential, in execution order."""
    if type(model) is nn.Sequential:
        for module in model:
            yield from _leaves(module)
    else:
        yield model


def _affine_map(module: nn.Module, shape: tuple[int, ...]) -> tuple[Op, tuple[int, ...]]:
    """The module as ``W h + b`` on flattened inputs of per-sample ``shape``, from its forward
    pass in float64 on the basis vectors and on zero."""
    n = math.prod(shape)
    probe = copy.deepcopy(module).cpu().double()
    with torch.no_grad():
        try:
            zero = probe(torch.zeros(1, *shape, dtype=torch.float64))
            basis = probe(torch.eye(n, dtype=torch.float64).reshape(n, *shape))
        except RuntimeError as err:
            raise ValueError(f"{type(module).__name__} does not fit input {shape}: {err}") from err
    out_shape = tuple(zero.shape[1:])
    b = zero.reshape(-1).numpy().copy()
    W = (basis.reshape(n, -1) - zero.reshape(1, -1)).T.numpy().copy()
    return Op("affine", W, b), out_shape


def _maxpool(module: nn.MaxPool2d, shape: tuple[int, ...]) -> tuple[Op, tuple[int, ...]]:
    if len(shape) != 3:
        raise ValueError(f"MaxPool2d needs a (C, H, W) input, got shape {shape}")
    if _pair(module.padding) != (0, 0) or module.ceil_mode or module.return_indices:
        raise ValueError("MaxPool2d with padding, ceil_mode or return_indices is not encoded")
    channels = shape[0]
    index = torch.arange(math.prod(shape), dtype=torch.float64).view(1, *shape)
    columns = F.unfold(
        index, module.kernel_size, dilation=module.dilation, padding=0, stride=module.stride
    )
    kernel = columns.shape[1] // channels
    windows = columns.view(channels, kernel, -1).permute(0, 2, 1).reshape(-1, kernel)
    with torch.no_grad():
        out_shape = tuple(module(torch.zeros(1, *shape, dtype=torch.float64)).shape[1:])
    return Op("maxpool", windows=windows.long().numpy()), out_shape


def _ops(module: nn.Module, shape: tuple[int, ...], ops: list[Op]) -> tuple[int, ...]:
    """Append the operations of ``module`` on inputs of ``shape``; returns its output shape."""
    for leaf in _leaves(module):
        try:
            kind = kind_of(leaf)
        except UnsupportedModelError:
            raise TypeError(f"exact verifier has no rule for {type(leaf).__name__}") from None
        if kind.certify_check is not None and (problem := kind.certify_check(leaf)):
            raise ValueError(
                f"{type(leaf).__name__} layers must be in eval mode (call model.eval()): {problem}"
            )
        if type(leaf) is Residual:
            ops.append(Op("fork"))
            out = _ops(leaf.body, shape, ops)
            if out != shape:
                raise ValueError(f"a residual body maps {shape} to {out}")
            ops.append(Op("join"))
        elif isinstance(leaf, nn.ReLU):
            ops.append(Op("relu"))
        elif isinstance(leaf, nn.MaxPool2d):
            op, shape = _maxpool(leaf, shape)
            ops.append(op)
        elif kind.exactness != "relaxed" and kind.body is None:
            op, shape = _affine_map(leaf, shape)
            if ops and ops[-1].kind == "affine":  # compose with the map before
                previous = ops.pop()
                op = Op("affine", op.W @ previous.W, op.W @ previous.b + op.b)
            ops.append(op)
        else:
            raise TypeError(f"exact verifier has no rule for {type(leaf).__name__}")
    return shape


def network_float64(model: nn.Module, in_shape: Sequence[int]) -> list[Op]:
    """The model as float64 operations on the C-order flattening of one input of ``in_shape``.

    Raises:
        TypeError: a module the verifier cannot encode.
        ValueError: a module in train mode (batch-norm, dropout), or one that does not fit its
            input shape.
    """
    ops: list[Op] = []
    _ops(model, tuple(int(s) for s in in_shape), ops)
    return ops


def forward_float64(ops: Sequence[Op], x: np.ndarray) -> np.ndarray:
    """The network of :func:`network_float64` on flattened inputs ``x`` (n_0,) or (N, n_0)."""
    h = np.asarray(x, dtype=np.float64)
    skips = []
    for op in ops:
        if op.kind == "affine":
            h = h @ op.W.T + op.b
        elif op.kind == "relu":
            h = np.maximum(h, 0.0)
        elif op.kind == "maxpool":
            h = h[..., op.windows].max(-1)
        elif op.kind == "fork":
            skips.append(h)
        else:
            h = h + skips.pop()
    return h


# --------------------------------------------------------------------------------------------
# MILP encoding
# --------------------------------------------------------------------------------------------


@dataclass
class Encoding:
    """Variables and constraints shared by the MILPs of all classes for one input box."""

    lb: list[np.ndarray] = field(default_factory=list)
    ub: list[np.ndarray] = field(default_factory=list)
    integrality: list[np.ndarray] = field(default_factory=list)
    rows: list[np.ndarray] = field(default_factory=list)
    cols: list[np.ndarray] = field(default_factory=list)
    vals: list[np.ndarray] = field(default_factory=list)
    row_lo: list[float] = field(default_factory=list)
    row_hi: list[float] = field(default_factory=list)
    n_var: int = 0
    n_binaries: int = 0

    def variables(self, lower: np.ndarray, upper: np.ndarray, binary: bool = False) -> np.ndarray:
        index = np.arange(self.n_var, self.n_var + lower.size)
        self.n_var += lower.size
        self.lb.append(np.asarray(lower, dtype=np.float64))
        self.ub.append(np.asarray(upper, dtype=np.float64))
        self.integrality.append(np.full(lower.size, float(binary)))
        self.n_binaries += lower.size if binary else 0
        return index

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate(self.lb), np.concatenate(self.ub)

    def row(self, coeffs: dict[int, float] | np.ndarray, lower: float, upper: float) -> None:
        """``lower <= Σ coeffs[j] · v_j <= upper`` (coeffs dense over the first variables, or
        a dict index -> value)."""
        if isinstance(coeffs, np.ndarray):
            cols = np.flatnonzero(coeffs)
            vals = coeffs[cols]
        else:
            cols, vals = np.array(list(coeffs), dtype=np.int64), np.array(list(coeffs.values()))
        self.rows.append(np.full(cols.size, len(self.row_lo)))
        self.cols.append(cols)
        self.vals.append(vals)
        self.row_lo.append(lower)
        self.row_hi.append(upper)

    def constraints(self) -> LinearConstraint | None:
        if not self.row_lo:
            return None
        A = csr_array(
            (np.concatenate(self.vals), (np.concatenate(self.rows), np.concatenate(self.cols))),
            shape=(len(self.row_lo), self.n_var),
        )
        return LinearConstraint(A, np.array(self.row_lo), np.array(self.row_hi))


def padded(M: np.ndarray, n: int) -> np.ndarray:
    return np.pad(M, ((0, 0), (0, n - M.shape[1])))


def _interval(enc: Encoding, M: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bounds of the expression ``M v + c`` over the variables' bounds, widened slightly."""
    lb, ub = enc.bounds()
    lb, ub = lb[: M.shape[1]], ub[: M.shape[1]]
    centre = M @ ((lb + ub) / 2) + c
    spread = np.abs(M) @ ((ub - lb) / 2)
    slack = _BOUND_SLACK * (1.0 + np.abs(M) @ np.maximum(np.abs(lb), np.abs(ub)) + np.abs(c))
    return centre - spread - slack, centre + spread + slack


def _relu(enc: Encoding, M: np.ndarray, c: np.ndarray) -> np.ndarray:
    """The variables h = relu(M v + c)."""
    lower, upper = _interval(enc, M, c)
    h = enc.variables(np.maximum(lower, 0.0), np.maximum(upper, 0.0))
    for j in np.flatnonzero(lower >= 0):  # h = z
        enc.row(_minus(enc, M, j) + _unit(enc, h[j]), c[j], c[j])
    for j in np.flatnonzero((lower < 0) & (upper > 0)):
        (a,) = enc.variables(np.zeros(1), np.ones(1), binary=True)
        h_minus_z = _minus(enc, M, j) + _unit(enc, h[j])
        enc.row(h_minus_z, c[j], np.inf)  # h >= z
        enc.row(h_minus_z - lower[j] * _unit(enc, a), -np.inf, c[j] - lower[j])  # h <= z - l(1-a)
        enc.row({int(h[j]): 1.0, int(a): -upper[j]}, -np.inf, 0.0)  # h <= u a
    return h


def _unit(enc: Encoding, index: int) -> np.ndarray:
    e = np.zeros(enc.n_var)
    e[index] = 1.0
    return e


def _minus(enc: Encoding, M: np.ndarray, j: int) -> np.ndarray:
    """``-M[j]`` over all variables so far (the expression's own terms on the left side)."""
    return padded(-M[j : j + 1], enc.n_var)[0]


def _maxpool_vars(enc: Encoding, M: np.ndarray, c: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """The variables y_j = max of the expressions ``windows[j]``."""
    lower, upper = _interval(enc, M, c)
    lo_w, up_w = lower[windows], upper[windows]
    y = enc.variables(lo_w.max(1), up_w.max(1))
    for j, window in enumerate(windows):
        best = int(np.argmax(lo_w[j]))
        others = np.delete(up_w[j], best)
        for i in window:  # y >= z_i
            enc.row(_minus(enc, M, i) + _unit(enc, y[j]), c[i], np.inf)
        if others.size == 0 or lo_w[j, best] >= others.max():  # y <= z_best
            i = window[best]
            enc.row(_minus(enc, M, i) + _unit(enc, y[j]), -np.inf, c[i])
            continue
        candidates = [k for k in range(window.size) if up_w[j, k] >= lo_w[j].max()]
        binaries = enc.variables(np.zeros(len(candidates)), np.ones(len(candidates)), True)
        enc.row({int(a): 1.0 for a in binaries}, 1.0, 1.0)
        top = up_w[j].max()
        for k, a in zip(candidates, binaries, strict=True):
            i, big = window[k], top - lo_w[j, k]
            row = _minus(enc, M, i) + _unit(enc, y[j]) + big * _unit(enc, a)
            enc.row(row, -np.inf, c[i] + big)  # y <= z_i + (max u - l_i)(1 - a_i)
    return y


def encode(
    ops: Sequence[Op], lo: np.ndarray, hi: np.ndarray
) -> tuple[Encoding, np.ndarray, np.ndarray]:
    """The constraints of the network on the box ``[lo, hi]``, and the logits as ``M v + c``."""
    enc = Encoding()
    x = enc.variables(lo.copy(), hi.copy())
    M, c = np.eye(x.size), np.zeros(x.size)
    skips: list[tuple[np.ndarray, np.ndarray]] = []
    for op in ops:
        if op.kind == "affine":
            M, c = op.W @ M, op.W @ c + op.b
        elif op.kind in ("relu", "maxpool"):
            made = _relu(enc, M, c) if op.kind == "relu" else _maxpool_vars(enc, M, c, op.windows)
            M, c = np.zeros((made.size, enc.n_var)), np.zeros(made.size)
            M[np.arange(made.size), made] = 1.0
        elif op.kind == "fork":
            skips.append((M, c))
        else:
            skip_M, skip_c = skips.pop()
            n = max(M.shape[1], skip_M.shape[1])
            M, c = padded(M, n) + padded(skip_M, n), c + skip_c
    return enc, M, c
