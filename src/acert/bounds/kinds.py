"""The table of layer kinds, and the one walk over a model that every bound method follows.

:data:`LAYER_KINDS` holds every module type the bounds support, each with its rules for IBP,
CROWN (dense and on patches), the rounding of CROWN's backward steps, its output shape and its
checks (:class:`acert.bounds.kind_rules.LayerKind`). :func:`walk` turns a model (a chain of
layers or a :class:`acert.models.GraphNet`) into the nodes of its graph, in topological order,
each with the steps it reads: a batch-norm folded into the Linear/Conv2d before it, a residual
block as its body's steps and an ``Add`` of the block's input and the body's output; the walk is
the only place that knows about residual blocks. IBP (:mod:`acert.bounds.ibp`), CROWN
(:mod:`acert.bounds.crown`), the patch pass (:mod:`acert.bounds.patches`), the rounding bounds
(:mod:`acert.bounds.rounding`) and the clean pass (:mod:`acert.bounds.clean_pass`) all follow
these steps and dispatch on ``step.kind``; the list of supported layers and the refusal of any
other module come from the table too, and the walk refuses an in-place layer whose write the
forward pass would observe (:func:`acert.bounds.inplace.check_overwrites`).
:func:`register_kind` adds a user's kind. docs/ARCHITECTURE.md, "Layer kinds", shows what adding
a kind takes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from acert.bounds.activations import DROPOUT, FLATTEN, IDENTITY, LEAKY_RELU, RELU
from acert.bounds.affine import CONV2D, LINEAR
from acert.bounds.combine import ADD, CONCAT
from acert.bounds.inplace import Node, check_overwrites
from acert.bounds.kind_rules import LayerKind, WalkStep
from acert.bounds.normalisation import BATCHNORM1D, BATCHNORM2D, NORMALIZE
from acert.bounds.pooling import AVGPOOL2D, MAXPOOL2D
from acert.foundation.errors import AcertError, ConfigError, UnsupportedModelError
from acert.models import GraphNet, Residual
from acert.models.graph import INPUT

__all__ = [
    "LAYER_KINDS",
    "SUPPORTED_LAYERS",
    "check_certifiable",
    "check_shapes",
    "check_supported",
    "kind_for",
    "kind_of",
    "output_shapes",
    "register_kind",
    "walk",
]

LAYER_KINDS: list[LayerKind] = [
    NORMALIZE,
    CONV2D,
    LINEAR,
    BATCHNORM1D,
    BATCHNORM2D,
    RELU,
    LEAKY_RELU,
    FLATTEN,
    AVGPOOL2D,
    MAXPOOL2D,
    IDENTITY,
    DROPOUT,
    ADD,
    CONCAT,
]
"""Every layer kind the bounds support; a new kind is one entry here (or, for a user's own
layer, :func:`register_kind`)."""

SUPPORTED_LAYERS: list[type[nn.Module]] = [*(kind.type for kind in LAYER_KINDS), Residual]
"""The supported modules: the kinds', and the residual block, which the walk expands."""

_KINDS: dict[type[nn.Module], LayerKind] = {kind.type: kind for kind in LAYER_KINDS}


def register_kind(kind: LayerKind) -> LayerKind:
    """Add a user's layer type to the table: from then on every bound method, the clean pass,
    the checks and the supported list know it (docs/ARCHITECTURE.md, "Layer kinds", has an
    example). Its rules must be sound under rounding like the table's own; its ``example``
    lets the tests of tests/bounds/test_kinds.py check it.

    Raises:
        ConfigError: not a :class:`LayerKind`, or a type that already has a kind.
    """
    if not isinstance(kind, LayerKind):
        raise ConfigError(
            f"register_kind takes an acert.bounds.kind_rules.LayerKind, got {type(kind).__name__}"
        )
    if kind.type in _KINDS or kind.type in (Residual, GraphNet):
        raise ConfigError(
            f"{kind.name} already has a kind in the table; register a subclass of it instead "
            "(kinds match a module's exact type)"
        )
    LAYER_KINDS.append(kind)
    SUPPORTED_LAYERS.insert(len(SUPPORTED_LAYERS) - 1, kind.type)
    _KINDS[kind.type] = kind
    return kind


_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def kind_for(layer_type: type[nn.Module]) -> LayerKind | None:
    """The table's entry for a module type, or None (a residual block has none: the walk
    expands it)."""
    return _KINDS.get(layer_type)


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


