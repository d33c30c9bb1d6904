"""Hand-off to complete verifiers: a trained run as a VNN-COMP benchmark (the work behind
``acert export``).

:func:`export_run` writes three kinds of files:

- ``onnx_path``: the eval-mode network *including* its :class:`~acert.models.Normalize` layer, so
  the ONNX input is in pixel space [0, 1]. One input named ``input`` of shape (1, C, H, W)
  (VNN-COMP benchmarks use batch 1), float32, one output ``output`` of shape (1, K), opset 13.
  Written with torch's TorchScript exporter (``dynamo=False``): the newer torch.export-based
  exporter needs the ``onnxscript`` package, which ``acert[export]`` does not install, while the
  TorchScript one needs nothing beyond torch and gives a plain Sub/Div/Conv/Gemm/
  BatchNormalization/Relu/Flatten graph (Conv + BatchNorm folded) that verifiers' ONNX readers
  accept. Before it is written, the file is checked with ``onnx.checker`` and run with
  onnxruntime on a few exported inputs and the corners of their boxes; a maximum absolute
  difference to the torch model of 1e-4 or more is an error.
- ``vnnlib_dir/prop_<i>.vnnlib``, one per selected input, ``i`` its row in the split: VNNLIB
  (SMT-LIB) with ``X_k`` for every pixel in the C-order of the (1, C, H, W) input and ``Y_j`` for
  every logit; the box ``max(x - eps, 0) <= X_k <= min(x + eps, 1)`` (METHOD.md, "Threat model");
  and, as VNN-COMP states properties, the *unsafe* region: some class ``t != y`` scores at least
  as high as the true class ``y``. A verifier answers "unsat" when the input is robust.
  Numbers are written positionally (no exponent) with the shortest digits that round-trip to
  the float64 value, so the boxes are exact; all of them lie in [0, 1], so none is negative.
- ``instances.csv`` in the parent folder of ``vnnlib_dir`` (the VNN-COMP benchmark root): rows
  ``onnx_path,vnnlib_path,timeout`` without a header, paths relative to that folder.

The inputs are a stratified, seeded subset of the split: the rows
:func:`acert.data.stratified_subset` picks for the same ``n`` and ``seed`` (also for ``n`` below
the number of classes, which that function refuses); with ``only_correct`` the subset is drawn
from the correctly classified rows only.

Every argument is checked and the ONNX file is built and verified in memory before anything is
written; each file is then written atomically, and if one write fails the files this call
already wrote are removed again. Property files of an earlier export into the same folder that
this export does not select are left alone; ``instances.csv`` lists only the new ones.
"""

from __future__ import annotations

import io
import math
import numbers
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import Tensor, nn

from acert.certify import load_run_inputs, run_config
from acert.data import ImageSet, dataset_info, stratified_indices
from acert.errors import AcertError
from acert.runs import atomic_write, load

__all__ = [
    "DEFAULT_TIMEOUT",
    "INSTANCES_NAME",
    "ONNX_OPSET",
    "ONNX_TOLERANCE",
    "ExportResult",
    "box_bounds",
    "export_run",
    "vnnlib_property",
]

DEFAULT_TIMEOUT = 120.0
"""Seconds per instance written to instances.csv unless ``timeout`` is given."""
ONNX_OPSET = 13
ONNX_TOLERANCE = 1e-4
"""Largest allowed absolute difference between onnxruntime and torch logits."""
INSTANCES_NAME = "instances.csv"
INPUT_NAME = "input"
OUTPUT_NAME = "output"
CHECKED_INPUTS = 4
"""Exported inputs whose point and box corners are run through onnxruntime (12 runs)."""
PREDICT_BATCH = 256
_INSTALL_HINT = "pip install 'acert[export]'"


