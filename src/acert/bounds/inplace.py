"""The refusal of in-place layers whose write the forward pass would observe, on the nodes of
a model's graph before the walk (:func:`acert.bounds.kinds.walk`) makes them steps.

Tracing a model's layers does not see in-place mutation: ``nn.ReLU(inplace=True)`` before a
skip that reads the same tensor makes the model compute another function than its graph's
(docs/ARCHITECTURE.md, "Soundness"). Each node's output is a tensor of its own or, for a layer
that may pass its input on as it is or as a view (``LayerKind.aliases``) and for an in-place
layer, its input's tensor; an in-place write is refused where that tensor is read again.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from acert.bounds.kind_rules import LayerKind
from acert.foundation.errors import UnsupportedModelError
from acert.models.graph import INPUT

__all__ = ["Node", "check_overwrites"]


@dataclass
class Node:
    """A module of the model with the nodes it reads, before batch-norms are folded."""

    where: str
    layer: nn.Module
    kind: LayerKind
    inputs: tuple[int, ...]
    reader: str = ""
    """How it reads its first input again, for a residual block's sum (the in-place check)."""


_OTHER_FUNCTION = ", so the model computes another function than the graph of its layers"
_NO_GRADIENT = ", so its gradient (training, attacks) cannot be computed"
_MODEL_INPUT = "the model's input (which the caller, the bounds and the attacks read again)"


def _writes_in_place(layer: nn.Module) -> bool:
    return bool(getattr(layer, "inplace", False))


def check_overwrites(nodes: list[Node]) -> None:
    """Refuse an in-place layer (``inplace=True``) whose input is read again after it wrote it:
    the model's input, a tensor another node reads later (a residual block's input: ``x +
    body(x)`` would add the overwritten x: the model computes ``relu(x) + body(relu(x))``, the
    bounds ``x + body(relu(x))``), a tensor another node read before it (a Linear or Conv2d
    keeps its input for the gradient: training and attacks would fail in backward), or an
    activation's output, which autograd keeps; directly or
    through layers that pass their input on as it is or as a view (Identity, Dropout, Flatten).
    Elsewhere (a ReLU right after a Conv2d, a batch-norm or a sum) the write is exact: no one
    reads the old values."""
    storage: dict[int, int] = {INPUT: INPUT}  # node -> the node whose tensor its output is
    for index, node in enumerate(nodes):
        source = node.inputs[0]
        passes_on = len(node.inputs) == 1 and (node.kind.aliases or _writes_in_place(node.layer))
        storage[index] = storage[source] if passes_on else index
        if not _writes_in_place(node.layer):
            continue
        tensor = storage[source]
        later = [
            (reader, i)
            for reader in range(index + 1, len(nodes))
            for i in nodes[reader].inputs
            if i < index and storage[i] == tensor
        ]
        kept = [i for i in range(source + 1) if storage[i] == tensor and nodes[i].kind.activation]
        earlier = [
            (reader, i)
            for reader in range(index)
            for i in nodes[reader].inputs
            if storage[i] == tensor and not _views(nodes[reader])
        ]
        consequence = _OTHER_FUNCTION
        if later:
            reader, i = later[0]
            what = nodes[reader].reader or (
                f"the output of {_name(nodes, i)}, which layer {nodes[reader].where} "
                f"({type(nodes[reader].layer).__name__}) reads again"
            )
        elif kept:
            what = (
                f"the output of layer {nodes[kept[-1]].where} ({nodes[kept[-1]].kind.name}), "
                "which autograd keeps for its gradient"
            )
            consequence = _NO_GRADIENT
        elif tensor == INPUT:
            what = _MODEL_INPUT
        elif earlier:
            reader, i = earlier[0]
            what = (
                f"the output of {_name(nodes, i)}, which layer {nodes[reader].where} "
                f"({type(nodes[reader].layer).__name__}) read before it and autograd may keep"
            )
            consequence = _NO_GRADIENT
        else:
            continue
        _refuse_overwrite(node, what, consequence)


def _views(node: Node) -> bool:
    """A node whose output is its input or a view of it, writing nothing (its readers are
    the tensor's readers)."""
    return len(node.inputs) == 1 and node.kind.aliases and not _writes_in_place(node.layer)


def _name(nodes: list[Node], index: int) -> str:
    if index == INPUT:
        return "the model's input"
    return f"layer {nodes[index].where} ({type(nodes[index].layer).__name__})"


def _refuse_overwrite(node: Node, readers: str, consequence: str) -> None:
    layer, kind = node.layer, node.kind
    arguments = ""
    if isinstance(layer, nn.Dropout):
        arguments = f"{layer.p}, "
    elif isinstance(layer, nn.LeakyReLU):
        arguments = f"{layer.negative_slope}, "
    raise UnsupportedModelError(
        f"layer {node.where} ({kind.name}(inplace=True)) overwrites {readers}{consequence}; "
        f"use nn.{kind.name}({arguments.rstrip(', ')}) instead of "
        f"nn.{kind.name}({arguments}inplace=True)"
    )
