"""Certify a trained run: the work behind ``acert certify``.

Loads the run's best model and its dataset split, computes certified radii with the chosen
bound — or the best of several, per sample — and writes the metrics (JSON) and radii next to
the run. :class:`CertificateChecks` adds checks of the radii: a float64 re-check, and attack
radii (:func:`acert.attacks.attack_radii`), an upper bound beside every certified radius.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from acert.attacks import AttackSearch, attack_radii
from acert.bounds import METHODS as BOUND_METHODS
from acert.bounds import crown
from acert.config import TrainConfig, available_device, config_from_dict
from acert.data import SPLITS, ImageSet, dataset_info, load_imageset, stratified_subset
from acert.errors import AcertError, CheckpointError
from acert.evaluate import Evaluation, attack_check, best_label, evaluate, float64_violations
from acert.runs import RunDir, atomic_write, check_writable_file, load, read_checkpoint

__all__ = [
    "CertificateChecks",
    "CertifyResult",
    "certify_run",
    "load_run_inputs",
    "parse_bound",
    "run_config",
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


def certify_run(
    run: str | Path,
    bound: str = "ibp",
    eps: list[float] | None = None,
    eps_max: float | None = None,
    dataset: str | None = None,
    data_dir: str | None = None,
    split: str = "test",
    limit: int | None = None,
    pgd_steps: int = 20,
    batch_size: int = 256,
    device: str = "cpu",
    out: str | Path | None = None,
    progress: bool = False,
    checks: CertificateChecks | None = None,
    crown_memory_mib: float | None = None,
) -> CertifyResult:
    """Evaluate a trained run with a chosen bound; see ``acert certify --help``.

    Args:
        run: run folder or checkpoint.
        bound: ``"ibp"``, ``"crown-ibp"``, ``"crown"``, or a best-of certificate (see
            :func:`parse_bound`): ``"best"`` (all bounds) or ``"best:ibp,crown"``.
        eps: radii for certified (and PGD) accuracy; default: the run's ``cert_eps``.
        eps_max: cap of the radius search and the ACR; default: the run's.
        dataset, data_dir: override the run's dataset (same input shape and classes).
        split: ``"test"`` or ``"train"``.
        limit: certify a stratified subset of this many inputs.
        pgd_steps: PGD steps; 0 skips the attack.
        batch_size: inputs per bound pass.
        device: where to compute.
        out: JSON path; default ``<run>/certify_<bound>.json`` (radii beside it).
        progress: show a progress bar.
        checks: float64 re-check and attack radii (default: neither).
        crown_memory_mib: cap of each CROWN backward chunk's coefficients, MiB.
    """
    config = run_config(run)
    eps_max = config.eps_max if eps_max is None else eps_max
    eps = _certification_eps(config, eps, eps_max)
    bounds = parse_bound(bound)
    checks = checks or CertificateChecks()
    _check_options(batch_size, crown_memory_mib, checks)
    available_device(device)
    name = dataset or config.dataset
    label = best_label(bounds)
    target = Path(out) if out else _default_target(run, label, config, name, split, eps_max)
    check_writable_file(target, "--out")
    data = load_run_inputs(config, name, split, data_dir)
    if limit is not None:
        classes = dataset_info(name).num_classes
        if limit < classes:
            raise AcertError(
                f"--limit {limit} cannot cover the {classes} classes; use >= {classes}"
            )
        data = stratified_subset(data, limit, seed=config.seed)
    model = load(run)
    x, y = data.floats(), data.labels
    budget = contextlib.nullcontext()
    if crown_memory_mib is not None:
        budget = crown.memory_budget(max(1, int(crown_memory_mib * 2**20 / x.element_size())))
    with budget:
        result = evaluate(
            model,
            x,
            y,
            eps_max,
            eps,
            bounds,
            pgd_eps=eps,
            pgd_steps=pgd_steps,
            batch_size=batch_size,
            device=device,
            progress=progress,
        )
    metrics = {**result.to_dict(), "dataset": name, "split": split}
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
    model: torch.nn.Sequential,
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
    model: torch.nn.Sequential,
    x: torch.Tensor,
    y: torch.Tensor,
    eps_max: float,
    search: AttackSearch,
    batch_size: int,
    device: str,
) -> torch.Tensor:
    """:func:`acert.attacks.attack_radii` of every sample, ``batch_size`` at a time."""
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


def load_run_inputs(
    config: TrainConfig, name: str, split: str, data_dir: str | None = None
) -> ImageSet:
    """A split of dataset ``name`` for the run trained with ``config``; its images must fit the
    run's model (same shape and classes)."""
    if split not in SPLITS:
        raise AcertError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    info, trained = dataset_info(name), dataset_info(config.dataset)
    if (info.shape, info.num_classes) != (trained.shape, trained.num_classes):
        raise AcertError(
            f"dataset {name} (shape {info.shape}, {info.num_classes} classes) does not fit the "
            f"run's model trained on {config.dataset}; pass a dataset of the same shape and classes"
        )
    return load_imageset(name, split, data_dir or config.data_dir)


def _certification_eps(config: TrainConfig, eps: list[float] | None, eps_max: float) -> list[float]:
    """The radii of the certified accuracies: ``eps``, or the run's own below ``eps_max``."""
    if not 0 < eps_max < 1:
        raise AcertError(f"--eps-max must lie in (0, 1) pixel units, got {eps_max}")
    if eps is None:  # the run's radii, as far as the cap allows
        return [e for e in config.cert_eps if e <= eps_max] or [eps_max]
    for value in eps:
        if not 0 < value < 1:
            raise AcertError(f"certification eps {value} must lie in (0, 1) pixel units")
        if value > eps_max:
            raise AcertError(
                f"certification eps {value} exceeds eps_max={eps_max}; "
                "raise --eps-max or lower --eps"
            )
    return list(eps)


def _check_options(
    batch_size: int, crown_memory_mib: float | None, checks: CertificateChecks
) -> None:
    if checks.attack is not None:
        checks.attack.check()
    if batch_size < 1:
        raise AcertError(f"--batch-size must be >= 1, got {batch_size}")
    if crown_memory_mib is not None and not 0 < crown_memory_mib < math.inf:
        raise AcertError(f"--crown-memory-mib must be a positive number, got {crown_memory_mib}")


def _default_target(
    run: str | Path, bound: str, config: TrainConfig, dataset: str, split: str, eps_max: float
) -> Path:
    """``certify_<bound>.json`` beside the run for its own test set and cap (what studies
    read); a name that says what differs otherwise, so that it replaces nothing of theirs."""
    run_path = Path(run)
    folder = run_path if run_path.is_dir() else run_path.parent
    differs = [
        part
        for part, same in (
            (dataset, dataset == config.dataset),
            (split, split == "test"),
            (f"epsmax{eps_max:g}", eps_max == config.eps_max),
        )
        if not same
    ]
    return folder / ("_".join([f"certify_{bound}", *differs]) + ".json")
