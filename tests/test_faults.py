"""Runs survive faults: a SIGKILL mid-epoch resumes to the same result; bad input leaves nothing."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from acert.records.runs import RunDir

TRAIN = [
    sys.executable,
    "-m",
    "acert",
    "train",
    "--model",
    "mlp-small",
    "--train-limit",
    "600",
    "--val-size",
    "60",
    "--epochs",
    "4",
    "--reg-epochs",
    "1",
    "--batch-size",
    "20",
    "--eval-limit",
    "100",
    "--cert-eps",
    "0.1",
    "--eval-pgd-steps",
    "2",
    "--threads",
    "1",
    "--quiet",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def completed_epochs(folder) -> int:
    metrics = folder / "metrics.csv"
    return max(0, len(metrics.read_text().splitlines()) - 1) if metrics.is_file() else 0


@pytest.mark.slow
@pytest.mark.train
def test_sigkill_mid_epoch_then_resume_ends_like_an_uninterrupted_run(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run([*TRAIN, "--out", str(straight)], env=ENV, check=True, capture_output=True)

    process = subprocess.Popen([*TRAIN, "--out", str(killed)], env=ENV, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while completed_epochs(killed) < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # well into the second epoch
    process.send_signal(signal.SIGKILL)
    process.wait()
    run = RunDir(killed)
    assert 1 <= run.load_checkpoint("last")["epoch"] < 4
    assert not run.test_metrics_path.exists()
    # A kill during a write may leave that write's temporary file, never a half-written
    # checkpoint under its real name: last.pt loaded above; best.pt, once there, loads too.
    if run.has_checkpoint("best"):
        run.load_checkpoint("best")

    again = subprocess.run([*TRAIN, "--out", str(killed)], env=ENV, capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr
    subprocess.run(
        [*TRAIN, "--out", str(killed), "--resume"], env=ENV, check=True, capture_output=True
    )
    assert not list(killed.rglob("*.tmp")), "the resume left a killed write's temporary file"
    expected = json.loads((straight / "test_metrics.json").read_text())
    resumed = json.loads(run.test_metrics_path.read_text())
    for key in ("clean_accuracy", "acr", "acceps"):
        assert resumed[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key
    assert resumed["certified_accuracy"] == expected["certified_accuracy"]
    assert completed_epochs(killed) == 4


@pytest.mark.train
def test_missing_dataset_files_leave_no_run_folder(tmp_path, capsys):
    from acert.cli import main

    out = tmp_path / "run"
    assert (
        main(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--out", str(out)]) == 2
    )
    err = capsys.readouterr().err
    assert "data_batch_1" in err and "acert download cifar10" in err and err.count("\n") == 1
    assert not out.exists()
