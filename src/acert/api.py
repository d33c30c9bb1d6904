"""The Python API on a network and data of your own: ``acert.fit`` and ``acert.certify``.

    model = acert.fit(model, (x, y), eps_max=0.3, epochs=20)
    report = acert.certify(model, (x_test, y_test), eps_max=0.3, eps=(0.1, 0.3))
    report.acr, report.radii, report.certified_accuracy[0.3]

``model`` is any network the bounds support: an ``nn.Sequential`` of the layer kinds of
:mod:`acert.bounds`, or an ``nn.Module`` of its own whose forward is made of them and of the
functional forms :mod:`acert.bounds.tracing` maps onto them (``F.relu``, ``+``, ``torch.cat``,
``torch.flatten``), traced once into a graph; the logits come from an ``nn.Linear``, the
normalisation from a ``Normalize`` layer. Data is
an ``(x, y)`` pair of tensors, a ``torch.utils.data.Dataset`` of ``(image, label)`` or a
``DataLoader`` (:func:`acert.data.as_imageset`), with pixels in [0, 1]. ``fit`` runs the
project's training loop (ε schedule, warm-up, model selection, checkpoints) and, with ``out``,
writes the usual run folder: resumable, and ``acert.load(out)`` returns the trained network.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from acert.bounds import bounds_form, check_arithmetic, check_model_input, model_dtype
from acert.bounds.clean_pass import check_fixed_normalisation, check_supported
from acert.bounds.tracing import is_plain_chain, last_layer
from acert.config import (
    GIVEN_METHOD,
    GIVEN_MODEL,
    TrainConfig,
    available_device,
    config_from_dict,
    resolve,
)
from acert.data import ImageSet, as_imageset, given_dataset
from acert.evaluation.evaluate import Evaluation, EvaluationSettings, evaluate
from acert.foundation.errors import AcertError, ConfigError, UnsupportedModelError
from acert.methods import TRAINING_METHODS, TrainingMethod, create_method, list_methods
from acert.models import GraphNet
from acert.records.runs import RunDir
from acert.workflows.certify.runs import parse_bound
from acert.workflows.train.run import RunInputs, run

__all__ = ["certify", "fit"]

_CPU = 'pass device="cpu"'

WARMUP_SHARE = 0.4
"""Epochs of the ε ramp, as a share of the epochs, when ``reg_epochs`` is not given (the
presets ramp over 20-40% of training: docs/METHOD.md, "Settings per dataset")."""


def fit(
    model: nn.Module,
    train: Any,
    *,
    eps_max: float,
    epochs: int,
    method: str | TrainingMethod = "acert",
    val: Any = None,
    out: str | Path | None = None,
    device: str | torch.device | None = None,
    **config: Any,
) -> nn.Module:
    """Train ``model`` on ``train`` with a certified-training method; returns it in eval mode.

    Args:
        model: a network the bounds support (see the module docstring); trained in place.
        train: the training data: ``(x, y)`` tensors, a ``Dataset`` or a ``DataLoader``.
        eps_max: the training ε at the end of the ramp and the radius cap, pixel units.
        epochs: training epochs.
        method: a method name (``acert list``) or a method object, e.g.
            ``acert.methods.ACERT(kappa=0.25)`` or one of one's own (``loss``, ``state_dict``,
            ``load_state_dict``; see :class:`acert.methods.TrainingMethod`), registered or not.
        val: validation data (same forms) for model selection by acceps; without it the
            last epoch's model is kept.
        out: run folder (checkpoints, metrics, config, the network): resumable with
            ``resume=True``, read back with ``acert.load(out)``.
        device: where to train (``"cpu"``, ``"cuda"``; default cpu).
        **config: any config key (``acert train --help``): ``batch_size``, ``lr``,
            ``kappa``, ``reg_epochs``, ``seed``, ..., and ``resume`` and ``progress``.
    """
    resume, progress = bool(config.pop("resume", False)), bool(config.pop("progress", True))
    if resume and out is None:
        raise AcertError("resume=True needs out=..., the run folder to resume from")
    network = _supported(model)
    _check_trainable(network)
    if device is not None:
        available_device(str(device), _CPU)
    dtype = model_dtype(network)
    train_set, classes = _with_classes(network, train, "train", dtype)
    check_model_input(network, train_set.shape, dtype)
    val_set = _validation(val, train_set, classes, dtype)
    name, method_object = _method(method)
    settings = _config(train_set, classes, name, eps_max, epochs, device, out, config)
    if method_object is None:
        method_object = create_method(settings)
    if out is not None and not (resume and RunDir(out).architecture_path.is_file()):
        RunDir(out).create().save_architecture(network)
    inputs = RunInputs(network, method_object, train_set, val_set, lambda: None)
    with torch.enable_grad():  # a caller's torch.no_grad() block would leave nothing to train
        result = run(settings, out, resume, progress, None if progress else _quiet, inputs)
    return result.model.eval()


def certify(
    model: nn.Module,
    data: Any,
    *,
    eps_max: float,
    bound: str | Sequence[str] = "ibp",
    eps: Sequence[float] = (),
    pgd_steps: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Evaluation:
    """Certificates of ``model`` on ``data``: per-sample radii, ACR, clean accuracy and the
    certified accuracy at each ε of ``eps``.

    Args:
        model: a network the bounds support, as it predicts: a Dropout in train mode or a
            batch-norm that normalises with the current batch is refused (call
            ``model.eval()``); the model's modes are left as they were.
        data: ``(x, y)`` tensors, a ``Dataset`` or a ``DataLoader``; pixels in [0, 1].
        eps_max: cap of the radii and of the ACR, pixel units.
        bound: ``"ibp"``, ``"crown-ibp"``, ``"crown"``, ``"best"`` (all three) or
            ``"best:ibp,crown"`` (those named), as ``acert certify --bound`` takes it, or a
            sequence of names: with several, per sample the largest of their radii (each is
            sound, so their maximum is).
        eps: radii at which the certified accuracy is reported.
        pgd_steps: PGD steps for an empirical (attacked) accuracy at each ε; 0 skips it.
        device: where to compute.
        progress: a progress bar over the batches.

    Returns:
        :class:`~acert.evaluation.evaluate.Evaluation`: ``radii`` (N,), ``acr``, ``clean_accuracy``,
        ``certified_accuracy`` {ε: fraction}, ``pgd_accuracy``, ``acceps``.
    """
    network = _supported(model)
    check_arithmetic()
    dtype = model_dtype(network)
    data_set, _ = _with_classes(network, data, "data", dtype)
    check_fixed_normalisation(bounds_form(network, data_set.shape))
    bounds = parse_bound(bound) if isinstance(bound, str) else bound
    settings = EvaluationSettings(eps_max, eps, bounds, pgd_steps=pgd_steps)
    place = available_device(str(device), _CPU)
    return evaluate(
        network, data_set.floats(), data_set.labels, settings, device=place, progress=progress
    )


def _supported(model: nn.Module) -> nn.Module:
    """``model``, checked as far as it can be before the data's shape is known: a chain of
    supported layers or a graph whole; any other module is checked when it is traced."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(
            f"model must be a torch.nn.Module, got {type(model).__name__}; build it from "
            "acert.models, as an nn.Sequential or as an nn.Module of its own"
        )
    if is_plain_chain(model) or isinstance(model, GraphNet):
        check_supported(model)
    return model


