import pytest
import torch

from acert.config import TrainConfig, resolve
from acert.foundation.errors import CheckpointError
from acert.records.runs import (
    CHECKPOINT_FORMAT,
    RunDir,
    atomic_write,
    build_model,
    load,
    read_checkpoint,
)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "file.bin"
    atomic_write(target, lambda stream: stream.write(b"old"))

    def fail(stream):
        stream.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, fail)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]  # no temporary left behind


def test_atomic_write_gives_files_the_permissions_of_an_ordinary_write(tmp_path):
    """The temporary file is private (0600); the file in place follows the umask, as
    ``open(path, "w")`` would, so that other processes or users of a shared run folder read it."""
    ordinary = tmp_path / "ordinary"
    ordinary.write_bytes(b"x")
    atomic_write(tmp_path / "atomic", lambda stream: stream.write(b"x"))
    assert (tmp_path / "atomic").stat().st_mode == ordinary.stat().st_mode


def test_checkpoint_round_trip_and_load(tmp_path):
    config = resolve(TrainConfig(epochs=1))
    model = build_model(config)
    run = RunDir(tmp_path / "run").create()
    run.save_config(config)
    run.save_checkpoint("last", {"config": config.to_dict(), "model": model.state_dict()})
    assert read_checkpoint(run.checkpoint_path("last"))["format"] == CHECKPOINT_FORMAT
    loaded = load(run.path)  # no best.pt: falls back to last
    assert not loaded.training
    x = torch.rand(3, 1, 28, 28)
    assert torch.allclose(loaded(x), model.eval()(x))
    assert run.load_config() == config


def test_bad_checkpoints_give_one_line_errors(tmp_path):
    cases = {}
    cases["missing"] = (tmp_path / "nope.pt", "does not exist")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage" * 10)
    cases["corrupt"] = (corrupt, "corrupt or not a torch file")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    cases["foreign"] = (foreign, "not an acert checkpoint")
    truncated = tmp_path / "truncated.pt"
    config = resolve(TrainConfig(epochs=1))
    RunDir(tmp_path).save_checkpoint(
        "full", {"config": config.to_dict(), "model": build_model(config).state_dict()}
    )
    truncated.write_bytes((tmp_path / "checkpoints" / "full.pt").read_bytes()[:500])
    cases["truncated"] = (truncated, "corrupt or not a torch file")
    for path, message in cases.values():
        with pytest.raises(CheckpointError, match=message) as err:
            load(path)
        assert "Weights only load failed" not in str(err.value)  # torch's preamble, not a cause
        assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="not a run folder"):
        RunDir(tmp_path / "empty").load_config()


def test_checkpoint_that_does_not_match_its_config(tmp_path):
    config = resolve(TrainConfig(epochs=1))
    other = build_model(resolve(TrainConfig(epochs=1, model="mlp-small")))
    RunDir(tmp_path).save_checkpoint(
        "last", {"config": config.to_dict(), "model": other.state_dict()}
    )
    with pytest.raises(CheckpointError, match="does not match its own config"):
        load(tmp_path / "checkpoints" / "last.pt")
