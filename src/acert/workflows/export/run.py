"""Hand-off to complete verifiers: a trained run as a VNN-COMP benchmark (the work behind
``acert export``).

:func:`export_run` writes four kinds of files:

- ``onnx_path``: the eval-mode network with its :class:`~acert.models.Normalize` layer folded
  into the first Conv or Linear layer (:mod:`acert.workflows.export.fold`), so the ONNX input is in
  pixel space [0, 1] and the graph starts with a Conv or Gemm (after a Flatten for an MLP): a
  leading Sub/Div pair crashes some verifiers (docs/VERIFIERS.md). One input named ``input`` of
  shape (1, C, H, W) (VNN-COMP benchmarks use batch 1), float32, one output ``output`` of shape (1,
  K), opset 13. Written with torch's TorchScript exporter (``dynamo=False``): the newer
  torch.export-based exporter needs the ``onnxscript`` package, which ``acert[export]`` does not
  install, while the TorchScript one needs nothing beyond torch and gives a plain Conv/Gemm/
  BatchNormalization/Relu/Flatten graph (Conv + BatchNorm merged) that verifiers' ONNX readers
  accept; before a conv that zero-pads a normalised input with a nonzero mean, the normalisation
  is a leading 1x1 Conv instead of folded (αβ-CROWN's patches mode loads it). Before anything
  is written, the file is checked with ``onnx.checker`` and run with onnxruntime on the centres,
  the lower and upper corners and a random corner of the first :data:`CHECKED_INPUTS` property
  boxes; it is an error if it differs from the torch model by
  :data:`ONNX_TOLERANCE` times the largest logit magnitude (at least 1) or more.
- ``vnnlib_dir/prop_<i>.vnnlib``, one per selected input, ``i`` its row in the split: VNNLIB
  (SMT-LIB) with ``X_k`` for every pixel in the C-order of the (1, C, H, W) input and ``Y_j`` for
  every logit; the box ``max(x - eps, 0) <= X_k <= min(x + eps, 1)``
  (docs/METHOD.md, "Threat model"); and, as VNN-COMP states properties, the *unsafe* region: some
  class ``t != y`` scores at least as high as the true class ``y``. A verifier answers "unsat" when
  the input is robust. Numbers are written positionally (no exponent) with the shortest digits that
  round-trip to the float64 value, so the boxes are exact; all of them lie in [0, 1], so none is
  negative.
- ``instances.csv`` in the parent folder of ``vnnlib_dir`` (the VNN-COMP benchmark root): rows
  ``onnx_path,vnnlib_path,timeout`` without a header, paths relative to that folder.
- ``abcrown.yaml`` beside ``instances.csv``: an αβ-CROWN configuration that runs the benchmark
  as written (:mod:`acert.workflows.export.abcrown`, docs/VERIFIERS.md).

The inputs (:class:`PropertySettings`) are a stratified, seeded subset of the split: the rows
:func:`acert.data.stratified_subset` picks for the same ``n`` and ``seed`` (also for ``n`` below
the number of classes, which that function refuses); with ``only_correct`` the subset is drawn
from the correctly classified rows only.

Every argument is checked and the ONNX file is built and verified in memory before anything is
written; each file is then written atomically, and if one write fails the files this call
already wrote are removed again. Property files of an earlier export into the same folder that
this export does not select are left alone; ``instances.csv`` lists only the new ones.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import Tensor, nn

from acert.data import ImageSet, dataset_info, stratified_indices
from acert.foundation.errors import AcertError
from acert.records.runs import atomic_write, load
from acert.workflows.certify.runs import DataSelection, load_run_inputs, run_config
from acert.workflows.export.abcrown import ABCROWN_NAME, abcrown_config
from acert.workflows.export.onnx_graph import ONNX_OPSET, check_points, onnx_bytes, verify_onnx
from acert.workflows.export.settings import DEFAULT_TIMEOUT, PropertySettings, check_export_settings

__all__ = [
    "ABCROWN_NAME",
    "DEFAULT_TIMEOUT",
    "INSTANCES_NAME",
    "ONNX_OPSET",
    "ONNX_TOLERANCE",
    "ExportResult",
    "PropertySettings",
    "box_bounds",
    "export_run",
    "vnnlib_property",
]

ONNX_TOLERANCE = 1e-5
"""Largest allowed |onnxruntime - torch| logit difference, relative to the largest torch logit
magnitude (at least 1)."""
INSTANCES_NAME = "instances.csv"
CHECKED_INPUTS = 32
"""Exported inputs whose box centre and corners are run through onnxruntime (4 runs each)."""
PREDICT_BATCH = 256
_INSTALL_HINT = "pip install 'acert[export]'"


@dataclass
class ExportResult:
    """What :func:`export_run` wrote and for which inputs.

    Attributes:
        onnx_path: the ONNX network.
        vnnlib_paths: one property file per input, in the order of ``indices``.
        instances_path: the VNN-COMP instances CSV.
        abcrown_path: the αβ-CROWN configuration beside it.
        indices: row of each input in the split (ascending).
        labels: true class of each input.
        predictions: class the model predicts for each input.
        max_abs_diff: largest |onnxruntime - torch| over the checked boxes' centres and corners.
    """

    onnx_path: Path
    vnnlib_paths: list[Path]
    instances_path: Path
    abcrown_path: Path
    indices: list[int]
    labels: list[int]
    predictions: list[int]
    max_abs_diff: float

    def summary(self) -> str:
        """One line for the command line."""
        correct = sum(p == y for p, y in zip(self.predictions, self.labels, strict=True))
        return (
            f"wrote {self.onnx_path}, {len(self.vnnlib_paths)} properties "
            f"({correct} correctly classified), {self.instances_path} and {self.abcrown_path}; "
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
    properties: PropertySettings,
    data: DataSelection | None = None,
) -> ExportResult:
    """Export a trained run as ONNX + VNNLIB properties + instances.csv; see the module docstring.

    Args:
        run: run folder or checkpoint (its best model, else its last).
        onnx_path: ONNX file to write.
        vnnlib_dir: folder for ``prop_<i>.vnnlib``; ``instances.csv`` goes to its parent.
        properties: radius, number, seed, timeout and whether only correctly classified
            inputs are drawn.
        data: dataset, data folder and split to draw the inputs from (default: the run's test
            split); no ``limit``, ``properties.n`` says how many.

    Returns:
        The written paths, the chosen inputs and the ONNX check's largest difference.
    """
    data = DataSelection() if data is None else data
    check_export_settings(properties, data)
    eps, n, seed = float(properties.eps), int(properties.n), properties.seed
    onnx, ort = _require_onnx()
    onnx_path, vnnlib_dir = Path(onnx_path), Path(vnnlib_dir)
    _check_targets(onnx_path, vnnlib_dir)
    config = run_config(run)
    model = load(run)
    name, split = data.dataset or config.dataset, data.split
    images = load_run_inputs(config, data)
    if n > len(images):
        raise AcertError(
            f"--n {n} exceeds the {len(images)} inputs of the {name} {split} split; lower --n"
        )
    chosen = _select(model, images, n, seed, properties.only_correct)
    network = onnx_bytes(model, chosen.pixels(slice(0, 1)), onnx, name)
    points = check_points(chosen.pixels(slice(0, CHECKED_INPUTS)), eps, seed)
    max_diff = verify_onnx(network, model, points, ort, ONNX_TOLERANCE)
    vnnlib_paths = [vnnlib_dir / f"prop_{i}.vnnlib" for i in chosen.indices.tolist()]
    instances_path = vnnlib_dir.resolve().parent / INSTANCES_NAME
    abcrown_path = instances_path.parent / ABCROWN_NAME
    source = f"acert export of {Path(run).resolve().name}: {name} {split} split"
    timeout = properties.timeout
    abcrown = abcrown_config(INSTANCES_NAME, timeout, f"{source}, eps {eps!r}")
    contents = [
        _property_bytes(chosen, row, dataset_info(name).num_classes, eps, source)
        for row in range(len(vnnlib_paths))
    ]
    rows = _instances_csv(instances_path.parent, onnx_path, vnnlib_paths, timeout)
    _write_all(
        [
            *zip(vnnlib_paths, contents, strict=True),
            (onnx_path, lambda: network),
            (instances_path, rows.encode),
            (abcrown_path, abcrown.encode),
        ]
    )
    return ExportResult(
        onnx_path,
        vnnlib_paths,
        instances_path,
        abcrown_path,
        chosen.indices.tolist(),
        chosen.labels.tolist(),
        chosen.predictions.tolist(),
        max_diff,
    )


# ------------------------------------------------------------------------------- checks
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
            "the normalisation is folded into the ONNX model's first layer",
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