def walk(model: nn.Module | Iterable[nn.Module]) -> tuple[WalkStep, ...]:
    """The steps of a model (:class:`acert.bounds.kind_rules.WalkStep`): its graph's nodes in
    topological order, each with the indices of the steps it reads.

    ``model`` is a chain of layers (an ``nn.Sequential`` or any iterable of modules: each
    step reads the one before) or a :class:`acert.models.GraphNet`. A residual block
    (:class:`acert.models.Residual`) becomes its body's steps and an ``Add`` step of the
    block's input and the body's output; a batch-norm whose input is a kind that folds one
    (Linear, Conv2d), and that kind's output's only reader, becomes that step's ``norm``.
    Raises a one-line :class:`UnsupportedModelError` for a module without a kind, one its
    kind's check refuses, and an in-place layer whose write the forward pass can observe
    (:func:`acert.bounds.inplace.check_overwrites`).
    """
    nodes: list[Node] = []
    if isinstance(model, GraphNet):
        _graph(model, "", INPUT, nodes)
    else:
        _chain(list(model), "", INPUT, nodes)
    check_overwrites(nodes)
    return _steps(nodes)


def _chain(layers: list[nn.Module], prefix: str, source: int, nodes: list[Node]) -> int:
    """Append the nodes of a chain of ``layers`` reading ``source``; returns the last one."""
    for position, layer in enumerate(layers):
        source = _expand(layer, f"{prefix}{position}", (source,), nodes)
    return source


def _graph(graph: GraphNet, prefix: str, source: int, nodes: list[Node]) -> int:
    """Append the nodes of ``graph`` whose input is ``source``; returns its output node."""
    outputs: list[int] = []
    for name, module, inputs in zip(graph.names, graph.nodes, graph.inputs, strict=True):
        reads = tuple(source if j == INPUT else outputs[j] for j in inputs)
        outputs.append(_expand(module, f"{prefix}{name}", reads, nodes))
    return outputs[-1]


def _expand(module: nn.Module, where: str, inputs: tuple[int, ...], nodes: list[Node]) -> int:
    """Append the node(s) of ``module`` reading ``inputs``; returns the one giving its output.
    A :class:`acert.models.GraphNet` inside the model is a sub-graph of its own nodes."""
    if type(module) in (GraphNet, Residual) and len(inputs) != 1:
        raise UnsupportedModelError(
            f"layer {where} ({type(module).__name__}) takes 1 input, got {len(inputs)}"
        )
    if type(module) is GraphNet:
        return _graph(module, f"{where}.", inputs[0], nodes)
    if type(module) is Residual:
        body = module.body
        if type(body) is not nn.Sequential or len(body) == 0:
            raise UnsupportedModelError(
                f"layer {where} (Residual) has a body of type {type(body).__name__} with "
                f"{len(list(body.children()))} modules; the bounds follow a non-empty "
                "nn.Sequential of supported layers"
            )
        (source,) = inputs
        out = _chain(list(body), f"{where}.body.", source, nodes)
        reader = f"the input of residual block {where}, which its sum x + body(x) reads again"
        nodes.append(Node(where, module, ADD, (source, out), reader))
        return len(nodes) - 1
    kind = kind_of(module, where)
    if kind.check is not None and (problem := kind.check(module)) is not None:
        raise UnsupportedModelError(f"layer {where} ({kind.name}) {problem}")
    if kind.arity is not None and len(inputs) != kind.arity:
        raise UnsupportedModelError(
            f"layer {where} ({kind.name}) takes {kind.arity} input(s), got {len(inputs)}"
        )
    nodes.append(Node(where, module, kind, inputs))
    return len(nodes) - 1


def _steps(nodes: list[Node]) -> tuple[WalkStep, ...]:
    """The walk's steps: one per node, a batch-norm folded into the Linear/Conv2d it reads
    when it is that node's only reader."""
    readers: dict[int, list[int]] = {}
    for index, node in enumerate(nodes):
        for i in node.inputs:
            readers.setdefault(i, []).append(index)
    folded: dict[int, int] = {}  # the folded batch-norm's node -> its layer's node
    for index, node in enumerate(nodes):
        (source, *_) = node.inputs
        if (
            type(node.layer) in _BATCHNORMS
            and source != INPUT
            and nodes[source].kind.folds_batchnorm
            and source not in folded.values()
            and readers.get(source) == [index]
        ):
            folded[index] = source
    norms = {layer: index for index, layer in folded.items()}
    step_of: dict[int, int] = {INPUT: INPUT}
    steps: list[WalkStep] = []
    for index, node in enumerate(nodes):
        if index in folded:
            step_of[index] = step_of[folded[index]]
            continue
        norm = nodes[norms[index]] if index in norms else None
        inputs = tuple(step_of[i] for i in node.inputs)
        step_of[index] = len(steps)
        steps.append(
            WalkStep(
                len(steps),
                node.layer,
                node.kind,
                None if norm is None else norm.layer,
                node.where,
                inputs,
                "" if norm is None else norm.where,
            )
        )
    return tuple(steps)


