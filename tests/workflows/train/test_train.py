"""The training loop and run folders on short runs on real digits (mnist5k)."""

import json

import pytest
import torch

import acert.methods.standard as standard_module
from acert.config import TrainConfig
from acert.foundation.errors import CheckpointError
from acert.records.runs import RunDir, load
from acert.workflows.train.run import TrainingDivergedError, run
from tests.kit import tiny_run


def tiny_config(**overrides) -> TrainConfig:
    return tiny_run(**overrides)


def quiet(_line: str) -> None:
    pass


@pytest.mark.train
def test_run_writes_the_run_folder(tmp_path):
    result = run(tiny_config(), out=tmp_path / "run", progress=False, log=quiet)
    folder = RunDir(tmp_path / "run")
    for path in (
        folder.config_path,
        folder.metrics_path,
        folder.test_metrics_path,
        folder.radii_path,
        folder.histogram_path,
        folder.checkpoint_path("last"),
    ):
        assert path.is_file() and path.stat().st_size > 0, path
    rows = folder.metrics_path.read_text().strip().splitlines()
    assert len(rows) == 1 + 3 and rows[0].startswith("epoch,step,lr")
    rates = [float(row.split(",")[2]) for row in rows[1:]]
    assert all(0 < rate <= 2e-3 for rate in rates)  # the rates actually used, OneCycle to 2e-3
    metrics = json.loads(folder.test_metrics_path.read_text())
    assert metrics["n"] == 100 and set(metrics["certified_accuracy"]) == {"0.1"}
    assert 0 <= metrics["acr"] <= 0.4 and metrics["clean_accuracy"] > 0.2
    model = load(folder.path)
    assert not model.training
    radii = torch.load(folder.radii_path)
    assert radii.shape == (100,) and metrics["acr"] == pytest.approx(radii.mean().item(), rel=1e-5)
    assert result.best_epoch in (2, 3)  # selection only once the ramp (1 + 1 epochs) is over
    assert folder.histogram_path.read_bytes()[:4] == b"\x89PNG"


class InterruptError(Exception):
    pass


@pytest.mark.train
def test_interrupted_run_resumes_to_the_same_result(tmp_path):
    straight = run(tiny_config(), out=tmp_path / "straight", progress=False, log=quiet)

    def stop_after_second_epoch(line: str) -> None:
        if line.startswith("epoch 2/3"):
            raise InterruptError

    with pytest.raises(InterruptError):
        run(tiny_config(), out=tmp_path / "resumed", progress=False, log=stop_after_second_epoch)
    interrupted = RunDir(tmp_path / "resumed").load_checkpoint("last")
    assert interrupted["epoch"] == 2
    with pytest.raises(CheckpointError, match="pass --resume"):
        run(tiny_config(), out=tmp_path / "resumed", progress=False, log=quiet)
    with pytest.raises(CheckpointError, match="different config"):
        run(
            tiny_config(kappa=0.5), out=tmp_path / "resumed", resume=True, progress=False, log=quiet
        )
    folder = RunDir(tmp_path / "resumed")
    killed_writes = [  # what a SIGKILL during atomic_write leaves: its temporary files
        folder.path / "checkpoints" / ".last.pt.k1ll3d.tmp",
        folder.path / ".metrics.csv.k1ll3d.tmp",
    ]
    for leftover in killed_writes:
        leftover.write_bytes(b"half a file")
    resumed = run(tiny_config(), out=tmp_path / "resumed", resume=True, progress=False, log=quiet)
    assert not [path for path in killed_writes if path.exists()]
    assert len(resumed.history) == 3
    for key in ("loss", "train_acc", "val_acc", "val_acr"):
        assert resumed.history[-1][key] == pytest.approx(
            straight.history[-1][key], rel=1e-5, abs=1e-7
        )
    for a, b in zip(
        straight.model.state_dict().values(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)
    assert resumed.test.acr == pytest.approx(straight.test.acr, rel=1e-5)
    # the run's time counts the epochs of both sessions, not only the resumed one
    seconds = json.loads(RunDir(tmp_path / "resumed").test_metrics_path.read_text())
    two_epochs = sum(row["epoch_seconds"] for row in interrupted["history"])
    assert interrupted["seconds"] >= two_epochs
    assert seconds["train_seconds"] >= interrupted["seconds"] + resumed.history[-1]["epoch_seconds"]


@pytest.mark.train
def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    original = standard_module.Standard.loss
    calls = {"n": 0}

    def poisoned(self, model, batch, step):
        calls["n"] += 1
        terms = original(self, model, batch, step)
        if calls["n"] > 7:  # after the first epoch (6 steps) is checkpointed
            terms.loss = terms.loss * float("nan")
        return terms

    monkeypatch.setattr(standard_module.Standard, "loss", poisoned)
    with pytest.raises(TrainingDivergedError, match="the loss became nan at epoch 2") as err:
        run(tiny_config(method="standard"), out=tmp_path / "run", progress=False, log=quiet)
    assert "\n" not in str(err.value)
    assert "last.pt keeps the last good epoch" in str(err.value)
    assert RunDir(tmp_path / "run").load_checkpoint("last")["epoch"] == 1


def test_a_run_killed_in_its_first_epoch_restarts_when_the_resume_is_reissued(
    tmp_path, monkeypatch
):
    """A requeued cluster job re-issues its ``--resume`` command: a run stopped before its first
    checkpoint (config.yaml written, no last.pt) starts from the beginning, with a note."""
    original = standard_module.Standard.loss

    def killed(self, model, batch, step):
        raise InterruptError

    config = tiny_config(method="standard", epochs=1, val_size=0, eval_limit=20)
    monkeypatch.setattr(standard_module.Standard, "loss", killed)
    with pytest.raises(InterruptError):
        run(config, out=tmp_path / "run", progress=False, log=quiet)
    folder = RunDir(tmp_path / "run")
    assert folder.config_path.is_file() and not folder.has_checkpoint("last")
    monkeypatch.setattr(standard_module.Standard, "loss", original)
    with pytest.raises(CheckpointError, match="different config"):
        run(tiny_config(method="standard", epochs=2), out=folder.path, resume=True, log=quiet)
    lines: list[str] = []
    result = run(config, out=folder.path, resume=True, progress=False, log=lines.append)
    assert any("no checkpoint yet" in line and "from the beginning" in line for line in lines)
    assert len(result.history) == 1 and folder.load_checkpoint("last")["epoch"] == 1
    with pytest.raises(CheckpointError, match="nothing to resume"):
        run(config, out=tmp_path / "empty", resume=True, progress=False, log=quiet)
