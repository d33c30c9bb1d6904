"""The study table: one row per finished run of a study folder (``acert sweep``, ``acert plot``).

A study folder holds one run folder per trained configuration; ``acert sweep`` adds a
``sweep.json`` to each, naming its method and grid point. The table reads only run files —
``config.yaml``, ``test_metrics.json``, ``certify_<bound>.json`` — and imports nothing from
training, so that figures can be drawn from it anywhere. Its columns:

- ``run``, ``method``, ``point`` (the grid point as text) and one column per swept config key;
- the training evaluation (``test_metrics.json``): ``n``, ``bound``, ``clean_acc``, ``acr``,
  ``acr_pct`` (ACR as % of ε_max), ``cert_acc_<eps>`` and ``pgd_acc_<eps>`` at the dataset's
  certification radii, ``acceps``, ``train_seconds``;
- per bound with a ``certify_<bound>.json``: ``<bound>_n``, ``<bound>_clean_acc``,
  ``<bound>_acr``, ``<bound>_acr_pct``, ``<bound>_acceps``, ``<bound>_cert_acc_<eps>``, and
  where it was certified with ``--attack``, ``<bound>_acr_attack`` and ``<bound>_acr_attack_pct``
  (the mean attack radius, an upper bound beside the ACR). A best-of certificate
  (``--bound best``) is a bound of its own, ``best``.

Accuracies are fractions in [0, 1]; the Markdown version shows them in percent.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from acert.foundation.errors import AcertError
from acert.records.runs import atomic_write

__all__ = [
    "SWEEP_FILE",
    "TABLE_CSV",
    "TABLE_MD",
    "bound_scores",
    "certifies_the_run",
    "certify_path",
    "find_runs",
    "markdown_table",
    "point_text",
    "read_json",
    "study_table",
    "value_text",
    "write_study_table",
]

SWEEP_FILE = "sweep.json"
TABLE_CSV = "study.csv"
TABLE_MD = "study.md"
BOUND_ORDER = ("ibp", "crown-ibp", "crown")
"""Bounds in the order their columns appear (others follow alphabetically)."""


def read_json(path: str | Path) -> dict[str, Any]:
    """The mapping in a JSON file, or a one-line AcertError naming the file."""
    path = Path(path)
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise AcertError(f"{path} is not readable JSON ({type(err).__name__}); delete it") from err
    if not isinstance(values, dict):
        raise AcertError(f"{path} does not hold a JSON mapping; delete it")
    return values


def certifies_the_run(metrics: dict[str, Any], config: dict[str, Any]) -> bool:
    """Whether ``certify_<bound>.json`` metrics are those of the run's own test set and cap (a
    certification on another dataset, split or ε_max is not the run's column of a study)."""
    return (
        metrics.get("split", "test") == "test"
        and metrics.get("dataset", config.get("dataset")) == config.get("dataset")
        and metrics.get("eps_max") == config.get("eps_max")
    )


def certify_path(run: str | Path, bound: str) -> Path:
    """Where ``acert certify --bound <bound>`` leaves its metrics in a run folder."""
    return Path(run) / f"certify_{bound}.json"


def find_runs(study_dir: str | Path) -> list[Path]:
    """The run folders (sub-folders holding a ``config.yaml``) of a study, sorted by name."""
    study = Path(study_dir)
    if study.exists() and not study.is_dir():
        raise AcertError(f"{study} is a file, not a study folder; pass the --study of acert sweep")
    if not study.is_dir():
        raise AcertError(f"study folder {study} does not exist; pass the --study of acert sweep")
    return sorted(p for p in study.iterdir() if (p / "config.yaml").is_file())


def point_text(point: dict[str, Any]) -> str:
    """``{"kappa": 0.25, "eps_train": 0.1}`` -> ``"kappa=0.25, eps_train=0.1"``."""
    return ", ".join(f"{key}={value_text(value)}" for key, value in point.items())


