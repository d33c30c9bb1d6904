"""Models: acert's layers (:mod:`~acert.models.layers`), networks as graphs of them
(:mod:`~acert.models.graph`) and the registered architectures (:mod:`~acert.models.zoo`).

Every registered model but ``resnet-cifar`` (:mod:`~acert.models.resnets`, an ``nn.Module``
with its own forward) is a plain ``torch.nn.Sequential``; each one's first module is
:class:`Normalize`, so the dataset normalisation is part of the network and inputs stay in
pixel space [0, 1] (docs/METHOD.md, "Threat model"). ``create_model(name, in_shape,
num_classes, mean, std)`` builds a registered architecture; ``list_models()`` names them.
"""

from acert.models.graph import INPUT, GraphNet
from acert.models.layers import Add, Concat, Normalize, Residual
from acert.models.resnets import BasicBlock, ResNetCIFAR
from acert.models.zoo import (
    INITS,
    MODELS,
    ModelSpec,
    cnn7,
    create_model,
    ibp_init_,
    list_models,
    mlp,
    resnet,
)

__all__ = [
    "INITS",
    "INPUT",
    "MODELS",
    "Add",
    "BasicBlock",
    "Concat",
    "GraphNet",
    "ModelSpec",
    "Normalize",
    "ResNetCIFAR",
    "Residual",
    "cnn7",
    "create_model",
    "ibp_init_",
    "list_models",
    "mlp",
    "resnet",
]