def _modules(step: WalkStep) -> Iterator[tuple[nn.Module, str]]:
    """The step's modules with a kind in the table (its layer, or for a residual block's
    Add step none), and its folded batch-norm, each with its name in the model."""
    if type(step.layer) is not Residual:
        yield step.layer, step.where
    if step.norm is not None:
        yield step.norm, step.norm_where


def check_supported(model: nn.Module) -> nn.Module:
    """Return ``model`` if the bounds have a rule for each of its layers, else raise a one-line
    :class:`UnsupportedModelError`.

    The model must be a plain ``nn.Sequential`` that computes the chain of its layers, or a
    :class:`acert.models.GraphNet` (no ``forward`` of its own or hooks, on it or any module in
    it), every layer with a kind in the table that accepts it, and the last layer
    ``nn.Linear`` (the margin specification is folded into it).
    """
    if not isinstance(model, nn.Sequential | GraphNet) or len(_top(model)) == 0:
        raise UnsupportedModelError(
            f"bounds need a non-empty torch.nn.Sequential, got {type(model).__name__}; "
            "build the model from acert.models or as nn.Sequential(Normalize(...), ...)"
        )
    _check_computes_its_layers(model)
    walk(model)
    last = _top(model)[-1]
    if not isinstance(last, nn.Linear):
        raise UnsupportedModelError(
            f"the last layer must be nn.Linear (the margin specification is folded into it), "
            f"got {type(last).__name__}"
        )
    return model


def _top(model: nn.Sequential | GraphNet) -> nn.Sequential | nn.ModuleList:
    return model.nodes if isinstance(model, GraphNet) else model


def _check_computes_its_layers(model: nn.Sequential | GraphNet) -> None:
    """Refuse a model whose forward pass is not the graph of its layers: the bounds follow the
    layers, so a ``forward`` of its own (a subclass's, or one set on the instance) or a hook
    that changes inputs or outputs would make them bound another function than the model's."""
    name = type(model).__name__
    own = GraphNet.forward if isinstance(model, GraphNet) else nn.Sequential.forward
    if type(model).forward is not own or "forward" in vars(model):
        raise UnsupportedModelError(
            f"{name} defines its own forward, which the bounds cannot follow; certify an "
            "nn.Sequential of its layers (nn.Sequential(*model)) that computes the same function"
        )
    check_hooks(model)


def check_hooks(model: nn.Module) -> None:
    """Refuse forward hooks and replaced forwards anywhere in ``model`` (a TorchScript module
    is one, named as such): the bounds (and a traced graph, which calls no hooks) follow the
    layers, not what a hook makes of them."""
    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedModelError(
            f"the model is a TorchScript module ({type(model).__name__}), whose compiled code "
            "the bounds cannot follow; pass the nn.Module it was scripted or traced from"
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


def check_certifiable(model: nn.Module) -> None:
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


def output_shapes(steps: tuple[WalkStep, ...], shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The output shape of every step (no batch) for a model input of ``shape``; a one-line
    :class:`AcertError` unless each layer gets a tensor of the rank its kind takes (Linear a
    (B, D) one, Conv2d, BatchNorm2d and the poolings a (B, C, H, W) one) and the shapes its
    kind accepts (an addition's inputs of one shape: a residual block's body keeps the shape
    of its input)."""
    shapes: list[tuple[int, ...]] = []
    for step in steps:
        ins = tuple(shape if i == INPUT else shapes[i] for i in step.inputs)
        modules = list(_modules(step))
        if type(step.layer) is Residual and ins[0] != ins[1]:
            raise AcertError(
                f"layer {step.where} (Residual) adds its body's output of shape {ins[1]} to its "
                f"input of shape {ins[0]}; the body must keep the shape of its input"
            )
        if modules and modules[0][0] is step.layer:
            _check_rank(*modules[0], ins[0])
        try:
            out = tuple(step.kind.shape(step.layer, *ins))
        except AcertError as err:
            raise AcertError(f"layer {step.where} ({step.kind.name}) {err}") from None
        if step.norm is not None:
            _check_rank(step.norm, step.norm_where, out)
        shapes.append(out)
    return shapes


def check_shapes(model: nn.Module, shape: tuple[int, ...]) -> None:
    """:func:`output_shapes` of the model's walk: a one-line :class:`AcertError` for inputs of
    ``shape`` (no batch) that some layer cannot take."""
    output_shapes(walk(model), shape)


def _check_rank(module: nn.Module, where: str, shape: tuple[int, ...]) -> None:
    rank = kind_of(module, where).input_rank
    if rank is not None and len(shape) + 1 != rank:
        hint = _RANK_HINTS.get(rank, f"not a {rank}-D one").format(where=where)
        raise AcertError(
            f"layer {where} ({type(module).__name__}) gets a {len(shape) + 1}-D tensor, {hint}"
        )
