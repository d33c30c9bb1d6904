"""Sweeps: one training run per point of a grid of config values, gathered in a study folder.

``acert sweep --method acert --grid kappa=0,0.1,0.25,0.5`` trains the ACERT trade-off curve
(docs/METHOD.md: κ moves the model along the accuracy–robustness trade-off); the baselines' curves
come from their own knobs (``--method ibp --grid eps_train=...``) swept into the same folder.
Each point trains in its own run folder, named from the method and the point
(``acert-kappa0.25``), which also holds a ``sweep.json`` naming both. A sweep is resumable:
a run folder with ``test_metrics.json`` is finished and skipped, one with
``checkpoints/last.pt`` is resumed, any other starts afresh. Every finished run is then
certified with each requested bound (``certify_<bound>.json``, kept while its subset size
matches), and the study table (:mod:`acert.records.study`) is rewritten after every point.

``jobs=N`` runs up to N points at once, each a fresh process (:mod:`acert.workflows.sweep.point`)
with its share of the cores as ``threads``; ``launcher="slurm"`` makes each point a SLURM job and
``"local"`` the same submitit job run here (:mod:`acert.workflows.sweep.jobs`). Either way a point
is trained, resumed or skipped by the state of its folder, exactly as in one process, its output
kept in the folder's ``sweep.log``.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from acert.bounds import METHODS as BOUND_METHODS
from acert.config import (
    TrainConfig,
    changed_keys,
    config_from_dict,
    config_keys,
    parse_override,
    resolve,
)
from acert.data import dataset_info
from acert.foundation.errors import AcertError, ConfigError
from acert.foundation.threads import job_environment, thread_share
from acert.methods import create_method
from acert.records.runs import RunDir, atomic_write, build_model, make_folder
from acert.records.study import (
    SWEEP_FILE,
    certifies_the_run,
    certify_path,
    find_runs,
    read_json,
    study_table,
    value_text,
    write_study_table,
)
from acert.workflows.certify.runs import DataSelection, certify_run, run_settings
from acert.workflows.sweep.jobs import Job, Launcher, make_launcher, point_command, run_jobs
from acert.workflows.train import run as training

__all__ = [
    "grid_points",
    "parse_bounds",
    "parse_grid",
    "run_name",
    "run_state",
    "study_table",
    "sweep",
    "write_study_table",
]

UNSWEPT = ("out",)
"""Config keys a grid may not name: each point's run folder is chosen by the sweep."""

Log = Callable[[str], None]


def parse_grid(specs: Sequence[str]) -> dict[str, list[Any]]:
    """``["kappa=0,0.25", "eps_train=0.1"]`` -> ``{"kappa": [0, 0.25], "eps_train": [0.1]}``.

    Values are comma-separated YAML scalars, typed later against the config.
    """
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"--grid {spec!r} must look like key=v1,v2 (e.g. kappa=0,0.25)")
        if key in grid:
            raise ConfigError(f"grid key {key!r} given twice; list all its values in one --grid")
        parsed = [parse_override(f"{key}={item.strip()}")[1] for item in values.split(",")]
        grid[key] = [value for value in parsed if value is not None]
    return grid


