"""A network as a graph: nodes in topological order, each one module applied to the outputs of
earlier nodes or to the network's input. The form every model takes under the bounds: an
``nn.Sequential`` is a chain, a traced ``nn.Module`` (:mod:`acert.bounds.tracing`) any graph
of supported layers, its functional forms (``F.relu``, ``+``, ``torch.cat``, ``x.view(n, -1)``)
turned into modules (``nn.ReLU``, :class:`~acert.models.layers.Add`,
:class:`~acert.models.layers.Concat`, ``nn.Flatten``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from acert.foundation.errors import ConfigError

__all__ = ["INPUT", "GraphNet"]

INPUT = -1
"""The input index that stands for the network's input."""


class GraphNet(nn.Module):
    """Nodes in topological order; node i applies ``modules[i]`` to the outputs of
    ``inputs[i]`` (earlier nodes' indices, :data:`INPUT` for the network's input); the output
    is the last node's. The modules are shared, not copied: a graph of a user's model trains
    that model's parameters.

    Args:
        nodes: ``(name, module, inputs)`` per node; ``name`` says where the node comes from
            in the original model (``"layer1.0.conv1"``, ``"add_1"``).
    """

    def __init__(self, nodes: Sequence[tuple[str, nn.Module, Sequence[int]]]) -> None:
        super().__init__()
        if not nodes:
            raise ConfigError("a GraphNet needs at least one node")
        for index, node in enumerate(nodes):
            if not (isinstance(node, Sequence) and len(node) == 3):
                raise ConfigError(
                    f"node {index} is {_short(node)}; each node is (name, module, inputs)"
                )
            name, module, inputs = node
            if not isinstance(module, nn.Module):
                raise ConfigError(
                    f"node {index} ({name}) is a {type(module).__name__}, not an nn.Module; "
                    "wrap a function in a module (nn.ReLU() for torch.relu)"
                )
            if (
                not isinstance(inputs, Sequence)
                or not inputs
                or any(type(i) is not int or not INPUT <= i < index for i in inputs)
            ):
                raise ConfigError(
                    f"node {index} ({name}) takes inputs {_short(inputs)}; give a tuple of "
                    f"ints, each an earlier node's index or {INPUT} (the network's input)"
                )
        self.names: tuple[str, ...] = tuple(name for name, _, _ in nodes)
        self.nodes = nn.ModuleList(module for _, module, _ in nodes)
        self.inputs: tuple[tuple[int, ...], ...] = tuple(tuple(i) for _, _, i in nodes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values: list[torch.Tensor] = []
        for module, inputs in zip(self.nodes, self.inputs, strict=True):
            values.append(module(*(x if i == INPUT else values[i] for i in inputs)))
        return values[-1]

    def extra_repr(self) -> str:
        return "\n".join(
            f"({i}) {name} <- {list(inputs)}"
            for i, (name, inputs) in enumerate(zip(self.names, self.inputs, strict=True))
        )


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