def value_text(value: Any) -> str:
    """A config value as written in run names and tables: ``0.25``, ``1e-05``, ``0.1_0.2``."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return "_".join(value_text(item) for item in value)
    return str(value)


def _bounds_of(run: Path) -> list[str]:
    names = [p.name[len("certify_") : -len(".json")] for p in run.glob("certify_*.json")]
    return [name for name in names if name]


def _ordered_bounds(names: Iterable[str]) -> list[str]:
    unique = set(names)
    known = [b for b in BOUND_ORDER if b in unique]
    return known + sorted(unique - set(BOUND_ORDER))


def _accuracies(prefix: str, values: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}_{eps}": acc for eps, acc in values.items()}


def _training_columns(test: dict[str, Any]) -> dict[str, Any]:
    return {
        "eps_max": test["eps_max"],
        "n": test["n"],
        "bound": test["bound"],
        "clean_acc": test["clean_accuracy"],
        "acr": test["acr"],
        "acr_pct": test["acr_percent_of_eps_max"],
        **_accuracies("cert_acc", test["certified_accuracy"]),
        **_accuracies("pgd_acc", test["pgd_accuracy"]),
        "acceps": test["acceps"],
        "train_seconds": test.get("train_seconds"),
    }


def _bound_columns(bound: str, metrics: dict[str, Any]) -> dict[str, Any]:
    attack = metrics.get("acr_attack")
    attack_columns = {}
    if attack is not None:
        attack_columns[f"{bound}_acr_attack"] = attack
        attack_columns[f"{bound}_acr_attack_pct"] = 100 * attack / metrics["eps_max"]
    return {
        f"{bound}_n": metrics["n"],
        f"{bound}_clean_acc": metrics["clean_accuracy"],
        f"{bound}_acr": metrics["acr"],
        f"{bound}_acr_pct": metrics["acr_percent_of_eps_max"],
        **attack_columns,
        f"{bound}_acceps": metrics["acceps"],
        **_accuracies(f"{bound}_cert_acc", metrics["certified_accuracy"]),
    }


def bound_scores(row: dict[str, Any], bound: str) -> dict[str, float] | None:
    """Clean accuracy, ACR % of ε_max, acceps and n of a row under a bound, or None.

    The training evaluation is used when it was made with ``bound`` (it covers the most
    test inputs), else the ``certify_<bound>`` columns.
    """
    prefix = "" if row.get("bound") == bound else f"{bound}_"
    if row.get(f"{prefix}acr_pct") is None:
        return None
    return {
        "clean": 100 * row[f"{prefix}clean_acc"],
        "acr_pct": row[f"{prefix}acr_pct"],
        "acceps": row[f"{prefix}acceps"],
        "n": row[f"{prefix}n"],
    }


def _run_row(run: Path, grid_keys: list[str]) -> dict[str, Any]:
    config = yaml.safe_load((run / "config.yaml").read_text()) or {}
    sweep = read_json(run / SWEEP_FILE) if (run / SWEEP_FILE).is_file() else {}
    test = read_json(run / "test_metrics.json")
    point = sweep.get("point", {})
    try:
        row: dict[str, Any] = {
            "run": run.name,
            "method": config.get("method"),
            "point": point_text(point),
            **{key: config.get(key) if key in point else None for key in grid_keys},
            "dataset": config.get("dataset"),
            **_training_columns(test),
        }
        for bound in _ordered_bounds(_bounds_of(run)):
            metrics = read_json(certify_path(run, bound))
            if certifies_the_run(metrics, config):
                row.update(_bound_columns(bound, metrics))
    except KeyError as err:
        raise AcertError(
            f"metrics of run {run} lack {err}; they were written by another version, re-run it"
        ) from err
    return row


def _grid_keys(runs: list[Path]) -> list[str]:
    keys: dict[str, None] = {}
    for run in runs:
        if (run / SWEEP_FILE).is_file():
            keys.update(dict.fromkeys(read_json(run / SWEEP_FILE).get("point", {})))
    return list(keys)


def _sort_key(row: dict[str, Any], grid_keys: list[str]) -> tuple:
    def sortable(value: Any) -> tuple:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return (0, float(value), "")
        return (1, 0.0, "" if value is None else str(value))

    return (str(row["method"]), *(sortable(row.get(key)) for key in grid_keys), row["run"])


def study_table(study_dir: str | Path) -> list[dict[str, Any]]:
    """One row per finished run (a run folder with ``test_metrics.json``) of a study folder.

    Rows are sorted by method, then by the swept values; see the module docstring for the
    columns. Unfinished runs are left out.

    Args:
        study_dir: the study folder.
    """
    runs = [run for run in find_runs(study_dir) if (run / "test_metrics.json").is_file()]
    grid_keys = [key for key in _grid_keys(runs) if key != "method"]
    rows = [_run_row(run, grid_keys) for run in runs]
    return sorted(rows, key=lambda row: _sort_key(row, grid_keys))


def table_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Every column of the rows, in order of first appearance."""
    return list(dict.fromkeys(key for row in rows for key in row))