def parse_bounds(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"ibp,crown"`` (or a sequence of names) -> the bounds, checked against the registry."""
    names = text.split(",") if isinstance(text, str) else list(text)
    bounds = tuple(dict.fromkeys(name.strip().lower() for name in names if name.strip()))
    if not bounds:
        raise ConfigError("give at least one bound to certify with, e.g. --bounds ibp")
    for bound in bounds:
        if bound not in BOUND_METHODS:
            raise ConfigError(
                f"unknown bound {bound!r}; choose from {', '.join(BOUND_METHODS)} (comma-separated)"
            )
    return bounds


def _check_key(key: str) -> None:
    known = list(config_keys())
    if key in UNSWEPT:
        raise ConfigError(f"grid key {key!r} cannot be swept; the sweep names each run folder")
    if key not in known:
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"did you mean {close[0]!r}?" if close else "use a config key such as kappa"
        raise ConfigError(f"unknown grid key {key!r}; {hint}")


def _typed_values(key: str, values: Sequence[Any], base: TrainConfig) -> list[Any]:
    if not values:
        raise ConfigError(f"grid key {key!r} has no values; give some, e.g. --grid {key}=a,b")
    typed = [getattr(config_from_dict({key: value}, base), key) for value in values]
    unique: list[Any] = []
    for value in typed:
        if value not in unique:
            unique.append(value)
    return unique


def grid_points(base: TrainConfig, grid: dict[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every point of the grid (the product of its values, first key outermost), typed.

    Args:
        base: the config the points modify; its field types type the values.
        grid: config key -> values (strings or typed values); an empty grid is one point.

    Raises:
        ConfigError: an unknown key, a key without values, or a value of the wrong type.
    """
    for key in grid:
        _check_key(key)
    typed = {key: _typed_values(key, values, base) for key, values in grid.items()}
    return [dict(zip(typed, combo, strict=True)) for combo in itertools.product(*typed.values())]


def run_name(method: str, point: dict[str, Any]) -> str:
    """The run folder of a point: ``acert-kappa0.25-eps_train0.1`` (method first)."""
    parts = [method] + [
        f"{key}{value_text(value)}" for key, value in point.items() if key != "method"
    ]
    return re.sub(r"[^A-Za-z0-9._+-]", "_", "-".join(parts))


def run_state(folder: str | Path) -> str:
    """``"finished"`` (test_metrics.json), ``"interrupted"`` (checkpoints/last.pt) or ``"new"``."""
    run = RunDir(folder)
    if run.test_metrics_path.is_file():
        return "finished"
    return "interrupted" if run.has_checkpoint("last") else "new"


def _point_config(base: TrainConfig, point: dict[str, Any]) -> TrainConfig:
    """The resolved config of a point, checked as far as possible without training."""
    config = resolve(dataclasses.replace(config_from_dict(point, base), out=None))
    create_method(config)
    build_model(config)
    return config


def _check_same_settings(folder: Path, config: TrainConfig) -> None:
    changed = changed_keys(RunDir(folder).load_config(), config)
    if changed:
        raise ConfigError(
            f"run {folder} was trained with other settings ({', '.join(changed)}); "
            "sweep with the same settings or into another --study"
        )


def _train_point(
    config: TrainConfig, folder: Path, point: dict[str, Any], progress: bool, log: Log
) -> None:
    """Train, resume or skip one point, by the state of its run folder."""
    state = run_state(folder)
    if state != "new":
        _check_same_settings(folder, config)
    if state == "finished":
        log(f"{folder.name}: finished, skipped")
        return
    make_folder(folder, "--study")
    knobs = {key: value for key, value in point.items() if key != "method"}
    record = {"method": config.method, "point": knobs}
    text = json.dumps(record, indent=2) + "\n"
    atomic_write(folder / SWEEP_FILE, lambda stream: stream.write(text.encode()))
    log(f"{folder.name}: {'resuming' if state == 'interrupted' else 'training'}")
    training.run(config, out=folder, resume=state == "interrupted", progress=progress, log=log)


def _certified_with(metrics: dict[str, Any], limit: int | None, config: dict[str, Any]) -> bool:
    """Whether a ``certify_<bound>.json`` was computed on the run's own test set and cap, on
    the subset size asked for."""
    if not certifies_the_run(metrics, config):
        return False
    if "limit" in metrics:
        return metrics["limit"] == limit
    return limit is None or metrics.get("n") == limit


def _has_certificate(folder: str | Path, bound: str, limit: int | None) -> bool:
    target = certify_path(folder, bound)
    config = RunDir(folder).load_config().to_dict()
    return target.is_file() and _certified_with(read_json(target), limit, config)


def certify_finished(
    folder: str | Path,
    bounds: Sequence[str],
    limit: int | None = None,
    device: str = "cpu",
    progress: bool = False,
    log: Log = print,
) -> None:
    """Certify a finished run with every bound, keeping results already computed.

    Args:
        folder: a finished run folder.
        bounds: bound names; each writes ``certify_<bound>.json`` and its radii.
        limit: certify a stratified subset of this many test inputs (None: all).
        device: where to compute.
        progress: progress bars.
        log: where to report.
    """
    for bound in bounds:
        target = certify_path(folder, bound)
        if _has_certificate(folder, bound, limit):
            continue
        log(f"{Path(folder).name}: certifying with {bound}" + (f" (n={limit})" if limit else ""))
        settings, data = run_settings(folder, bound, pgd_steps=0), DataSelection(limit=limit)
        result = certify_run(folder, settings=settings, data=data, device=device, progress=progress)
        text = json.dumps({**result.metrics, "limit": limit}, indent=2) + "\n"
        atomic_write(target, lambda stream, text=text: stream.write(text.encode()))


def point_spec(
    config: TrainConfig,
    folder: Path,
    point: dict[str, Any],
    bounds: Sequence[str],
    limit: int | None,
) -> str:
    """The JSON that tells :func:`run_point` (in a job of its own) what to do."""
    record = {"config": config.to_dict(), "folder": str(folder), "point": point}
    return json.dumps({**record, "bounds": list(bounds), "certify_limit": limit})


def run_point(spec: str, log: Log = print) -> None:
    """Train, resume or skip one point and certify it, as :func:`sweep` does in its loop."""
    values = json.loads(spec)
    config = config_from_dict(values["config"])
    folder = Path(values["folder"])
    _train_point(config, folder, values["point"], False, log)
    certify_finished(folder, values["bounds"], values["certify_limit"], config.device, False, log)


_Open = tuple[TrainConfig, dict[str, Any], Path, str]


def _open_points(
    configs: Sequence[TrainConfig],
    points: Sequence[dict[str, Any]],
    folders: Sequence[Path],
    bounds: Sequence[str],
    limit: int | None,
    log: Log,
) -> list[_Open]:
    """The points still to train or certify, with their folder's state."""
    todo = []
    for number, (config, point, folder) in enumerate(zip(configs, points, folders, strict=True)):
        state = run_state(folder)
        if state == "finished" and all(_has_certificate(folder, b, limit) for b in bounds):
            log(f"[{number + 1}/{len(points)}] {folder.name}: finished, skipped")
        else:
            todo.append((config, point, folder, state))
    return todo


def _run_as_jobs(
    study: Path,
    todo: list[_Open],
    bounds: Sequence[str],
    limit: int | None,
    jobs: int | None,
    starter: Launcher,
    options: Mapping[str, Any],
    log: Log,
) -> None:
    """Run the open points as jobs, at most ``jobs`` at once; one line if any failed."""
    if not todo:
        return
    slots = len(todo) if jobs is None and starter.kind == "slurm" else min(jobs or 1, len(todo))
    together = slots > 1 or starter.kind == "slurm"  # jobs side by side; a cluster node is shared
    work = []
    for config, point, folder, state in todo:
        threads = config.threads or (
            options.get("cpus_per_task") if starter.kind == "slurm" else thread_share(slots)
        )
        config = dataclasses.replace(config, threads=threads)
        make_folder(folder, "--study")
        spec = point_spec(config, folder, point, bounds, limit)
        environment = job_environment(threads, beside_others=together)
        job = Job(folder.name, point_command(spec), environment, folder / "sweep.log")
        work.append(job)
        doing = {"new": "training", "interrupted": "resuming"}.get(state, "certifying")
        cores = f"--threads {threads}" if threads else "PyTorch's default threads"
        log(f"{folder.name}: {doing} in a {starter.kind} job ({cores})")
    log(f"{len(work)} points, {slots} at once; each point's output: RUN/sweep.log")
    failures, unstarted = run_jobs(starter, work, slots, log, lambda _: write_study_table(study))
    if failures:
        job, reason = failures[0]
        left = f"; {len(unstarted)} not started" if unstarted else ""
        raise AcertError(
            f"{len(failures)} of {len(work)} sweep points failed{left}; {job.name}: {reason} "
            f"(log: {job.log}); fix it and run the same acert sweep to continue"
        )


def _check_certify_limit(limit: int | None, configs: Sequence[TrainConfig]) -> None:
    """A stratified subset needs an input of every class."""
    classes = max(dataset_info(config.dataset).num_classes for config in configs)
    if limit is not None and limit < classes:
        raise ConfigError(
            f"--certify-limit {limit} cannot cover the {classes} classes; use at least {classes}"
        )


def sweep(
    base_config: TrainConfig,
    grid: dict[str, Sequence[Any]],
    study_dir: str | Path,
    bounds: Sequence[str] = ("ibp", "crown"),
    certify_limit: int | None = None,
    progress: bool = False,
    log: Log = print,
    jobs: int | None = 1,
    launcher: str = "processes",
    launcher_options: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Train every point of a grid into a study folder, certify the runs and tabulate the study.

    Args:
        base_config: settings shared by every point (``None`` fields take the dataset presets).
        grid: config key -> values; the points are the product. ``method`` may be swept too.
        study_dir: the study folder; several sweeps (e.g. one per method) may share it.
        bounds: bounds every finished run of the study is certified with.
        certify_limit: certify a stratified subset of this many test inputs per bound.
        progress: progress bars.
        log: where progress lines and epoch summaries go.
        jobs: points run at once (None: one for ``processes`` and ``local``, all for
            ``slurm``); with one ``processes`` job the points train in this process.
        launcher: ``processes``, ``local`` (submitit's LocalExecutor) or ``slurm``.
        launcher_options: submitit parameters (``timeout_min``, ``partition``, ...).

    Returns:
        The run folders of the grid's points, in grid order.

    Raises:
        ConfigError: a bad grid, bound or value (before anything trains), or a finished run
            of the study trained with other settings.
    """
    bounds = parse_bounds(bounds)
    points = grid_points(base_config, grid)
    configs = [_point_config(base_config, point) for point in points]
    _check_certify_limit(certify_limit, configs)
    if jobs is not None and jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    study = Path(study_dir)
    folders = [study / run_name(c.method, p) for c, p in zip(configs, points, strict=True)]
    inline = launcher == "processes" and jobs in (None, 1) and not launcher_options
    starter = (
        None if inline else make_launcher(launcher, study / "submitit", launcher_options or {})
    )
    for config, folder in zip(configs, folders, strict=True):
        if run_state(folder) != "new":
            _check_same_settings(folder, config)
    make_folder(study, "--study")
    if starter is None:
        for number, (config, point, folder) in enumerate(
            zip(configs, points, folders, strict=True)
        ):
            log(f"[{number + 1}/{len(points)}] {folder.name}")
            _train_point(config, folder, point, progress, log)
            certify_finished(folder, bounds, certify_limit, config.device, progress, log)
            write_study_table(study)
    else:
        todo = _open_points(configs, points, folders, bounds, certify_limit, log)
        _run_as_jobs(study, todo, bounds, certify_limit, jobs, starter, launcher_options or {}, log)
    for folder in find_runs(study):
        if run_state(folder) == "finished":
            certify_finished(folder, bounds, certify_limit, base_config.device, progress, log)
    csv_path, md_path = write_study_table(study)
    log(f"study table: {md_path} and {csv_path.name} ({len(study_table(study))} finished runs)")
    return folders
