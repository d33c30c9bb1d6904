"""Sweeps on tiny real runs: one run per point, resumable, several methods per study, the table."""

import json
import shutil

import pytest

import acert.workflows.sweep.run as sweep_module
import acert.workflows.train.run
from acert.cli import main
from acert.config import TrainConfig
from acert.foundation.errors import ConfigError
from acert.records.study import study_table
from acert.workflows.sweep.run import parse_bounds, parse_grid, run_state, sweep
from tests.kit import SHORT_RUN, InterruptError, quiet, short_flags, tiny_run

TINY_FLAGS = short_flags()


def tiny(method: str = "acert", **overrides) -> TrainConfig:
    return tiny_run(SHORT_RUN, method=method, **overrides)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep") / "study"
    runs = sweep(tiny(), {"kappa": [0, 0.5]}, folder, certify_limit=30, log=quiet)
    return folder, runs


@pytest.fixture
def counted(monkeypatch):
    """Count the trainings and certifications a sweep starts (still running them)."""
    calls = {"train": [], "certify": []}
    train, certify = acert.workflows.train.run.run, sweep_module.certify_run

    def counting_train(config, **kwargs):
        calls["train"].append(kwargs.get("resume"))
        return train(config, **kwargs)

    def counting_certify(run, **kwargs):
        calls["certify"].append(kwargs["settings"].label)
        return certify(run, **kwargs)

    monkeypatch.setattr(acert.workflows.train.run, "run", counting_train)
    monkeypatch.setattr(sweep_module, "certify_run", counting_certify)
    return calls


@pytest.mark.train
def test_each_point_trains_into_its_own_run_and_the_table_has_both_bounds(study):
    folder, runs = study
    assert [run.name for run in runs] == ["acert-kappa0", "acert-kappa0.5"]
    for run in runs:
        assert run_state(run) == "finished"
        for name in ("sweep.json", "certify_ibp.json", "certify_crown.radii.pt", "radii.pt"):
            assert (run / name).is_file(), name
    assert json.loads((runs[1] / "sweep.json").read_text()) == {
        "method": "acert",
        "point": {"kappa": 0.5},
    }
    rows = study_table(folder)
    assert [(row["method"], row["kappa"]) for row in rows] == [("acert", 0.0), ("acert", 0.5)]
    for row in rows:
        assert row["n"] == 60 and row["ibp_n"] == 30 and row["crown_n"] == 30
        assert 0 <= row["ibp_acr"] <= 0.4 and 0 <= row["crown_acr"] <= 0.4
        assert {"cert_acc_0.2", "pgd_acc_0.2", "crown_cert_acc_0.2", "train_seconds"} <= set(row)
    csv_lines = (folder / "study.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and "ibp_acr" in csv_lines[0] and "crown_acr" in csv_lines[0]
    markdown = (folder / "study.md").read_text()
    assert "| ACR IBP | ACR CROWN |" in markdown and "acert-kappa0.5" in markdown


@pytest.mark.train
def test_a_second_sweep_trains_and_certifies_nothing(study, counted):
    folder, _ = study
    runs = sweep(tiny(), {"kappa": ["0", "0.50"]}, folder, certify_limit=30, log=quiet)
    assert [run.name for run in runs] == ["acert-kappa0", "acert-kappa0.5"]
    assert counted == {"train": [], "certify": []}


@pytest.mark.train
def test_a_finished_run_with_other_settings_is_an_error(study, counted):
    folder, _ = study
    with pytest.raises(ConfigError, match=r"trained with other settings \(epochs\)"):
        sweep(tiny(epochs=3), {"kappa": [0]}, folder, certify_limit=30, log=quiet)
    assert counted["train"] == []


@pytest.mark.train
def test_a_new_certify_limit_recertifies_without_training(study, tmp_path, counted):
    folder = shutil.copytree(study[0], tmp_path / "study")
    sweep(tiny(), {"kappa": [0.5]}, folder, bounds=["crown"], certify_limit=20, log=quiet)
    assert counted["train"] == [] and counted["certify"] == ["crown", "crown"]
    assert [row["crown_n"] for row in study_table(folder)] == [20, 20]


@pytest.mark.train
def test_a_certificate_of_another_dataset_or_cap_is_not_the_runs_column(study, tmp_path, counted):
    """An older certify_ibp.json made on other data is left out of the table and redone."""
    folder = shutil.copytree(study[0], tmp_path / "study")
    path = folder / "acert-kappa0.5" / "certify_ibp.json"
    own = json.loads(path.read_text())
    path.write_text(json.dumps({**own, "dataset": "fashion-mnist", "acr": 0.0001}))
    assert "ibp_acr" not in study_table(folder)[1]
    sweep(tiny(), {"kappa": [0.5]}, folder, bounds=["ibp"], certify_limit=30, log=quiet)
    assert counted["train"] == [] and counted["certify"] == ["ibp"]
    assert study_table(folder)[1]["ibp_acr"] == pytest.approx(own["acr"])


@pytest.mark.train
def test_an_interrupted_point_is_resumed_and_completed(tmp_path, counted):
    def stop_after_first_epoch(line: str) -> None:
        if line.startswith("epoch 1/2"):
            raise InterruptError

    folder = tmp_path / "study"
    with pytest.raises(InterruptError):
        sweep(tiny("standard"), {}, folder, bounds=["ibp"], log=stop_after_first_epoch)
    assert run_state(folder / "standard") == "interrupted"
    assert not (folder / "standard" / "certify_ibp.json").exists()
    sweep(tiny("standard"), {}, folder, bounds=["ibp"], log=quiet)
    assert counted["train"] == [False, True]
    assert run_state(folder / "standard") == "finished"
    metrics = json.loads((folder / "standard" / "test_metrics.json").read_text())
    assert metrics["epochs"] == 2
    assert [row["run"] for row in study_table(folder)] == ["standard"]


@pytest.mark.train
def test_a_second_method_adds_rows_to_the_study(study, tmp_path):
    folder = shutil.copytree(study[0], tmp_path / "study")
    runs = sweep(tiny("standard"), {}, folder, certify_limit=30, log=quiet)
    assert [run.name for run in runs] == ["standard"]
    rows = study_table(folder)
    assert [row["run"] for row in rows] == ["acert-kappa0", "acert-kappa0.5", "standard"]
    assert rows[2]["kappa"] is None and rows[2]["point"] == "" and rows[2]["crown_n"] == 30
    assert len((folder / "study.csv").read_text().splitlines()) == 4


@pytest.mark.train
@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ({"kapa": [0.1]}, "unknown grid key 'kapa'; did you mean 'kappa'?"),
        ({"colour": [1]}, "unknown grid key 'colour'"),
        ({"kappa": []}, "grid key 'kappa' has no values"),
        ({"kappa": ["abc"]}, "config key 'kappa' needs float"),
        ({"kappa": [0.1, 2]}, "kappa must lie in [0, 1], got 2.0"),
        ({"method": ["acert", "magic"]}, "unknown method 'magic'"),
        ({"out": ["x"]}, "grid key 'out' cannot be swept"),
    ],
)
def test_a_bad_grid_is_one_line_and_trains_nothing(grid, message, tmp_path, counted):
    with pytest.raises(ConfigError) as err:
        sweep(tiny(), grid, tmp_path / "study", log=quiet)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert counted["train"] == [] and not (tmp_path / "study").exists()


