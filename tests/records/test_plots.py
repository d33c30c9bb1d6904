"""Figures of a study: Pareto front by hand, curves from radii, PNGs from a hand-made study."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from acert.cli import main
from acert.config import TrainConfig
from acert.foundation.errors import AcertError
from acert.records.plots import (
    certified_accuracy_curve,
    knob_label,
    pareto_front,
    plot_certified_accuracy,
    plot_study,
    plot_tradeoff,
)
from acert.records.study import study_table

PNG = b"\x89PNG"


@pytest.mark.parametrize(
    ("points", "front"),
    [
        ([], []),
        ([(0.5, 0.5)], [0]),
        ([(0.9, 0.1), (0.5, 0.5), (0.1, 0.9)], [2, 1, 0]),
        ([(0.9, 0.1), (0.4, 0.4), (0.5, 0.5)], [2, 0]),  # (0.4, 0.4) is beaten by (0.5, 0.5)
        ([(0.5, 0.5), (0.5, 0.4), (0.4, 0.5)], [0]),  # equal in one coordinate still dominates
        ([(0.5, 0.5), (0.5, 0.5)], [0, 1]),  # equal points both stay
        ([(0.2, 0.3), (float("nan"), 0.9), (0.1, 0.1)], [0]),  # NaN ignored
    ],
)
def test_pareto_front_by_hand(points, front):
    assert pareto_front(points) == front


def test_certified_accuracy_curve_counts_radii_at_least_eps():
    radii = torch.tensor([0.0, 0.0, 0.1, 0.2, 0.4])
    eps = torch.tensor([0.0, 0.05, 0.1, 0.2, 0.3, 0.4])
    curve = certified_accuracy_curve(radii, eps)
    assert curve.tolist() == pytest.approx([60.0, 60.0, 60.0, 40.0, 20.0, 20.0])


def test_knob_label_uses_symbols():
    assert knob_label("kappa=0.25, eps_train=0.1") == "κ=0.25, ε_train=0.1"
    assert knob_label("") == ""
    assert knob_label("lr=0.001") == "lr=0.001"


def _metrics(clean: float, acr: float, n: int, bound: str) -> dict:
    return {
        "n": n,
        "bound": bound,
        "eps_max": 0.4,
        "clean_accuracy": clean,
        "acr": acr,
        "acr_percent_of_eps_max": 100 * acr / 0.4,
        "acceps": (acr / 0.4 * clean) ** 0.5,
        "certified_accuracy": {"0.1": clean / 2, "0.3": clean / 4},
        "pgd_accuracy": {"0.1": clean / 1.5, "0.3": clean / 3} if bound == "ibp" else {},
        "radius_evaluations_per_sample": 3.0,
    }


def make_run(study: Path, method: str, point: dict, clean: float, acr: float) -> Path:
    """A finished run folder written by hand: config, metrics, radii, CROWN certificate."""
    run = study / "-".join([method, *(f"{k}{v}" for k, v in point.items())])
    run.mkdir(parents=True)
    config = TrainConfig(method=method, eps_max=0.4, cert_eps=[0.1, 0.3], **point).to_dict()
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "sweep.json").write_text(json.dumps({"method": method, "point": point}))
    test = {**_metrics(clean, acr, 100, "ibp"), "train_seconds": 12.0}
    (run / "test_metrics.json").write_text(json.dumps(test))
    n_certified = round(100 * clean)
    radii = torch.zeros(100)
    radii[:n_certified] = torch.linspace(0.0, 2 * acr, n_certified).clamp(max=0.4)
    torch.save(radii, run / "radii.pt")
    (run / "certify_crown.json").write_text(json.dumps(_metrics(clean, 1.2 * acr, 50, "crown")))
    torch.save(1.2 * radii[::2], run / "certify_crown.radii.pt")
    return run


@pytest.fixture
def study(tmp_path) -> Path:
    folder = tmp_path / "study"
    for kappa, clean, acr in ((0.0, 0.80, 0.12), (0.25, 0.88, 0.10), (0.5, 0.93, 0.05)):
        make_run(folder, "acert", {"kappa": kappa}, clean, acr)
    for eps_train, clean, acr in ((0.2, 0.90, 0.04), (0.4, 0.78, 0.11)):
        make_run(folder, "ibp", {"eps_train": eps_train}, clean, acr)
    make_run(folder, "standard", {}, 0.97, 0.001)
    return folder


def test_study_table_reads_the_hand_made_runs(study):
    rows = study_table(study)
    assert [row["run"] for row in rows] == [
        "acert-kappa0.0",
        "acert-kappa0.25",
        "acert-kappa0.5",
        "ibp-eps_train0.2",
        "ibp-eps_train0.4",
        "standard",
    ]
    assert rows[1]["kappa"] == 0.25 and rows[1]["point"] == "kappa=0.25"
    assert rows[1]["crown_n"] == 50 and rows[1]["crown_acr"] == pytest.approx(0.12)


def test_tradeoff_marks_the_pareto_front(study, tmp_path):
    rows = study_table(study)
    result = plot_tradeoff(rows, tmp_path / "tradeoff.png")
    assert result.path.read_bytes()[:4] == PNG and result.path.stat().st_size > 10_000
    on_front = {rows[i]["run"] for i in result.front}
    # ibp eps_train 0.2 (90%, 10%) is beaten by acert kappa 0.5 (93%, 12.5%), ibp eps_train 0.4
    # (78%, 27.5%) by acert kappa 0 (80%, 30%)
    assert on_front == {
        "acert-kappa0.0",
        "acert-kappa0.25",
        "acert-kappa0.5",
        "standard",
    }
    points = [(100 * r["clean_acc"], r["acr_pct"]) for r in rows]
    assert result.front == pareto_front(points)


def test_tradeoff_under_crown_and_a_missing_bound(study, tmp_path):
    rows = study_table(study)
    result = plot_tradeoff(rows, tmp_path / "crown.png", bound="crown")
    assert result.path.read_bytes()[:4] == PNG
    with pytest.raises(AcertError, match="no run has crown-ibp metrics"):
        plot_tradeoff(rows, tmp_path / "none.png", bound="crown-ibp")


def test_certified_accuracy_plot_is_a_png(tmp_path):
    curves = {"a": torch.rand(50) * 0.4, "b": torch.rand(80) * 0.2}
    path = plot_certified_accuracy(curves, 0.4, tmp_path / "cert.png", marks=[0.1, 0.3])
    assert path.read_bytes()[:4] == PNG and path.stat().st_size > 5_000


def test_plot_study_writes_every_figure(study, tmp_path):
    paths = plot_study(study, out=tmp_path / "figures")
    names = sorted(path.name for path in paths)
    assert names == sorted(
        [
            "tradeoff.png",
            "certified_accuracy.png",
            "radius_histogram_acert-kappa0.0.png",  # best acceps of acert: sqrt(0.3 * 0.8)
            "radius_histogram_ibp-eps_train0.4.png",
            "radius_histogram_standard.png",
        ]
    )
    for path in paths:
        assert path.read_bytes()[:4] == PNG and path.stat().st_size > 5_000


def test_plot_command_writes_the_files_and_takes_runs(study, capsys):
    assert main(["plot", str(study), "--bound", "crown", "--runs", "acert-kappa0.0"]) == 0
    folder = study / "plots-crown"
    assert {p.name for p in folder.iterdir()} == {
        "tradeoff.png",
        "certified_accuracy.png",
        "radius_histogram_acert-kappa0.0.png",
    }
    assert "written:" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("empty", "no run folders in"),
        ("missing", "does not exist"),
        ("unfinished", "no finished runs in"),
    ],
)
def test_plot_command_without_runs_is_one_line_with_exit_status_2(setup, message, tmp_path, capsys):
    folder = tmp_path / "study"
    if setup != "missing":
        folder.mkdir()
    if setup == "unfinished":
        (folder / "run").mkdir()
        (folder / "run" / "config.yaml").write_text(yaml.safe_dump(TrainConfig().to_dict()))
    assert main(["plot", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("acert: error: ") and message in err and err.count("\n") == 1


def test_plot_command_rejects_an_unknown_run(study, capsys):
    assert main(["plot", str(study), "--runs", "nope"]) == 2
    assert "run 'nope' is not a finished run of the study" in capsys.readouterr().err


def test_plots_import_nothing_from_training():
    code = (
        "import sys, acert.records.plots; "
        "print(sorted(m for m in sys.modules if m.startswith('acert')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    for module in (
        "acert.workflows.train.run",
        "acert.methods",
        "acert.workflows.sweep.run",
        "acert.bounds",
    ):
        assert f"'{module}'" not in done.stdout
