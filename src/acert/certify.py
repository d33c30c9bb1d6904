"""Certify a trained run: the work behind ``acert certify``.

Loads the run's best model and its dataset split, computes certified radii with the chosen
bound, and writes the metrics (JSON) and radii next to the run.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from acert.bounds import crown
from acert.config import TrainConfig, config_from_dict
from acert.data import SPLITS, load_imageset, stratified_subset
from acert.errors import AcertError, CheckpointError
from acert.evaluate import evaluate, float64_violations
from acert.runs import RunDir, atomic_write, load, read_checkpoint

__all__ = ["CertifyResult", "certify_run", "run_config"]


@dataclass
class CertifyResult:
    """Metrics of a certification and the JSON file they were written to."""

    metrics: dict[str, Any]
    radii: torch.Tensor
    path: Path


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
    check_float64: bool = False,
    crown_memory_mib: float | None = None,
) -> CertifyResult:
    """Evaluate a trained run with a chosen bound; see ``acert certify --help``.

    Args:
        run: run folder or checkpoint.
        bound: ``"ibp"``, ``"crown-ibp"`` or ``"crown"``.
        eps: radii for certified (and PGD) accuracy; default: the run's ``cert_eps``.
        eps_max: cap of the radius search and the ACR; default: the run's.
        dataset, data_dir: override the run's dataset (same input shape and classes).
        split: ``"test"`` or ``"train"``.
        limit: certify a stratified subset of this many inputs.
        pgd_steps: PGD steps; 0 skips the attack.
        batch_size: inputs per bound pass.
        device: where to compute.
        out: JSON path; default ``<run>/certify_<bound>.json``.
        progress: show a progress bar.
        check_float64: re-check every reported radius with the model in float64 and record
            the samples whose float32 certificate does not hold there.
        crown_memory_mib: cap of each CROWN backward chunk's coefficients, MiB.
    """
    config = run_config(run)
    model = load(run)
    eps_max = config.eps_max if eps_max is None else eps_max
    eps = list(config.cert_eps) if eps is None else list(eps)
    if not 0 < eps_max < 1:
        raise AcertError(f"--eps-max must lie in (0, 1) pixel units, got {eps_max}")
    for value in eps:
        if not 0 < value <= eps_max:
            raise AcertError(
                f"certification eps {value} must lie in (0, eps_max={eps_max}]; raise --eps-max"
            )
    if split not in SPLITS:
        raise AcertError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    data = load_imageset(dataset or config.dataset, split, data_dir or config.data_dir)
    if limit is not None:
        data = stratified_subset(data, limit, seed=config.seed)
    x, y = data.floats(), data.labels
    budget = contextlib.nullcontext()
    if crown_memory_mib is not None:
        if crown_memory_mib <= 0:
            raise AcertError(f"--crown-memory-mib must be > 0, got {crown_memory_mib}")
        budget = crown.memory_budget(max(1, int(crown_memory_mib * 2**20 / x.element_size())))
    with budget:
        result = evaluate(
            model,
            x,
            y,
            eps_max,
            eps,
            bound,
            pgd_eps=eps if pgd_steps > 0 else [],
            pgd_steps=pgd_steps,
            batch_size=batch_size,
            device=device,
            progress=progress,
        )
    metrics = {**result.to_dict(), "dataset": dataset or config.dataset, "split": split}
    if check_float64:
        violations = float64_violations(model, x, y, result.radii, bound, batch_size)
        metrics["float64_check"] = {
            "checked": int((result.radii > 0).sum()),
            "violations": int(violations.numel()),
            "violating_samples": violations.tolist(),
        }
    run_path = Path(run)
    folder = run_path if run_path.is_dir() else run_path.parent
    target = Path(out) if out else folder / f"certify_{bound}.json"
    atomic_write(
        target, lambda stream: stream.write((json.dumps(metrics, indent=2) + "\n").encode())
    )
    radii_path = target.with_suffix(".radii.pt")
    atomic_write(radii_path, lambda stream: torch.save(result.radii, stream))
    return CertifyResult(metrics, result.radii, target)