@pytest.mark.train
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bounds": "ibp,lp"}, "unknown bound 'lp'"),
        ({"certify_limit": 5}, "--certify-limit 5 cannot cover the 10 classes"),
    ],
)
def test_bad_certification_options_train_nothing(options, message, tmp_path, counted):
    with pytest.raises(ConfigError) as err:
        sweep(tiny(), {"kappa": [0]}, tmp_path / "study", log=quiet, **options)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert counted["train"] == [] and not (tmp_path / "study").exists()


def test_parse_grid_and_bounds():
    assert parse_grid(["kappa=0,0.25", "eps-train=0.1"]) == {"kappa": [0, 0.25], "eps_train": [0.1]}
    assert parse_grid(["kappa="]) == {"kappa": []}
    with pytest.raises(ConfigError, match="must look like key=v1,v2"):
        parse_grid(["kappa"])
    with pytest.raises(ConfigError, match="given twice"):
        parse_grid(["kappa=0", "kappa=1"])
    assert parse_bounds("IBP, crown") == ("ibp", "crown")
    with pytest.raises(ConfigError, match="unknown bound 'lp'"):
        parse_bounds("ibp,lp")


@pytest.mark.train
def test_sweep_and_plot_commands(tmp_path, capsys):
    folder = tmp_path / "study"
    argv = ["sweep", *TINY_FLAGS, "--method", "acert,standard", "--grid", "kappa=0.25"]
    argv += ["--study", str(folder), "--certify-limit", "30"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| acert-kappa0.25 | acert | 0.25 |" in printed and "ACR CROWN" in printed
    assert {row["run"] for row in study_table(folder)} == {"acert-kappa0.25", "standard-kappa0.25"}
    assert main(["plot", str(folder), "--out", str(tmp_path / "figures")]) == 0
    names = {path.name for path in (tmp_path / "figures").iterdir()}
    assert {"tradeoff.png", "certified_accuracy.png"} <= names and len(names) == 4


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sweep", "--grid", "kapa=1"], "unknown grid key 'kapa'"),
        (["sweep", "--grid", "kappa="], "grid key 'kappa' has no values"),
        (["sweep", "--set", "out=x"], "pass --study DIR, not --out"),
        (["sweep", "--bounds", ""], "give at least one bound"),
        (["sweep", "--bounds", "ibp,lp"], "unknown bound 'lp'"),
        (["sweep", "--method", "a,b", "--grid", "method=c"], "give the methods once"),
    ],
)
def test_sweep_command_errors_are_one_line_with_exit_status_2(argv, message, tmp_path, capsys):
    assert main([*argv, "--study", str(tmp_path / "study")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("acert: error: ") and message in err and err.count("\n") == 1
