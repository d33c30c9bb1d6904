"""--logger tensorboard: event files beside metrics.csv whose scalars are the epochs' metrics,
read back with TensorBoard's own reader; one line when the package is missing."""

import csv
import importlib.util

import pytest
import torch

from acert.cli import main
from acert.config import TrainConfig, config_from_dict, resolve
from acert.foundation.errors import ConfigError
from acert.records.loggers import TensorBoardLogger
from acert.workflows.train.run import run
from tests.kit import SHORT_RUN

TINY = {**SHORT_RUN, "eval_limit": 30, "eval_pgd_steps": 0, "cert_eps": [0.1, 0.3]}


class InterruptError(Exception):
    pass


def events(folder):
    accumulator_module = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator"
    )
    accumulator = accumulator_module.EventAccumulator(
        str(folder), size_guidance={"scalars": 0, "histograms": 0}
    )
    accumulator.Reload()
    return accumulator


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory):
    pytest.importorskip("tensorboard")
    out = tmp_path_factory.mktemp("tensorboard") / "run"
    run(TrainConfig(logger="tensorboard", **TINY), out=out, progress=False, log=lambda _: None)
    return out


@pytest.mark.train
def test_the_event_files_hold_each_epochs_metrics(tensorboard_run):
    board = events(tensorboard_run / "tensorboard")
    with open(tensorboard_run / "metrics.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 2
    tags = set(board.Tags()["scalars"])
    expected = {
        "loss/train": "loss",
        "loss/loss_rob": "loss_rob",
        "accuracy/train_clean": "train_acc",
        "accuracy/val_clean": "val_acc",
        "eps/train": "eps",
        "radius/train_mean": "radius",
        "radius/val_acr": "val_acr",
        "score/val_acceps": "val_acceps",
        "lr": "lr",
    }
    assert set(expected) <= tags
    for tag, column in expected.items():  # the method's terms from the epoch they start at
        logged = [(row["epoch"], float(row[column])) for row in rows if row[column] != ""]
        points = [(str(point.step), point.value) for point in board.Scalars(tag)]
        assert [step for step, _ in points] == [epoch for epoch, _ in logged] != [], tag
        for (_, value), (_, number) in zip(points, logged, strict=True):
            assert value == pytest.approx(number, rel=1e-6, abs=1e-9), tag
    for eps in ("0.1", "0.3"):
        shares = [point.value for point in board.Scalars(f"accuracy/val_certified_{eps}")]
        assert len(shares) == 2 and all(0 <= share <= 1 for share in shares)
    for tag in ("radius/val_median", "radius/val_at_cap", "radius/val_zero"):
        assert [point.step for point in board.Scalars(tag)] == [1, 2]
    histograms = board.Histograms("radius/val")
    assert [item.step for item in histograms] == [1, 2]
    assert all(item.histogram_value.num == 40 for item in histograms)  # every validation sample
    acr = [float(row["val_acr"]) for row in rows]
    for item, mean in zip(histograms, acr, strict=True):
        value = item.histogram_value
        assert value.sum / value.num == pytest.approx(mean, rel=1e-5, abs=1e-7)


@pytest.mark.train
def test_a_resumed_run_logs_the_epochs_it_trains(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"

    def stop_after_first_epoch(line: str) -> None:
        if line.startswith("epoch 1/2"):
            raise InterruptError

    config = TrainConfig(logger="tensorboard", **TINY)
    with pytest.raises(InterruptError):
        run(config, out=out, progress=False, log=stop_after_first_epoch)
    run(config, out=out, resume=True, progress=False, log=lambda _: None)
    steps = [point.step for point in events(out / "tensorboard").Scalars("loss/train")]
    assert sorted(steps) == [1, 2]


@pytest.mark.train
def test_the_csv_logger_writes_no_event_files(tmp_path):
    out = tmp_path / "run"
    run(TrainConfig(**{**TINY, "epochs": 1}), out=out, progress=False, log=lambda _: None)
    assert (out / "metrics.csv").is_file() and not (out / "tensorboard").exists()


@pytest.mark.train
def test_without_the_package_tensorboard_is_one_line_and_trains_nothing(
    tmp_path, monkeypatch, capsys
):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tensorboard" else real(name, *a),
    )
    out = tmp_path / "run"
    argv = ["train", "--logger", "tensorboard", "--out", str(out), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("acert: error: --logger tensorboard needs the tensorboard package")
    assert "pip install" in err and "\n" not in err
    assert not out.exists()


def test_an_unknown_logger_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown logger 'wandb'; choose one of csv, tensorboard"):
        resolve(config_from_dict({"logger": "wandb"}))


def test_the_radius_statistics_of_an_epoch(tmp_path):
    pytest.importorskip("tensorboard")
    logger = TensorBoardLogger(tmp_path, eps_max=0.4, cert_eps=[0.1, 0.3])
    radii = torch.tensor([0.0, 0.05, 0.1, 0.2, 0.4])
    values = logger.scalars({"epoch": 3, "loss": 1.5, "loss_rob": 2.0, "adv_acc": 0.5}, radii)
    logger.close()
    assert values == pytest.approx(
        {
            "loss/train": 1.5,
            "loss/loss_rob": 2.0,
            "metrics/adv_acc": 0.5,
            "accuracy/val_certified_0.1": 3 / 5,
            "accuracy/val_certified_0.3": 1 / 5,
            "radius/val_median": 0.1,
            "radius/val_at_cap": 1 / 5,
            "radius/val_zero": 1 / 5,
        }
    )