@dataclass
class ExportResult:
    """What :func:`export_run` wrote and for which inputs.

    Attributes:
        onnx_path: the ONNX network.
        vnnlib_paths: one property file per input, in the order of ``indices``.
        instances_path: the VNN-COMP instances CSV.
        indices: row of each input in the split (ascending).
        labels: true class of each input.
        predictions: class the model predicts for each input.
        max_abs_diff: largest |onnxruntime - torch| over the checked inputs.
    """

    onnx_path: Path
    vnnlib_paths: list[Path]
    instances_path: Path
    indices: list[int]
    labels: list[int]
    predictions: list[int]
    max_abs_diff: float

    def summary(self) -> str:
        """One line for the command line."""
        correct = sum(p == y for p, y in zip(self.predictions, self.labels, strict=True))
        return (
            f"wrote {self.onnx_path}, {len(self.vnnlib_paths)} properties "
            f"({correct} correctly classified) and {self.instances_path}; "
            f"onnxruntime matches torch to {self.max_abs_diff:.1e}"
        )


@dataclass
class _Selection:
    """The chosen inputs: their rows of ``data``, true labels and predicted classes."""

    data: ImageSet
    indices: Tensor
    labels: Tensor
    predictions: Tensor

    def pixels(self, rows: slice) -> Tensor:
        """Float32 pixels (m, C, H, W) in [0, 1] of the chosen inputs ``rows``."""
        return self.data.floats(self.indices[rows])


def export_run(
    run: str | Path,
    onnx_path: str | Path,
    vnnlib_dir: str | Path,
    eps: float,
    n: int,
    *,
    dataset: str | None = None,
    split: str = "test",
    data_dir: str | None = None,
    seed: int = 0,
    timeout: float = DEFAULT_TIMEOUT,
    only_correct: bool = False,
) -> ExportResult:
    """Export a trained run as ONNX + VNNLIB properties + instances.csv; see the module docstring.

    Args:
        run: run folder or checkpoint (its best model, else its last).
        onnx_path: ONNX file to write.
        vnnlib_dir: folder for ``prop_<i>.vnnlib``; ``instances.csv`` goes to its parent.
        eps: ℓ∞ radius in pixel units, 0 < eps < 1.
        n: number of properties, 1 <= n <= size of the split.
        dataset: dataset to draw the inputs from (default: the run's); same shape and classes.
        split: ``"test"`` or ``"train"``.
        data_dir: folder holding the dataset files (default: the run's).
        seed: seed of the stratified draw.
        timeout: seconds per instance written to instances.csv.
        only_correct: draw only from inputs the model classifies correctly.

    Returns:
        The written paths, the chosen inputs and the ONNX check's largest difference.
    """
    _check_arguments(eps, n, timeout)
    eps, n = float(eps), int(n)
    onnx, ort = _require_onnx()
    onnx_path, vnnlib_dir = Path(onnx_path), Path(vnnlib_dir)
    _check_targets(onnx_path, vnnlib_dir)
    config = run_config(run)
    model = load(run)
    name = dataset or config.dataset
    data = load_run_inputs(config, name, split, data_dir)
    if n > len(data):
        raise AcertError(
            f"--n {n} exceeds the {len(data)} inputs of the {name} {split} split; lower --n"
        )
    chosen = _select(model, data, n, seed, only_correct)
    onnx_bytes = _export_onnx(model, chosen.pixels(slice(0, 1)), onnx, name)
    checked = chosen.pixels(slice(0, CHECKED_INPUTS))
    max_diff = _verify_onnx(onnx_bytes, model, checked, eps, ort)
    vnnlib_paths = [vnnlib_dir / f"prop_{i}.vnnlib" for i in chosen.indices.tolist()]
    instances_path = vnnlib_dir.resolve().parent / INSTANCES_NAME
    source = f"acert export of {Path(run).resolve().name}: {name} {split} split"
    properties = [
        _property_bytes(chosen, row, dataset_info(name).num_classes, eps, source)
        for row in range(len(vnnlib_paths))
    ]
    rows = _instances_csv(instances_path.parent, onnx_path, vnnlib_paths, timeout)
    _write_all(
        [
            *zip(vnnlib_paths, properties, strict=True),
            (onnx_path, lambda: onnx_bytes),
            (instances_path, rows.encode),
        ]
    )
    return ExportResult(
        onnx_path,
        vnnlib_paths,
        instances_path,
        chosen.indices.tolist(),
        chosen.labels.tolist(),
        chosen.predictions.tolist(),
        max_diff,
    )


