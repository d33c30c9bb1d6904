"""The ONNX side of ``acert export``: the folded network as a checked ONNX file, and its check
against the torch model on the exported property boxes (see :mod:`acert.workflows.export.run`)."""

from __future__ import annotations

import io
import warnings
from types import ModuleType

import numpy as np
import torch
from torch import Tensor, nn

from acert.bounds import bounds_form
from acert.foundation.errors import AcertError
from acert.workflows.export.fold import fold_normalize

__all__ = ["ONNX_OPSET", "check_points", "first_line", "onnx_bytes", "verify_onnx"]

ONNX_OPSET = 13
INPUT_NAME = "input"
OUTPUT_NAME = "output"


def onnx_bytes(model: nn.Module, example: Tensor, onnx: ModuleType, dataset: str) -> bytes:
    """``model`` with its Normalize folded into the first layer, as a checked ONNX file in memory:
    a chain's layers in order, a traced model's graph (:func:`acert.bounds.bounds_form`) with
    its joins as ONNX ``Add`` and ``Concat`` nodes.

    The input is ``example``'s shape (1, C, H, W).
    """
    folded = fold_normalize(bounds_form(model, tuple(example.shape[1:])))
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            # the TorchScript exporter announces its deprecation on every call
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                folded,
                (example,),
                buffer,
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=ONNX_OPSET,
                do_constant_folding=True,
            )
    except Exception as err:  # the exporter raises many types
        raise AcertError(
            f"torch could not export the model to ONNX ({first_line(err)}); "
            "report this with the model name"
        ) from err
    proto = onnx.load_model_from_string(buffer.getvalue())
    _inline_identity_initializers(proto)
    _add_metadata(proto, dataset, tuple(example.shape))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as err:
        raise AcertError(
            f"the exported ONNX model fails onnx.checker ({first_line(err)}); "
            "report this with the model name"
        ) from err
    return proto.SerializeToString()


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type if it has none), cut to 120 chars."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:120]


def _inline_identity_initializers(proto: object) -> None:
    """Replace ``Identity`` nodes that alias an initializer by a copy of it.

    The TorchScript exporter stores equal parameters (e.g. fresh batch-norm weights) once and
    aliases the others with Identity nodes; some verifiers' ONNX readers have no Identity rule.
    """
    graph = proto.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    aliases = [
        node for node in graph.node if node.op_type == "Identity" and node.input[0] in initializers
    ]
    for node in aliases:
        copy = graph.initializer.add()
        copy.CopyFrom(initializers[node.input[0]])
        copy.name = node.output[0]
        graph.node.remove(node)


def _add_metadata(proto: object, dataset: str, shape: tuple[int, ...]) -> None:
    """Say in the file what the input is."""
    proto.producer_name = "acert"
    entries = {
        "acert.dataset": dataset,
        "acert.input": f"pixels in [0, 1], shape {shape}; the normalisation is folded into the "
        "first layer",
    }
    for key, value in entries.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def check_points(x: Tensor, eps: float, seed: int = 0) -> Tensor:
    """Centres and corners of the ε-boxes around ``x`` (m, C, H, W): 4 points per input.

    Each input's centre, its box's lower and upper corners and one random corner (each pixel at
    its lower or upper bound), the box clipped to [0, 1] as in the property files.
    """
    lower, upper = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    generator = torch.Generator().manual_seed(seed)
    pick = torch.rand(x.shape, generator=generator) < 0.5
    return torch.cat([x, lower, upper, torch.where(pick, upper, lower)])


def verify_onnx(
    onnx_bytes: bytes, model: nn.Module, points: Tensor, ort: ModuleType, tolerance: float
) -> float:
    """Largest |onnxruntime - torch| on ``points``; error unless it is below ``tolerance`` times
    the largest torch logit magnitude (at least 1)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(points).numpy()
    got = np.concatenate(
        [session.run([OUTPUT_NAME], {INPUT_NAME: p[None].numpy()})[0] for p in points]
    )
    diff = float(np.abs(got - expected).max())
    scale = max(1.0, float(np.abs(expected).max()))
    if not diff < tolerance * scale:
        raise AcertError(
            f"the ONNX model differs from the torch model by {diff:.3g} (limit {tolerance:g} "
            f"x {scale:.3g}) on the exported boxes' centres and corners; nothing was written, "
            "report this with the model name"
        )
    return diff
