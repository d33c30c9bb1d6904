"""Any ``nn.Module`` as a graph of layer kinds: ``torch.fx`` symbolic tracing with every module
type of the kind table (:data:`acert.bounds.kinds.SUPPORTED_LAYERS`) kept whole, and the
functional forms people write turned into modules: ``F.relu``/``torch.relu``/``x.relu()`` into
``nn.ReLU``, ``F.leaky_relu(x, s)`` into ``nn.LeakyReLU(s)``, ``a + b``/``torch.add`` into
:class:`~acert.models.layers.Add`, ``torch.cat(xs, d)`` into
:class:`~acert.models.layers.Concat`, ``torch.flatten(x, 1)``/``x.view(x.size(0), -1)`` into
``nn.Flatten``, ``F.avg_pool2d``/``F.max_pool2d`` into their modules.

:func:`bounds_form` is what the library calls: an ``nn.Sequential`` of supported layers stays
as it is (its bounds are those of the chain), a :class:`~acert.models.graph.GraphNet` too,
any other model is traced once (the graph is cached per model; it shares the model's modules,
so training the model trains the graph). A traced graph is refused unless it computes the
model's output bit for bit on a probe input in train and eval mode; so is an in-place write
whose old value the forward reads again (tracing would see it as out of place), and every
operation without a kind, each with one line naming it and where it is in the forward.
"""

from __future__ import annotations

import math
import operator
import os
import traceback
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from acert.bounds import kinds
from acert.bounds.tracing_checks import (
    check_in_place,
    check_probe,
    propagate_shapes,
)
from acert.foundation.errors import UnsupportedModelError
from acert.models import INPUT, Add, Concat, GraphNet

__all__ = [
    "as_graph",
    "bounds_form",
    "first_layer",
    "is_plain_chain",
    "last_layer",
]

_JOINS: tuple[type[nn.Module], ...] = (Add, Concat, nn.LeakyReLU)
"""Kept whole even before the bounds have a rule for them, so that the walk names them."""


class _Proxy(fx.Proxy):
    """A proxy that records ``a += b`` as ``operator.iadd`` (``fx.Proxy`` has no ``__iadd__``,
    so Python would record ``a + b`` and lose the write to ``a``)."""

    def __iadd__(self, other: object) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", operator.iadd, (self, other), {})


class _Tracer(fx.Tracer):
    def create_node(self, *args: object, **kwargs: object) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        node.meta["where"] = _user_frame()
        return node

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return type(m) in (*kinds.SUPPORTED_LAYERS, *_JOINS) or super().is_leaf_module(
            m, module_qualified_name
        )


def is_plain_chain(model: nn.Module) -> bool:
    """True for an ``nn.Sequential`` (not a subclass, no forward of its own) whose every layer
    has a kind: the bounds take it as it is."""
    return (
        type(model) is nn.Sequential
        and "forward" not in vars(model)
        and len(model) > 0
        and all(type(layer) in kinds.SUPPORTED_LAYERS or type(layer) is GraphNet for layer in model)
    )


_GRAPHS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, GraphNet]] = weakref.WeakKeyDictionary()


def _modules_of(model: nn.Module) -> tuple:
    """What a cached graph was traced from: every module's name and identity (a layer
    replaced after tracing, ``model.fc = nn.Linear(...)``, makes the graph stale)."""
    return tuple((name, id(module)) for name, module in model.named_modules())


def bounds_form(model: nn.Module, shape: tuple[int, ...] | None = None) -> nn.Module:
    """The model the bounds walk: ``model`` itself when it is a plain chain
    (:func:`is_plain_chain`) or a :class:`GraphNet`, else its traced graph (:func:`as_graph`),
    traced once per model and cached while the model holds the same modules (``shape``, the
    input shape without the batch, is needed when it is traced: the probe input has it); hooks
    are refused on every call, those added after tracing too."""
    if is_plain_chain(model) or isinstance(model, GraphNet):
        return model
    if isinstance(model, nn.Sequential) and len(model) == 0:
        raise UnsupportedModelError("the model is an empty nn.Sequential; give it its layers")
    kinds.check_hooks(model)
    modules = _modules_of(model)
    traced, graph = _GRAPHS.get(model, ((), None))
    if graph is None or traced != modules:
        if shape is None:
            raise UnsupportedModelError(
                f"{type(model).__name__} must be traced into a graph before its bounds, which "
                "needs the input shape; pass inputs first (acert.certify, margin_bounds)"
            )
        graph = as_graph(model, shape)
        last_layer(graph)
        _GRAPHS[model] = (modules, graph)
    graph.training = model.training  # its own flag: eval_mode(graph) restores it to all
    return graph