# ------------------------------------------------------------------------------- checks
def _check_arguments(eps: float, n: int, timeout: float) -> None:
    """One-line errors for values out of range (NaN included)."""
    if not 0 < eps < 1:
        raise AcertError(f"--eps must lie in (0, 1) pixel units, got {eps}")
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n <= 0:
        raise AcertError(f"--n must be a positive whole number of properties, got {n!r}")
    if not 0 < timeout < math.inf:
        raise AcertError(f"--timeout must be a positive number of seconds, got {timeout}")


def _require_onnx() -> tuple[ModuleType, ModuleType]:
    """The ``onnx`` and ``onnxruntime`` modules, or an error naming the extra to install."""
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise AcertError(
            f"exporting needs onnx and onnxruntime ({err.name or 'a module'} is missing); "
            f"run {_INSTALL_HINT}"
        ) from err
    return onnx, onnxruntime


def _check_targets(onnx_path: Path, vnnlib_dir: Path) -> None:
    """The output paths are usable: no folder in the file's place, no file in the folder's."""
    if onnx_path.is_dir():
        raise AcertError(f"--onnx {onnx_path} is a folder; pass a file name such as model.onnx")
    if vnnlib_dir.exists() and not vnnlib_dir.is_dir():
        raise AcertError(f"--vnnlib {vnnlib_dir} is a file; pass a folder for the properties")
    for path in (onnx_path, vnnlib_dir):
        if "," in str(path.resolve()):
            raise AcertError(f"{path} contains a comma, which instances.csv cannot hold; rename it")


# ----------------------------------------------------------------------------- selection
@torch.no_grad()
def _predict(model: nn.Module, data: ImageSet, rows: Tensor) -> Tensor:
    """Predicted classes of ``rows`` of ``data``, in batches."""
    parts = [
        model(data.floats(rows[start : start + PREDICT_BATCH])).argmax(1)
        for start in range(0, len(rows), PREDICT_BATCH)
    ]
    return torch.cat(parts)


def _select(model: nn.Module, data: ImageSet, n: int, seed: int, only_correct: bool) -> _Selection:
    """The stratified seeded subset of ``n`` rows (of the correctly classified ones if asked)."""
    pool = torch.arange(len(data))
    if only_correct:
        correct = _predict(model, data, pool) == data.labels
        pool = torch.nonzero(correct).flatten()
        if n > len(pool):
            raise AcertError(
                f"only {len(pool)} of {len(data)} inputs are classified correctly, fewer than "
                f"--n {n}; lower --n or export misclassified inputs too"
            )
    indices = pool[stratified_indices(data.labels[pool], n, seed)]
    predictions = _predict(model, data, indices)
    return _Selection(data, indices, data.labels[indices], predictions)


# ---------------------------------------------------------------------------------- ONNX
def _export_onnx(model: nn.Module, example: Tensor, onnx: ModuleType, dataset: str) -> bytes:
    """The model as a checked ONNX file in memory, input ``example``'s shape (1, C, H, W)."""
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            # the TorchScript exporter announces its deprecation on every call
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
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
            f"torch could not export the model to ONNX ({_first_line(err)}); "
            "report this with the model name"
        ) from err
    proto = onnx.load_model_from_string(buffer.getvalue())
    _inline_identity_initializers(proto)
    _add_metadata(proto, dataset, tuple(example.shape))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as err:
        raise AcertError(
            f"the exported ONNX model fails onnx.checker ({_first_line(err)}); "
            "report this with the model name"
        ) from err
    return proto.SerializeToString()


def _first_line(err: BaseException) -> str:
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
        "acert.input": f"pixels in [0, 1], shape {shape}; normalisation is inside the model",
    }
    for key, value in entries.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def _verify_onnx(
    onnx_bytes: bytes, model: nn.Module, x: Tensor, eps: float, ort: ModuleType
) -> float:
    """Largest |onnxruntime - torch| on ``x`` and its box corners; error if >= ONNX_TOLERANCE."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    points = torch.cat([x, (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)])
    with torch.no_grad():
        expected = model(points).numpy()
    got = np.concatenate(
        [session.run([OUTPUT_NAME], {INPUT_NAME: p[None].numpy()})[0] for p in points]
    )
    diff = float(np.abs(got - expected).max())
    if not diff < ONNX_TOLERANCE:
        raise AcertError(
            f"the ONNX model differs from the torch model by {diff:.3g} (limit {ONNX_TOLERANCE}) "
            "on the exported inputs; nothing was written, report this with the model name"
        )
    return diff


# -------------------------------------------------------------------------------- VNNLIB
def box_bounds(x: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bounds ``max(x - eps, 0)``, ``min(x + eps, 1)`` in float64."""
    x = np.asarray(x, dtype=np.float64)
    return np.maximum(x - eps, 0.0), np.minimum(x + eps, 1.0)