def _with_classes(
    network: nn.Module, data: Any, name: str, dtype: torch.dtype
) -> tuple[ImageSet, int]:
    """``data`` as an image set whose labels lie below the model's number of classes, and
    that number; a model that is not a chain is traced on the data's shape first."""
    if is_plain_chain(network) or isinstance(network, GraphNet):
        classes = last_layer(network).out_features
        return as_imageset(data, name, classes, dtype), classes
    images = as_imageset(data, name, None, dtype)
    classes = last_layer(check_supported(bounds_form(network, images.shape))).out_features
    return as_imageset((images.images, images.labels), name, classes, dtype), classes


def _check_trainable(network: nn.Module) -> None:
    """One-line errors for a model or a calling context in which training cannot run."""
    if torch.is_inference_mode_enabled():
        raise AcertError(
            "acert.fit was called inside torch.inference_mode(), where nothing can be trained; "
            "call it outside that block"
        )
    if not any(parameter.requires_grad for parameter in network.parameters()):
        raise AcertError(
            "every parameter of the model is frozen (requires_grad=False), so training would "
            "change nothing; unfreeze those to train (parameter.requires_grad_(True))"
        )
    check_arithmetic()


def _validation(val: Any, train: ImageSet, classes: int, dtype: torch.dtype) -> ImageSet:
    if val is None:
        return train.subset(torch.empty(0, dtype=torch.int64))
    val_set = as_imageset(val, "val", classes, dtype)
    if val_set.shape != train.shape:
        raise AcertError(
            f"val's images are {val_set.shape} but train's are {train.shape}; pass the same kind"
        )
    return val_set


def _method(method: str | TrainingMethod) -> tuple[str, TrainingMethod | None]:
    """The method's config name, and the object when one was given."""
    if isinstance(method, str):
        return method, None
    needed = ("loss", "state_dict", "load_state_dict")
    if not all(callable(getattr(method, part, None)) for part in needed):
        raise ConfigError(
            f"method must be a name ({', '.join(list_methods())}) or an object with "
            f"{', '.join(needed)} (acert.methods.TrainingMethod), got {type(method).__name__}"
        )
    entry = TRAINING_METHODS.get(getattr(method, "name", None))
    registered = entry is not None and type(method) is entry.method_class
    return (entry.name if registered else GIVEN_METHOD), method


def _config(
    train: ImageSet,
    classes: int,
    method: str,
    eps_max: float,
    epochs: int,
    device: str | torch.device | None,
    out: str | Path | None,
    extra: dict[str, Any],
) -> TrainConfig:
    """The resolved config of a run on given data and a given network."""
    reserved = {"dataset", "model", "data_dir", "train_limit", "out"} & set(extra)
    if reserved:
        raise ConfigError(
            f"{', '.join(sorted(reserved))} name a registry's data or network; acert.fit takes "
            "them as arguments (model, train, out)"
        )
    values = {
        "dataset": given_dataset(train.shape, classes).name,
        "model": GIVEN_MODEL,
        "method": method,
        "eps_max": eps_max,
        "epochs": epochs,
        "device": "cpu" if device is None else str(device),
        "out": None if out is None else str(out),
        "eval_pgd_steps": 0,
        **extra,
    }
    if isinstance(epochs, int) and "reg_epochs" not in extra:
        values["reg_epochs"] = WARMUP_SHARE * epochs
    if isinstance(epochs, int) and epochs < 2 and "stn_epochs" not in extra:
        values["stn_epochs"] = 0.0
    values.setdefault("cert_eps", [eps_max])
    return resolve(config_from_dict(values))


def _quiet(_line: str) -> None:
    pass
