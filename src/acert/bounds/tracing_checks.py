"""What tracing (:mod:`acert.bounds.tracing`) cannot see, checked: hooks, in-place writes
(recorded in the traced graph as if out of place) and a forward that computes something else
under tracing than when it runs, which a probe input shows."""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from acert.bounds import kinds
from acert.foundation.errors import AcertError, UnsupportedModelError

__all__ = ["check_in_place", "check_probe", "propagate_shapes"]


_WRITING_FUNCTIONS = {F.relu_, torch.relu_, F.leaky_relu_, operator.iadd}
_VIEW_METHODS = {"view", "reshape", "flatten", "contiguous", "view_as", "reshape_as"}
_RELUS = {F.relu, torch.relu, F.relu_, torch.relu_}


def _writes(node: fx.Node, gm: fx.GraphModule) -> bool:
    """True when the node overwrites its first input."""
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(str(node.target)), "inplace", False))
    if node.op == "call_method":
        return str(node.target).endswith("_")
    if node.op == "call_function":
        return node.target in _WRITING_FUNCTIONS or node.kwargs.get("inplace") is True
    return False


def _aliases(node: fx.Node, gm: fx.GraphModule) -> bool:
    """True when the node's output may be its first input or a view of it."""
    if _writes(node, gm):
        return True
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return type(module) in kinds.SUPPORTED_LAYERS and kinds.kind_of(module).aliases
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    return node.op == "call_function" and node.target in (torch.flatten, torch.reshape)


def _is_relu(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))) is nn.ReLU
    return node.target in _RELUS or (node.op == "call_method" and node.target in ("relu", "relu_"))


def check_in_place(gm: fx.GraphModule, name: str) -> None:
    """Refuse an in-place write (``nn.ReLU(inplace=True)``, ``x.relu_()``,
    ``F.relu(x, inplace=True)``, ``x += y``) whose old value the forward reads afterwards (a
    node that read it, or a view of it, runs after the write), or that overwrites the model's
    input (the caller, the bounds and the attacks read it again) or a ReLU's output (autograd
    keeps it): tracing records the write as a new tensor, so the graph would compute
    another function than the model. Elsewhere the write is exact and is traced as it is."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    for writer in gm.graph.nodes:
        if not _writes(writer, gm) or not isinstance(writer.args[0], fx.Node):
            continue
        group = _old_value(writer, gm, order)
        reader = next(
            (
                f"{user.name} ({_line(user)})"
                for node in group
                for user in node.users
                if user is not writer and order[user] > order[writer]
            ),
            None,
        )
        earlier = next(
            (
                f"{user.name} ({_line(user)}), which ran before it and autograd may keep"
                for node in group
                for user in node.users
                if order[user] < order[writer] and not _aliases(user, gm)
            ),
            None,
        )
        consequence = "so the traced graph would compute another function than the model"
        if any(node.op == "placeholder" for node in group):
            reader = "the model's input, which the caller, the bounds and the attacks read again"
        elif reader is None and any(_is_relu(node, gm) for node in group):
            reader = "autograd (it keeps a ReLU's output for the gradient)"
            consequence = "so its gradient (training, attacks) cannot be computed"
        elif reader is None and earlier is not None:
            reader = earlier
            consequence = "so its gradient (training, attacks) cannot be computed"
        if reader is not None:
            raise UnsupportedModelError(
                f"{name}.forward writes {writer.args[0].name} in place at {writer.name} "
                f"({_line(writer)}), but {reader} reads the old value, {consequence}; "
                f"{_fix(writer, gm)}"
            )


def _old_value(writer: fx.Node, gm: fx.GraphModule, order: dict[fx.Node, int]) -> set[fx.Node]:
    """The nodes before ``writer`` that hold the tensor it overwrites or views of it."""
    root = writer.args[0]
    while _aliases(root, gm) and isinstance(root.args[0], fx.Node):
        root = root.args[0]
    group, todo = set(), [root]
    while todo:
        node = todo.pop()
        if node in group or order[node] >= order[writer]:
            continue
        group.add(node)
        todo.extend(u for u in node.users if _aliases(u, gm) and u.args[0] is node)
    return group


def _fix(writer: fx.Node, gm: fx.GraphModule) -> str:
    if writer.op == "call_module":
        kind = type(gm.get_submodule(str(writer.target))).__name__
        return f"use nn.{kind}() instead of nn.{kind}(inplace=True)"
    if writer.target is operator.iadd:
        return "write x = x + y instead of x += y"
    return "use the out-of-place form (F.relu(x), x.relu(), x + y)"


def _line(node: fx.Node) -> str:
    return str(node.meta.get("where") or "in forward")


@contextlib.contextmanager
def _mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Every module in ``training`` mode, its buffers (running statistics) restored after."""
    modes = {m: m.training for m in model.modules()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    model.train(training)
    try:
        yield
    finally:
        for module, mode in modes.items():
            module.training = mode
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(buffers[n])


def _probe(model: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    tensor = next(iter((*model.parameters(), *model.buffers())), None)
    dtype = tensor.dtype if tensor is not None and tensor.is_floating_point() else torch.float32
    device = tensor.device if tensor is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    return torch.rand((2, *shape), generator=generator, dtype=dtype).to(device)


def _run(module: nn.Module, x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return module(x)
    except (RuntimeError, ValueError, IndexError, TypeError) as err:
        cause = err.__cause__ or err  # ShapeProp wraps the layer's own error
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise AcertError(f"input of shape {shape} does not fit the model: {first}") from err


def propagate_shapes(model: nn.Module, gm: fx.GraphModule, shape: tuple[int, ...]) -> None:
    """Each node's output shape on an input of ``shape`` (``node.meta["tensor_meta"]``)."""
    probe = _probe(model, shape)
    with _mode(model, False):
        _run(lambda x: ShapeProp(gm).propagate(x), probe, shape)


def check_probe(model: nn.Module, graph: nn.Module, shape: tuple[int, ...]) -> None:
    """Refuse a graph that does not compute ``model``'s output bit for bit on a probe input
    in eval and in train mode (a forward that reads ``self.training`` or state at tracing
    time, or that writes its input)."""
    probe = _probe(model, shape)
    for training in (False, True):
        with _mode(model, training):
            given = probe.clone()
            expected = _run(model, given, shape)
            if not torch.equal(given, probe):
                raise UnsupportedModelError(
                    f"{type(model).__name__}.forward writes its input in place, which the "
                    "caller, the bounds and the attacks read again; compute out of place"
                )
        with _mode(model, training):
            got = _run(graph, probe.clone(), shape)
        if got.shape != expected.shape or not torch.equal(got, expected):
            gap = (got - expected).abs().max().item() if got.shape == expected.shape else "shape"
            raise UnsupportedModelError(
                f"the traced graph of {type(model).__name__} computes another output than its "
                f"forward in {'train' if training else 'eval'} mode (largest difference {gap}) "
                "on a probe input; it is refused, not certified: make forward depend on its "
                "input only (no state or mode read while it runs) or build an nn.Sequential"
            )
