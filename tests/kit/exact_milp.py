"""The model as float64 operations and their mixed-integer encoding, for :mod:`exact`.

tests/kit/exact.py explains the method; this module reads a model (:func:`network_float64`) and
builds the constraints of the network on an input box (:func:`encode`).
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Sequence
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
from acert.models import Add, Concat, GraphNet, Residual

__all__ = ["Encoding", "Op", "encode", "forward_float64", "network_float64", "padded"]

_BOUND_SLACK = 1e-9  # relative widening of the interval bounds (covers float64 rounding)


# --------------------------------------------------------------------------------------------
# Model -> float64 operations
# --------------------------------------------------------------------------------------------


@dataclass
class Op:
    """One operation on flattened vectors, reading earlier operations' outputs.

    Attributes:
        kind: ``"affine"`` (``W h + b``), ``"relu"`` (``max(h, slope·h)``: ReLU and
            LeakyReLU), ``"maxpool"`` (output j is the maximum of the inputs ``windows[j]``),
            ``"add"`` (the sum of its inputs) or ``"select"`` (output j is element
            ``windows[j]`` of its inputs' outputs one after another: a concatenation).
        W, b: the affine map, float64.
        windows: (n_out, K) input indices of each max-pooling window; (n_out,) for select.
        inputs: the operations it reads (-1: the network's input).
        slope: a ReLU's slope below zero.
    """

    kind: str
    W: np.ndarray | None = None
    b: np.ndarray | None = None
    windows: np.ndarray | None = field(default=None, repr=False)
    inputs: tuple[int, ...] = ()
    slope: float = 0.0


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


def _concat_select(layer: nn.Module, shapes: list[tuple[int, ...]]) -> tuple[np.ndarray, tuple]:
    """The C-order indices, into the inputs' flattenings one after another, of each element
    of their concatenation, and its shape."""
    starts = np.cumsum([0] + [math.prod(s) for s in shapes])
    parts = [
        torch.arange(start, start + math.prod(s), dtype=torch.float64).reshape(1, *s)
        for start, s in zip(starts, shapes, strict=False)
    ]
    joined = layer(*parts)
    return joined.reshape(-1).long().numpy(), tuple(joined.shape[1:])


def _nodes(module: nn.Module, source: int, nodes: list[tuple[nn.Module, tuple[int, ...]]]) -> int:
    """Append the leaf modules of ``module`` reading node ``source`` with the nodes each reads
    (a plain Sequential is a chain, a residual block its body and a sum, a GraphNet its
    nodes); returns the node giving its output."""
    if type(module) is nn.Sequential:
        for layer in module:
            source = _nodes(layer, source, nodes)
        return source
    if type(module) is Residual:
        out = _nodes(module.body, source, nodes)
        nodes.append((Add(), (source, out)))
        return len(nodes) - 1
    if type(module) is GraphNet:
        outputs: list[int] = []
        for layer, inputs in zip(module.nodes, module.inputs, strict=True):
            reads = tuple(source if j == -1 else outputs[j] for j in inputs)
            if len(reads) == 1:
                outputs.append(_nodes(layer, reads[0], nodes))
            else:
                nodes.append((layer, reads))
                outputs.append(len(nodes) - 1)
        return outputs[-1]
    nodes.append((module, (source,)))
    return len(nodes) - 1


def _ops(model: nn.Module, shape: tuple[int, ...], ops: list[Op]) -> tuple[int, ...]:
    """Append the operations of ``model``'s graph on inputs of ``shape``; returns its output
    shape."""
    nodes: list[tuple[nn.Module, tuple[int, ...]]] = []
    _nodes(model, -1, nodes)
    readers = Counter(i for _, inputs in nodes for i in inputs)
    shapes: dict[int, tuple[int, ...]] = {-1: shape}
    for index, (leaf, ins) in enumerate(nodes):
        in_shapes = [shapes[i] for i in ins]
        try:
            kind = kind_of(leaf)
        except UnsupportedModelError:
            raise TypeError(f"exact verifier has no rule for {type(leaf).__name__}") from None
        if kind.certify_check is not None and (problem := kind.certify_check(leaf)):
            raise ValueError(
                f"{type(leaf).__name__} layers must be in eval mode (call model.eval()): {problem}"
            )
        if isinstance(leaf, Add):
            if any(s != in_shapes[0] for s in in_shapes):
                raise ValueError(f"an addition of shapes {in_shapes}")
            op, out = Op("add", inputs=ins), in_shapes[0]
        elif isinstance(leaf, Concat):
            select, out = _concat_select(leaf, in_shapes)
            op = Op("select", windows=select, inputs=ins)
        elif isinstance(leaf, nn.ReLU | nn.LeakyReLU):
            slope = float(getattr(leaf, "negative_slope", 0.0))
            if not 0.0 <= slope < 1.0:
                raise TypeError(f"exact verifier has no rule for a LeakyReLU of slope {slope}")
            op, out = Op("relu", inputs=ins, slope=slope), in_shapes[0]
        elif isinstance(leaf, nn.MaxPool2d):
            op, out = _maxpool(leaf, in_shapes[0])
            op.inputs = ins
        elif kind.exactness != "relaxed" and kind.arity == 1:
            op, out = _affine_map(leaf, in_shapes[0])
            op.inputs = ins
            (source,) = ins
            if source != -1 and ops[source].kind == "affine" and readers[source] == 1:
                previous = ops[source]  # compose with the map before, which only it reads
                W, b = op.W @ previous.W, op.W @ previous.b + op.b
                op = Op("affine", W, b, inputs=previous.inputs)
                ops[source] = Op("dead")
        else:
            raise TypeError(f"exact verifier has no rule for {type(leaf).__name__}")
        ops.append(op)
        shapes[index] = tuple(out)
    kept = {-1: -1}  # drop the maps composed into the next one
    for index, op in enumerate(ops):
        if op.kind != "dead":
            kept[index] = len(kept) - 1
    ops[:] = [
        Op(op.kind, op.W, op.b, op.windows, tuple(kept[i] for i in op.inputs), op.slope)
        for op in ops
        if op.kind != "dead"
    ]
    return shapes[len(nodes) - 1]


def network_float64(model: nn.Module, in_shape: Sequence[int]) -> list[Op]:
    """The model as float64 operations on the C-order flattening of one input of ``in_shape``;
    the last operation gives the logits.

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
    values = {-1: np.asarray(x, dtype=np.float64)}
    h = values[-1]
    for index, op in enumerate(ops):
        ins = [values[i] for i in op.inputs]
        if op.kind == "affine":
            h = ins[0] @ op.W.T + op.b
        elif op.kind == "relu":
            h = np.maximum(ins[0], op.slope * ins[0])
        elif op.kind == "maxpool":
            h = ins[0][..., op.windows].max(-1)
        elif op.kind == "add":
            h = sum(ins[1:], ins[0])
        else:  # select
            h = np.concatenate(ins, -1)[..., op.windows]
        values[index] = h
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
    exprs: dict[int, tuple[np.ndarray, np.ndarray]] = {-1: (np.eye(x.size), np.zeros(x.size))}
    M, c = exprs[-1]
    for index, op in enumerate(ops):
        ins = [exprs[i] for i in op.inputs]
        M, c = ins[0]
        if op.kind == "affine":
            M, c = op.W @ M, op.W @ c + op.b
        elif op.kind in ("relu", "maxpool"):
            made = _relu(enc, M, c) if op.kind == "relu" else _maxpool_vars(enc, M, c, op.windows)
            relu_M = np.zeros((made.size, enc.n_var))
            relu_M[np.arange(made.size), made] = 1.0
            if op.slope:  # max(z, a·z) = a·z + (1 - a)·relu(z)
                relu_M = op.slope * padded(M, enc.n_var) + (1 - op.slope) * relu_M
                M, c = relu_M, op.slope * c
            else:
                M, c = relu_M, np.zeros(made.size)
        else:
            n = max(m.shape[1] for m, _ in ins)
            if op.kind == "add":
                M, c = padded(ins[0][0], n), ins[0][1]
                for m, v in ins[1:]:
                    M, c = M + padded(m, n), c + v
            else:  # select
                M = np.vstack([padded(m, n) for m, _ in ins])[op.windows]
                c = np.concatenate([v for _, v in ins])[op.windows]
        exprs[index] = (M, c)
    return enc, M, c