def csv_text(rows: list[dict[str, Any]]) -> str:
    """The rows as CSV, one column per key of any row (blank where a row lacks it)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=table_columns(rows), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def eps_label(eps: str | float) -> str:
    """A radius for a column header: ``k/255`` when it is one below 0.1, else ``%g``."""
    value = float(eps)
    scaled = value * 255
    if value < 0.1 and abs(scaled - round(scaled)) < 1e-3 * max(scaled, 1):
        return f"{round(scaled)}/255"
    return f"{value:g}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _percent(value: Any) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def _number(fmt: str) -> Any:
    return lambda value: "" if value is None else format(value, fmt)


def _markdown_columns(rows: list[dict[str, Any]]) -> list[tuple[str, str, Any]]:
    """(header, column, formatter) of the Markdown table: training block, then bounds paired."""
    columns = table_columns(rows)
    swept = _swept(rows)
    spec: list[tuple[str, str, Any]] = [("run", "run", str), ("method", "method", str)]
    spec += [(key, key, value_text) for key in columns if key in swept]
    spec += [("clean %", "clean_acc", _percent), ("ACR", "acr", _number(".4g"))]
    spec.append(("ACR % ε_max", "acr_pct", _number(".1f")))
    for prefix, title in (("cert_acc_", "cert"), ("pgd_acc_", "PGD")):
        spec += [
            (f"{title} {eps_label(eps)} %", prefix + eps, _percent)
            for eps in _suffixes(columns, prefix)
        ]
    spec += [("acceps", "acceps", _number(".3f")), ("time", "train_seconds", _duration)]
    return spec + _bound_markdown_columns(columns)


def _suffixes(columns: list[str], prefix: str) -> list[str]:
    return [column[len(prefix) :] for column in columns if column.startswith(prefix)]


def _swept(rows: list[dict[str, Any]]) -> set[str]:
    """The config keys named in the rows' grid points."""
    keys: set[str] = set()
    for row in rows:
        keys.update(part.split("=", 1)[0] for part in str(row.get("point", "")).split(", "))
    return keys - {"method", ""}


def _bound_markdown_columns(columns: list[str]) -> list[tuple[str, str, Any]]:
    """n, ACR, attack ACR and certified accuracy per bound, the bounds side by side for each
    quantity; a quantity no run has under a bound gets no column."""
    bounds = _ordered_bounds(column[: -len("_n")] for column in columns if column.endswith("_n"))
    quantities = [("n", "n", str), ("ACR", "acr", _number(".4g"))]
    quantities.append(("ACR attack", "acr_attack", _number(".4g")))
    quantities += [
        (f"cert {eps_label(eps)} %", f"cert_acc_{eps}", _percent)
        for eps in _suffixes(columns, "cert_acc_")
    ]
    return [
        (f"{title} {bound.upper()}", f"{bound}_{suffix}", formatter)
        for title, suffix, formatter in quantities
        for bound in bounds
        if f"{bound}_{suffix}" in columns
    ]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table: accuracies in %, radii in pixel units, bounds side by side."""
    if not rows:
        return "(no finished runs)\n"
    spec = _markdown_columns(rows)
    lines = [
        "| " + " | ".join(header for header, _, _ in spec) + " |",
        "|" + "|".join("---" for _ in spec) + "|",
    ]
    for row in rows:
        cells = [fmt(row[column]) if row.get(column) is not None else "" for _, column, fmt in spec]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_study_table(study_dir: str | Path) -> tuple[Path, Path]:
    """Write ``study.csv`` and ``study.md`` over all finished runs of a study folder.

    Args:
        study_dir: the study folder.

    Returns:
        The paths of the CSV and the Markdown file.
    """
    study = Path(study_dir)
    rows = study_table(study)
    datasets = sorted({str(row["dataset"]) for row in rows})
    heading = f"# Study {study.name}: {', '.join(datasets) or 'no finished runs'}\n\n"
    note = (
        "\nAccuracies in %, ACR in pixel units. The first block is the training evaluation "
        "(bound in `test_metrics.json`); the bound columns come from `certify_<bound>.json`, "
        "on n test inputs each; ACR attack is the mean radius at which PGD flips the "
        "prediction (`acert certify --attack`), an upper bound beside the certified ACR.\n"
    )
    paths = (study / TABLE_CSV, study / TABLE_MD)
    for path, text in zip(
        paths, (csv_text(rows), heading + markdown_table(rows) + note), strict=True
    ):
        atomic_write(path, lambda stream, text=text: stream.write(text.encode()))
    return paths