def last_layer(form: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` that gives the logits of a bounds form (:func:`bounds_form`), into
    which the margin specification is folded; a one-line error for any other last layer."""
    if isinstance(form, GraphNet):
        last, inputs = form.nodes[-1], form.inputs[-1]
        if isinstance(last, nn.Linear) and inputs == (len(form.nodes) - 2,):
            return last
        name = f"{type(last).__name__} of nodes {list(inputs)} (node {form.names[-1]})"
    elif isinstance(form, nn.Sequential) and len(form) and isinstance(form[-1], nn.Linear):
        return form[-1]
    else:
        name = type(form[-1]).__name__ if isinstance(form, nn.Sequential) and len(form) else "?"
    raise UnsupportedModelError(
        f"the model's output must be an nn.Linear of the layer before it (the margin "
        f"specification is folded into it), got {name}; end forward with the logits' Linear"
    )


def first_layer(form: nn.Module) -> nn.Module:
    """The layer that reads the input first (a chain's first, a graph's first node)."""
    return form[0] if isinstance(form, nn.Sequential) else form.nodes[0]


def as_graph(model: nn.Module, shape: tuple[int, ...]) -> GraphNet:
    """``model`` as a :class:`GraphNet` by ``torch.fx`` symbolic tracing (module docstring).

    Args:
        model: any ``nn.Module`` whose forward takes one tensor and returns the logits.
        shape: the input shape without the batch, for the probe input that the graph must
            reproduce bit for bit (:func:`acert.bounds.tracing_checks.check_probe`).

    Raises a one-line :class:`UnsupportedModelError` for a forward ``torch.fx`` cannot trace,
    an operation without a kind, an in-place write whose old value is read again, and a graph
    that computes another output than the model.
    """
    name = type(model).__name__
    kinds.check_hooks(model)
    try:
        traced = _Tracer().trace(model)
    except Exception as err:  # fx raises TraceError, TypeError, AttributeError, ... alike
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UnsupportedModelError(
            f"torch.fx cannot trace {name}.forward ({first}); move data-dependent control flow "
            "(if/for on tensor values) out of forward, or build the model as an nn.Sequential "
            "of supported layers"
        ) from err
    gm = fx.GraphModule(model, traced, name)
    check_in_place(gm, name)
    converter = _Converter(gm, name)
    converter.check_modules()  # named before the shapes, which an unsupported layer may break
    propagate_shapes(model, gm, shape)
    graph = GraphNet(converter.nodes())
    check_probe(model, graph, shape)
    return graph


_RELUS = {F.relu, torch.relu, F.relu_, torch.relu_}
_LEAKY = {F.leaky_relu, F.leaky_relu_}
_ADDS = {operator.add, operator.iadd, torch.add}
_FLATTENS = {"view", "reshape"}
_SHAPE_NODES = {"size", "shape"}
SUPPORTED_FUNCTIONS = (
    "F.relu, F.leaky_relu, a + b, torch.cat(xs, dim), torch.flatten(x, 1), "
    "x.view(x.size(0), -1), F.avg_pool2d, F.max_pool2d"
)


_LIBRARIES = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(__file__)))


def _user_frame() -> str | None:
    """The innermost frame of the forward being traced that is the user's (not torch's or
    acert's: an ``nn.Sequential``'s forward has none)."""
    for frame in reversed(traceback.extract_stack()):
        if not frame.filename.startswith(_LIBRARIES):
            return f"{os.path.basename(frame.filename)}:{frame.lineno} `{frame.line}`"
        if frame.name in ("trace", "as_graph"):
            break
    return None


def _where(node: fx.Node) -> str:
    where = node.meta.get("where")
    return f"node {node.name}" + (f" ({where})" if where else "")


class _Converter:
    """The nodes of a traced module as ``(name, module, inputs)`` for :class:`GraphNet`."""

    def __init__(self, gm: fx.GraphModule, name: str) -> None:
        self.gm, self.name = gm, name
        self.index: dict[fx.Node, int] = {}
        self.out: list[tuple[str, nn.Module, list[int]]] = []
        self.shape_nodes: set[fx.Node] = set()
        self.live: set[fx.Node] = set()

    def nodes(self) -> list[tuple[str, nn.Module, list[int]]]:
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise UnsupportedModelError(
                f"{self.name}.forward takes {len(placeholders)} inputs; the bounds need a "
                "forward of one input tensor"
            )
        self.index[placeholders[0]] = INPUT
        self.live = _live(self.gm.graph)
        for node in self.gm.graph.nodes:
            if node in self.live and node.op not in ("placeholder", "output"):
                self._convert(node)
        output = next(n for n in self.gm.graph.nodes if n.op == "output")
        result = output.args[0]
        if not isinstance(result, fx.Node) or self.index.get(result) != len(self.out) - 1:
            raise UnsupportedModelError(
                f"{self.name}.forward must return one tensor computed by a layer (the logits), "
                f"got {result!r}"
            )
        self._check_shape_nodes()
        return self.out

    def check_modules(self) -> None:
        """Refuse the first module of the forward that has no kind."""
        for node in self.gm.graph.nodes:
            if node.op == "call_module":
                module = self.gm.get_submodule(str(node.target))
                if type(module) not in (*kinds.SUPPORTED_LAYERS, *_JOINS):
                    self._refuse(node, f"layer {node.target} ({type(module).__name__})")

    def _convert(self, node: fx.Node) -> None:
        if node.op == "get_attr":
            raise UnsupportedModelError(
                f"{self.name}.forward uses the tensor self.{node.target} directly ({_where(node)}),"
                " which the bounds cannot follow; put it in a module of a supported kind "
                f"({_kind_names()})"
            )
        if self._is_shape(node):
            self.shape_nodes.add(node)
            return
        if node.op == "call_module":
            module = self.gm.get_submodule(str(node.target))
            if type(module) not in (*kinds.SUPPORTED_LAYERS, *_JOINS) or node.kwargs:
                self._refuse(node, f"layer {node.target} ({type(module).__name__})")
            self._add(str(node.target), module, node.args, node)
            return
        made = self._functional(node)
        if made is None:
            self._refuse(node, _describe(node))
        module, inputs = made
        self._add(node.name, module, inputs, node)

    def _add(self, name: str, module: nn.Module, args: tuple, node: fx.Node) -> None:
        if not args or any(not isinstance(a, fx.Node) or a not in self.index for a in args):
            self._refuse(node, _describe(node))
        self.index[node] = len(self.out)
        self.out.append((name, module, [self.index[a] for a in args]))

    def _functional(self, node: fx.Node) -> tuple[nn.Module, tuple] | None:
        target, args, kw = node.target, node.args, dict(node.kwargs)
        kw.pop("inplace", None)  # in-place writes were checked (check_in_place): exact here
        method = target if node.op == "call_method" else None
        if target in _RELUS or method in ("relu", "relu_"):
            return (nn.ReLU(), args[:1]) if len(args) == 1 and not kw else None
        if target in _LEAKY or method in ("leaky_relu", "leaky_relu_"):
            slope = _bind(lambda x, negative_slope=0.01, inplace=False: negative_slope, args, kw)
            if not isinstance(slope, int | float) or isinstance(slope, bool):
                return None  # a slope computed in forward has no kind
            return nn.LeakyReLU(slope), args[:1]
        if (target in _ADDS or method in ("add", "add_")) and len(args) == 2 and not kw:
            return Add(), args
        if target is torch.cat:
            return self._cat(node, args, kw)
        if target is torch.flatten or method == "flatten":
            dims = _bind(lambda x, start_dim=0, end_dim=-1: (start_dim, end_dim), args, kw)
            return (nn.Flatten(), args[:1]) if dims == (1, -1) else None
        if method in _FLATTENS or target is torch.reshape:
            return (nn.Flatten(), args[:1]) if self._is_batch_flatten(node) else None
        if target in (F.avg_pool2d, F.max_pool2d):
            return _pool(target, args, kw)
        return None

    def _cat(self, node: fx.Node, args: tuple, kw: dict) -> tuple[nn.Module, tuple] | None:
        bound = _bind(lambda tensors, dim=0: (tensors, dim), args, kw)
        if bound is None or not isinstance(bound[0], list | tuple) or not isinstance(bound[1], int):
            return None
        tensors, dim = bound
        rank = len(_shape(node)) if dim < 0 and _shape(node) is not None else None
        dim = dim + rank if rank is not None else dim
        return (Concat(dim), tuple(tensors)) if dim >= 1 else None

    def _is_shape(self, node: fx.Node) -> bool:
        """``x.size()``, ``x.size(0)``, ``x.shape`` and ``[0]`` of those: read by a batch
        flatten (checked in :meth:`_check_shape_nodes`)."""
        if node.op == "call_method" and node.target == "size":
            return True
        if node.op == "call_function" and node.target is getattr and node.args[1] == "shape":
            return True
        return (
            node.op == "call_function"
            and node.target is operator.getitem
            and node.args[0] in self.shape_nodes
        )

    def _is_batch_flatten(self, node: fx.Node) -> bool:
        """``x.view(n, -1)``/``x.reshape((n, -1))``/``torch.reshape(x, (n, -1))`` with ``n`` a
        tensor's batch size (``t.size(0)``, ``t.shape[0]``, ``t.size()[0]``), or ``-1, D`` with
        D the number of features of each sample."""
        sizes = node.args[1:]
        if len(sizes) == 1 and isinstance(sizes[0], list | tuple):
            sizes = tuple(sizes[0])
        if node.kwargs or len(sizes) != 2:
            return False
        first, second = sizes
        if second == -1 and isinstance(first, fx.Node):
            return _is_batch_size(first)
        shape = _shape(node.args[0])
        return first == -1 and shape is not None and second == math.prod(shape[1:])

    def _check_shape_nodes(self) -> None:
        """A tensor's size read by anything but a batch flatten has no bound rule."""
        for node in self.shape_nodes:
            for user in node.users:
                flatten = user.target in _FLATTENS or user.target is torch.reshape
                if user in self.live and user not in self.shape_nodes and not flatten:
                    self._refuse(user, _describe(user))

    def _refuse(self, node: fx.Node, what: str) -> None:
        raise UnsupportedModelError(
            f"{what} has no bound rule; supported layers are {_kind_names()}, and the "
            f"functional forms {SUPPORTED_FUNCTIONS}; it is {_where(node)} in "
            f"{self.name}.forward"
        )


def _is_batch_size(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target == "size":
        return node.args[1:] == (0,) or node.kwargs == {"dim": 0}
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0:
        source = node.args[0]
        return isinstance(source, fx.Node) and (
            (source.op == "call_method" and source.target == "size" and len(source.args) == 1)
            or (source.target is getattr and source.args[1] == "shape")
        )
    return False


def _pool(target: Callable, args: tuple, kw: dict) -> tuple[nn.Module, tuple] | None:
    module = nn.AvgPool2d if target is F.avg_pool2d else nn.MaxPool2d
    if module is nn.MaxPool2d and len(args) > 5:  # F's ceil_mode, return_indices: swapped
        return None
    try:
        return module(*args[1:], **kw), args[:1]
    except TypeError:
        return None


def _bind(signature: Callable, args: tuple, kw: dict) -> object | None:
    try:
        return signature(*args, **kw)
    except TypeError:
        return None


def _shape(node: object) -> tuple[int, ...] | None:
    meta = getattr(node, "meta", {}).get("tensor_meta")
    return tuple(meta.shape) if meta is not None else None


def _live(graph: fx.Graph) -> set[fx.Node]:
    """The nodes the output depends on (the others compute nothing the model returns; an
    in-place write among them was checked by :func:`check_in_place`)."""
    output = next(n for n in graph.nodes if n.op == "output")
    live, todo = set(), [output]
    while todo:
        node = todo.pop()
        if node not in live:
            live.add(node)
            todo.extend(node.all_input_nodes)
    return live


def _describe(node: fx.Node) -> str:
    if node.op == "call_method":
        return f"the method .{node.target}()"
    target = node.target
    owner = getattr(target, "__module__", None) or ""
    label = getattr(target, "__name__", str(target))
    prefix = {"torch.nn.functional": "F.", "_operator": "operator."}.get(
        owner, "torch." if owner.startswith("torch") or owner == "" else f"{owner}."
    )
    return f"the operation {prefix}{label}"


def _kind_names() -> str:
    return ", ".join(t.__name__ for t in kinds.SUPPORTED_LAYERS)
