"""Certify a trained run: the work behind ``acert certify``.

Loads the run's best model and its dataset split, computes certified radii with the chosen
bound — or the best of several, per sample — and writes the metrics (JSON) and radii next to
the run. :class:`CertificateChecks` adds checks of the radii: a float64 re-check, and attack
radii (:func:`acert.radius.attacks.attack_radii`), an upper bound beside every certified radius.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from acert.bounds import METHODS as BOUND_METHODS
from acert.config import TrainConfig, available_device, config_from_dict
from acert.data import SPLITS, ImageSet, dataset_info, load_imageset, stratified_subset
from acert.evaluation.evaluate import (
    Evaluation,
    EvaluationSettings,
    attack_check,
    check_settings,
    evaluate,
    float64_violations,
)
from acert.foundation.errors import AcertError, CheckpointError
from acert.foundation.ranges import OneOf, at_least, settings_object
from acert.radius.attacks import AttackSearch, attack_radii
from acert.records.runs import RunDir, atomic_write, check_writable_file, load, read_checkpoint

__all__ = [
    "CertificateChecks",
    "CertifyResult",
    "DataSelection",
    "certify_run",
    "check_selection",
    "load_run_inputs",
    "parse_bound",
    "run_config",
    "run_settings",
]


@dataclass(frozen=True)
class CertificateChecks:
    """Checks of the certified radii beside the certification.

    Attributes:
        float64: re-check every reported radius with the model in float64 and record the
            samples whose float32 certificate does not hold there (``float64_check``).
        attack: find every sample's attack radius with these settings and compare
            (``acr_attack``, ``acr_gap``, ``attack_check``); None: no attack radii.
    """

    float64: bool = False
    attack: AttackSearch | None = None


SPLIT = OneOf(SPLITS)
"""A dataset split (:data:`acert.data.SPLITS`)."""

LIMIT = at_least(1, whole=True, null="the whole split")
"""Inputs of a stratified subset to certify."""

SUBSET_SEED = at_least(0, whole=True, null="the run's eval_seed")
"""The seed of that subset."""


@dataclass(frozen=True)
class DataSelection:
    """Which data a run is certified (or exported) on; checked when the object is made.

    Attributes:
        dataset: dataset name (default None: the run's); same input shape and classes.
        data_dir: folder holding the dataset files (default None: the run's).
        split: ``"test"`` or ``"train"``.
        limit: a stratified subset of this many inputs, >= 1; None: the whole split.
        seed: the seed of that subset; None: the run's ``eval_seed`` (its ``seed`` if unset),
            so that ``--limit`` draws the images the run's own evaluation drew.
    """

    dataset: str | None = None
    data_dir: str | Path | None = None
    split: str = "test"
    limit: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.dataset is not None and not isinstance(self.dataset, str):
            raise AcertError(f"dataset must be a dataset name or None, got {self.dataset!r}")
        if self.data_dir is not None and not isinstance(self.data_dir, (str, Path)):
            raise AcertError(f"data_dir must be a folder path or None, got {self.data_dir!r}")
        SPLIT.check(self.split, "split")
        LIMIT.check(self.limit, "limit")
        SUBSET_SEED.check(self.seed, "eval_seed")


def check_selection(value: object) -> DataSelection:
    """``value`` if it is a :class:`DataSelection`, else a one-line :class:`AcertError`."""
    return settings_object(
        value,
        DataSelection,
        "data",
        "acert.workflows.certify.runs.DataSelection",
        "e.g. DataSelection(split='train')",
    )


@dataclass
class CertifyResult:
    """Metrics of a certification and the JSON file they were written to."""

    metrics: dict[str, Any]
    radii: torch.Tensor
    path: Path
    attack_radii: torch.Tensor | None = None


def run_config(path: str | Path) -> TrainConfig:
    """The config a run folder or checkpoint was trained with."""
    path = Path(path)
    if path.is_dir():
        return RunDir(path).load_config()
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a run folder or a checkpoint file")
    return config_from_dict(read_checkpoint(path)["config"])


def run_settings(
    run: str | Path | TrainConfig,
    bound: str = "ibp",
    eps: Sequence[float] | None = None,
    eps_max: float | None = None,
    pgd_steps: int = 20,
    batch_size: int = 256,
    crown_memory_mib: float | None = None,
    cascade: bool = False,
) -> EvaluationSettings:
    """The settings of a certification of ``run`` (a run folder, checkpoint or its config):
    what ``acert certify`` passes to :func:`certify_run`.

    Args:
        run: run folder, checkpoint or the run's config.
        bound: ``"ibp"``, ``"crown-ibp"``, ``"crown"``, or a best-of certificate (see
            :func:`parse_bound`): ``"best"`` (all bounds) or ``"best:ibp,crown"``.
        eps: radii for certified (and PGD) accuracy; default: the run's ``cert_eps`` up to
            ``eps_max`` (``eps_max`` itself if none is).
        eps_max: cap of the radius search and the ACR; default: the run's.
        pgd_steps, batch_size, crown_memory_mib, cascade: as in :class:`EvaluationSettings`.
    """
    config = run if isinstance(run, TrainConfig) else run_config(run)
    bounds = parse_bound(bound)
    eps_max = config.eps_max if eps_max is None else eps_max
    settings = EvaluationSettings(
        eps_max,
        cert_eps=() if eps is None else eps,
        bounds=bounds,
        pgd_steps=pgd_steps,
        batch_size=batch_size,
        crown_memory_mib=crown_memory_mib,
        cascade=cascade,
    )
    if eps is not None:
        return settings
    # the run's radii, as far as the cap allows
    own = tuple(e for e in config.cert_eps if e <= settings.eps_max) or (settings.eps_max,)
    return replace(settings, cert_eps=own)


def certify_run(
    run: str | Path,
    settings: EvaluationSettings | None = None,
    data: DataSelection | None = None,
    *,
    checks: CertificateChecks | None = None,
    device: str = "cpu",
    out: str | Path | None = None,
    progress: bool = False,
) -> CertifyResult:
    """Evaluate a trained run with a chosen bound; see ``acert certify --help``.

    Args:
        run: run folder or checkpoint.
        settings: cap, radii, bounds, attack steps, chunk size and CROWN memory cap; default:
            :func:`run_settings` of the run (its cap and ``cert_eps``, IBP, 20 PGD steps).
            No certification radius may exceed the cap.
        data: the dataset, split and subset to certify on (default: the run's test split).
        checks: float64 re-check and attack radii (default: neither).
        device: where to compute.
        out: JSON path; default ``<run>/certify_<bound>.json`` (radii beside it).
        progress: show a progress bar.
    """
    config = run_config(run)
    settings = run_settings(config) if settings is None else settings
    settings = check_settings(settings)
    data = DataSelection() if data is None else data
    checks = checks or CertificateChecks()
    _check_certification(settings, data, checks)
    available_device(device)
    eps_max, bounds = settings.eps_max, settings.bounds
    name = data.dataset or config.dataset
    target = Path(out) if out else _default_target(run, settings, config, name, data.split)
    check_writable_file(target, "--out")
    images = load_run_inputs(config, data)
    if data.limit is not None:
        classes = dataset_info(name).num_classes
        if data.limit < classes:
            raise AcertError(
                f"--limit {data.limit} cannot cover the {classes} classes; use >= {classes}"
            )
        seed = config.test_subset_seed if data.seed is None else data.seed
        images = stratified_subset(images, data.limit, seed=seed)
    model = load(run)
    x, y = images.floats(), images.labels
    result = evaluate(model, x, y, settings, device=device, progress=progress)
    metrics = {**result.to_dict(), "dataset": name, "split": data.split}
    batch_size = settings.batch_size
    if checks.float64:
        violations = _float64_check(model, x, y, result, bounds, batch_size)
        metrics["float64_check"] = {
            "checked": int((result.radii > 0).sum()),
            "violations": int(violations.numel()),
            "violating_samples": violations.tolist(),
        }
    attacked = None
    if checks.attack is not None:
        attacked = _attack_radii(model, x, y, eps_max, checks.attack, batch_size, device)
        check = attack_check(result.radii, attacked, eps_max)
        metrics["acr_attack"] = check.pop("acr_attack")
        metrics["acr_gap"] = check.pop("gap")
        metrics["attack_check"] = {**asdict(checks.attack), **check}
    atomic_write(
        target, lambda stream: stream.write((json.dumps(metrics, indent=2) + "\n").encode())
    )
    radii_path = target.with_suffix(".radii.pt")
    atomic_write(radii_path, lambda stream: torch.save(result.radii, stream))
    if attacked is not None:
        attack_path = target.with_suffix(".attack_radii.pt")
        atomic_write(attack_path, lambda stream: torch.save(attacked, stream))
    return CertifyResult(metrics, result.radii, target, attacked)


def parse_bound(text: str) -> tuple[str, ...]:
    """The bounds a ``--bound`` names: one of :data:`acert.bounds.METHODS`; ``"best"``, all of
    them; or ``"best:ibp,crown"``, those named. Several bounds make a best-of certificate:
    per sample the largest of their radii (each is sound, so their maximum is)."""
    name, sep, names = text.strip().lower().partition(":")
    if not sep and name in BOUND_METHODS:
        return (name,)
    choices = f"choose one of {', '.join(BOUND_METHODS)}, best (all of them) or best:ibp,crown"
    if name != "best":
        raise AcertError(f"unknown bound {text!r}; {choices}")
    if not sep:
        return tuple(BOUND_METHODS)
    chosen = {part.strip() for part in names.split(",") if part.strip()}
    unknown = sorted(chosen - set(BOUND_METHODS))
    if unknown:
        raise AcertError(f"unknown bound {unknown[0]!r} in --bound {text}; {choices}")
    if len(chosen) < 2:
        raise AcertError(
            f"--bound {text} names {len(chosen)} bound; a best-of needs two or more, "
            "e.g. best:ibp,crown (or pass the one bound alone)"
        )
    return tuple(bound for bound in BOUND_METHODS if bound in chosen)


def _float64_check(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    result: Evaluation,
    bounds: tuple[str, ...],
    batch_size: int,
) -> torch.Tensor:
    """The samples whose reported radius fails in float64, each re-checked with the bound
    that gave it its radius (the first of the best ones, for a best-of)."""
    if len(bounds) == 1:
        return float64_violations(model, x, y, result.radii, bounds[0], batch_size)
    winner = torch.stack([result.bound_radii[bound] for bound in bounds]).argmax(0)
    bad = []
    for i, bound in enumerate(bounds):
        rows = torch.nonzero(winner == i, as_tuple=True)[0]
        if rows.numel():
            failed = float64_violations(
                model, x[rows], y[rows], result.radii[rows], bound, batch_size
            )
            bad.append(rows[failed])
    return torch.sort(torch.cat(bad)).values if bad else torch.empty(0, dtype=torch.long)


def _attack_radii(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps_max: float,
    search: AttackSearch,
    batch_size: int,
    device: str,
) -> torch.Tensor:
    """:func:`acert.radius.attacks.attack_radii` of every sample, ``batch_size`` at a time."""
    generator = torch.Generator().manual_seed(0)
    parts = [
        attack_radii(
            model,
            x[start : start + batch_size].to(device),
            y[start : start + batch_size].to(device),
            eps_max,
            search,
            generator,
        ).cpu()
        for start in range(0, x.shape[0], batch_size)
    ]
    return torch.cat(parts)


def load_run_inputs(config: TrainConfig, data: DataSelection) -> ImageSet:
    """The split ``data`` names (all of it: ``data.limit`` is left to the caller) for the run
    trained with ``config``; its images must fit the run's model (same shape and classes)."""
    name = data.dataset or config.dataset
    info, trained = dataset_info(name), dataset_info(config.dataset)
    if (info.shape, info.num_classes) != (trained.shape, trained.num_classes):
        raise AcertError(
            f"dataset {name} (shape {info.shape}, {info.num_classes} classes) does not fit the "
            f"run's model trained on {config.dataset}; pass a dataset of the same shape and classes"
        )
    return load_imageset(name, data.split, data.data_dir or config.data_dir)


def _check_certification(
    settings: EvaluationSettings, data: DataSelection, checks: CertificateChecks
) -> None:
    """What a certification asks beyond its settings' own checks: certification radii up to
    the cap, a data selection, valid attack settings."""
    for value in settings.cert_eps:
        if value > settings.eps_max:
            raise AcertError(
                f"certification eps {value} exceeds eps_max={settings.eps_max}; "
                "raise --eps-max or lower --eps"
            )
    check_selection(data)
    if checks.attack is not None:
        checks.attack.check()


def _default_target(
    run: str | Path, settings: EvaluationSettings, config: TrainConfig, dataset: str, split: str
) -> Path:
    """``certify_<bound>.json`` beside the run for its own test set and cap (what studies
    read); a name that says what differs otherwise, so that it replaces nothing of theirs."""
    run_path = Path(run)
    folder = run_path if run_path.is_dir() else run_path.parent
    eps_max = settings.eps_max
    differs = [
        part
        for part, same in (
            (dataset, dataset == config.dataset),
            (split, split == "test"),
            (f"epsmax{eps_max:g}", eps_max == config.eps_max),
        )
        if not same
    ]
    return folder / ("_".join([f"certify_{settings.label}", *differs]) + ".json")