def _number(value: float) -> str:
    """Shortest positional decimal that reads back as exactly ``value`` (no exponent)."""
    return np.format_float_positional(value, unique=True, trim="0")


def vnnlib_property(
    x: Tensor, label: int, num_classes: int, eps: float, comments: list[str]
) -> str:
    """A VNN-COMP property: the ε-box around ``x`` and the unsafe region "some Y_t >= Y_label".

    Args:
        x: one input (C, H, W) in [0, 1]; pixel k of its C-order flattening is ``X_k``.
        label: the true class.
        num_classes: number of outputs ``Y_j``.
        eps: ℓ∞ radius in pixel units.
        comments: lines for the header (written after ``; ``).
    """
    lower, upper = box_bounds(x.double().flatten().numpy(), eps)
    lines = [f"; {comment}" for comment in comments]
    lines += [f"(declare-const X_{k} Real)" for k in range(len(lower))]
    lines += [f"(declare-const Y_{j} Real)" for j in range(num_classes)]
    lines.append("; input constraints")
    for k, (low, high) in enumerate(zip(lower.tolist(), upper.tolist(), strict=True)):
        lines.append(f"(assert (<= X_{k} {_number(high)}))")
        lines.append(f"(assert (>= X_{k} {_number(low)}))")
    lines.append(f"; output constraints: unsafe if some class scores at least Y_{label}")
    lines.append("(assert (or")
    lines += [f"    (and (>= Y_{t} Y_{label}))" for t in range(num_classes) if t != label]
    lines.append("))")
    return "\n".join(lines) + "\n"


def _property_bytes(
    chosen: _Selection, row: int, num_classes: int, eps: float, source: str
) -> Callable[[], bytes]:
    """The file content of the ``row``-th chosen input, built when it is written."""

    def build() -> bytes:
        x = chosen.pixels(slice(row, row + 1))[0]
        index, label = int(chosen.indices[row]), int(chosen.labels[row])
        shape = "x".join(str(size) for size in (1, *x.shape))
        comments = [
            f"{source}, input {index}, label {label}, the model predicts "
            f"{int(chosen.predictions[row])}",
            f"box: l-inf ball of radius {eps!r} around the pixels, clipped to [0, 1]; "
            "normalisation is inside the ONNX model",
            f"X_0..X_{x.numel() - 1}: the {shape} ONNX input flattened in C order; "
            f"Y_0..Y_{num_classes - 1}: its logits",
        ]
        return vnnlib_property(x, label, num_classes, eps, comments).encode()

    return build


# ----------------------------------------------------------------------- instances, writes
def _relative(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` with forward slashes (absolute if on another drive)."""
    try:
        return Path(os.path.relpath(path.resolve(), base)).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def _instances_csv(base: Path, onnx_path: Path, vnnlib_paths: list[Path], timeout: float) -> str:
    """VNN-COMP instances rows ``onnx,vnnlib,timeout``, paths relative to ``base``."""
    model = _relative(onnx_path, base)
    return "".join(f"{model},{_relative(p, base)},{timeout:g}\n" for p in vnnlib_paths)


def _write_all(files: list[tuple[Path, Callable[[], bytes]]]) -> None:
    """Write each file atomically; on a failure remove those already written and raise."""
    written: list[Path] = []
    try:
        for path, content in files:
            data = content()
            atomic_write(path, lambda stream, data=data: stream.write(data))
            written.append(path)
    except BaseException as err:
        for path in written:
            path.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise AcertError(
                f"could not write {err.filename or 'an export file'} ({err.strerror or err}); "
                "check that the folder is writable and has space"
            ) from err
        raise
