"""Training on two processes (torchrun, gloo, CPU) reproduces training on one.

The two-process runs start as a user starts them, ``python -m torch.distributed.run
--nproc_per_node 2 -m acert train``; the one-process run is ``acert.workflows.train.run.run`` in
this process. Run as a script under torchrun, this file is also the worker of the batch-norm and
warm-up step tests and the ``acert train`` of the other ranks' processes that may not write into
the run folder.

The runs compared end to end train without the warm-up regularisers (``lambda_tight`` and
``lambda_relu`` 0), as with them training does not depend continuously on rounding. Their
tightness term relu(τ - T0/T) (docs/METHOD.md (M12)) is taken in the warm-up on IBP intervals of
radius 1e-6; a unit whose interval straddles 0 passes on a half-width u/2 that moves with its
centre, and divided by mean half-widths T of 1e-5 to 1e-4 that one unit's gradient outweighs all
the rest (first-layer weights: 36 against 0.13). Whether a unit straddles 0 is decided by
rounding: with the regularisers on, the config below reaches its 10th step with one unit's lower
bound at -9.2e-7 on one process, +3.3e-7 on two and -2.1e-7 on one process with 2 threads
(weights still 1e-7 apart), so one and two processes take different steps there (gradient norms
18 and 5, clipped at 10) and their first epoch's losses end 1e-3 apart. That is the objective's
sensitivity, not a difference between one and two processes; the regularisers' global means and
their gradients are checked on one step from the same weights instead, to rounding
(``test_a_warm_up_step_on_two_processes_is_one_step_on_one``).

Tolerances, with what was observed on 2 CPU cores in parentheses. Between one process on 1
and on 2 threads (another summation order) weights differ by up to 1e-6 and train-mode outputs
by 4e-6: the noise floor, which two processes reach too:

- epoch metrics: losses rel 1e-4 (8e-7); mean training radius rel 1e-3 (2e-6; the training
  search stops at rtol 1e-4); shares of samples abs 1%, validation accuracy 3% (1 of the 50
  validation samples flipped in the first epoch: eval mode normalises with the running means,
  see below);
- weights: abs 1e-4 (3e-6); train-mode outputs on the same batch: abs 5e-4 (7e-6);
- not compared: the biases of layers followed by batch-norm, and the running means. Batch-norm
  cancels those biases, so their true gradient is 0 and the backward pass gives rounding noise,
  which Adam scales to full-size steps: they random-walk by ~1e-2 between any two runs that
  round differently (1 vs 2 threads as much as 1 vs 2 processes), and the running means, which
  include them, follow; train-mode outputs, where they cancel, are compared instead;
- test ACR: 1e-4·ε_max, the evaluation's radius tolerance (1e-6·ε_max): a tiny weight change
  can move a bracket end by up to that much; clean and certified accuracy: 1% (1 of 300 samples: the
  running means move eval-mode logits by ~1e-3, enough to flip a sample on the boundary).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from acert.bounds import clean_forward
from acert.cli import main
from acert.config import TrainConfig, resolve
from acert.foundation.process_group import World, shard
from acert.foundation.schedules import EpsSchedule
from acert.methods import Batch, Step, WarmupRegularizer, create_method
from acert.records.runs import RunDir, build_model
from acert.workflows.train.ddp import distributed_loss
from acert.workflows.train.run import run, training_sets
from tests.kit import TINY_RUN
from tests.kit.processes import torchrun

CONFIG = {
    **TINY_RUN,
    "method": "acert",
    "train_limit": 512,
    "val_size": 50,
    "epochs": 2,
    "batch_size": 32,
    "eval_limit": 300,
    "cert_eps": [0.005],
    "eval_pgd_steps": 1,
    "lambda_tight": 0.0,  # no warm-up regularisers end to end: see the module docstring
    "lambda_relu": 0.0,
}
EPOCH_TOLERANCES = {  # key: (rel, abs); see the module docstring
    "loss": (1e-4, 0.0),
    "loss_std": (1e-4, 0.0),
    "loss_rob": (1e-4, 0.0),
    "eps": (1e-12, 0.0),
    "radius": (1e-3, 0.0),
    "train_acc": (0.0, 0.01),
    "certified": (0.0, 0.01),
    "val_acc": (0.0, 0.03),
}


def quiet(_line: str) -> None:
    pass


def train_on_two(config_file: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return torchrun(
        "-m", "acert", "train", "--config", str(config_file), "--out", str(out), "--quiet", *extra
    )


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "run.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    return run(TrainConfig(**CONFIG, out=str(out)), out=out, progress=False, log=quiet)


@pytest.fixture(scope="module")
def two(tmp_path_factory, config_file):
    """The two-process run, started through this file so that rank 1 may not write to ``out``."""
    out = tmp_path_factory.mktemp("two") / "run"
    argv = ["train", "--config", str(config_file), "--out", str(out), "--quiet"]
    return torchrun("-m", "tests.workflows.train.test_distributed", "acert-train", *argv), out


def noise_driven(model: nn.Sequential) -> set[str]:
    """Names of the biases that feed a batch-norm and of the running means (module docstring)."""
    names = set()
    for i, layer in enumerate(model):
        if isinstance(layer, _BatchNorm):
            names.add(f"{i}.running_mean")
            if getattr(model[i - 1], "bias", None) is not None:
                names.add(f"{i - 1}.bias")
    return names


def assert_same_training(one, folder: Path) -> None:
    """The run in ``folder`` matches the one-process run ``one`` within the tolerances above."""
    history = RunDir(folder).load_checkpoint("last")["history"]
    assert len(history) == len(one.history)
    for mine, theirs in zip(one.history, history, strict=True):
        for key, (rel, abs_) in EPOCH_TOLERANCES.items():
            if key in mine:
                assert theirs[key] == pytest.approx(mine[key], rel=rel, abs=abs_), key
    test = json.loads(RunDir(folder).test_metrics_path.read_text())
    assert test["n"] == one.test.n and test["best_epoch"] == one.best_epoch
    assert test["clean_accuracy"] == pytest.approx(one.test.clean_accuracy, abs=0.01)
    assert test["certified_accuracy"]["0.005"] == pytest.approx(
        one.test.certified_accuracy[0.005], abs=0.01
    )
    assert test["acr"] == pytest.approx(one.test.acr, abs=1e-4 * one.config.eps_max)
    theirs = RunDir(folder).load_checkpoint("best")["model"]
    skipped = noise_driven(one.model)
    for name, value in one.model.state_dict().items():
        if name not in skipped:
            assert torch.allclose(theirs[name].float(), value.float(), rtol=0, atol=1e-4), name


@pytest.mark.train
def test_two_processes_train_like_one(one, two):
    assert one.test.clean_accuracy > 0.5 and one.test.certified_accuracy[0.005] > 0.2
    assert_same_training(one, two[1])


@pytest.mark.train
def test_two_processes_compute_the_same_function_in_train_mode(one, two):
    """With batch statistics the biases before batch-norm cancel: the functions agree."""
    mine, theirs = copy.deepcopy(one.model).train(), copy.deepcopy(one.model).train()
    theirs.load_state_dict(RunDir(two[1]).load_checkpoint("best")["model"])
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(theirs(x), mine(x), rtol=0, atol=5e-4)


@pytest.mark.train
def test_only_rank_zero_writes_and_prints(one, two):
    """Rank 1 ran under an audit hook refusing any write into the run folder (``two``)."""
    done, folder = two
    files = {p.relative_to(folder) for p in folder.rglob("*") if p.is_file()}
    expected = {p.relative_to(one.run_dir) for p in one.run_dir.rglob("*") if p.is_file()}
    assert files == expected  # one set of files, no leftovers of a second writer
    assert done.stdout.count("acert train: acert on mnist5k") == 1
    assert done.stdout.count("epoch 2/2") == 1 and done.stdout.count("run folder:") == 1


class InterruptError(Exception):
    pass


@pytest.mark.train
def test_two_processes_resume_a_run_one_process_started(one, tmp_path, config_file):
    out = tmp_path / "resumed"

    def stop_after_first_epoch(line: str) -> None:
        if line.startswith("epoch 1/2"):
            raise InterruptError

    with pytest.raises(InterruptError):
        run(
            TrainConfig(**CONFIG, out=str(out)), out=out, progress=False, log=stop_after_first_epoch
        )
    assert RunDir(out).load_checkpoint("last")["epoch"] == 1
    train_on_two(config_file, out, "--resume")
    assert_same_training(one, out)


@pytest.mark.train
def test_an_indivisible_batch_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    status = main(["train", "--batch-size", "33", "--out", str(tmp_path / "run"), "--quiet"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1
    assert lines[0].startswith("acert: error: batch_size 33 does not split evenly over 2 processes")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("batch", [32, 7, 3])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shards_cover_the_global_batch(batch, world_size):
    shares = [shard(batch, World(rank, world_size)) for rank in range(world_size)]
    rows = [i for part, _ in shares for i in range(batch)[part]]
    assert rows == list(range(batch))  # contiguous, disjoint, in order
    weights = [weight for _, weight in shares]
    assert sum(weights) == pytest.approx(world_size)  # gradients average to the batch mean
    if batch % world_size == 0:
        assert all(weight == 1.0 for weight in weights)


@pytest.mark.train
def test_batch_norm_uses_the_statistics_of_the_global_batch():
    done = torchrun("-m", "tests.workflows.train.test_distributed", "batch-norm")
    assert done.stdout.count("batch-norm ok") == 2


def _batch_norm_loss(logits: torch.Tensor, stats) -> torch.Tensor:
    """A per-sample mean plus a term of the batch statistics alone (the same on every rank)."""
    return logits.square().mean() + sum(m.sum() + v.sqrt().sum() for m, v in stats.values())


def _batch_norm_worker() -> None:
    """Two processes hold 4 and 5 of 9 inputs of a net with BatchNorm2d and BatchNorm1d; their
    clean_forward must give one process's logits, statistics, running averages and gradients."""
    from tests.kit.nets import build_tiny_net

    model, shape = build_tiny_net("cnn-bn", seed=3)
    model.train()
    x = torch.rand(9, *shape, generator=torch.Generator().manual_seed(1))
    reference = copy.deepcopy(model)
    logits, stats = clean_forward(reference, x)  # before the group exists: one process
    _batch_norm_loss(logits, stats).backward()
    dist.init_process_group("gloo")
    rows, weight = shard(9, World(dist.get_rank(), 2))
    mine, my_stats = clean_forward(model, x[rows])
    (weight * _batch_norm_loss(mine, my_stats)).backward()
    for parameter in model.parameters():
        dist.all_reduce(parameter.grad)
        parameter.grad /= 2
    dist.destroy_process_group()
    close = dict(rtol=1e-5, atol=1e-6)
    assert torch.allclose(mine, logits[rows], **close)
    for (m, v), (m1, v1) in zip(my_stats.values(), stats.values(), strict=True):
        assert torch.allclose(m, m1, **close) and torch.allclose(v, v1, **close)
    for (name, value), expected in zip(
        model.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        assert torch.allclose(value.float(), expected.float(), **close), name
    for (name, parameter), expected in zip(
        model.named_parameters(), reference.parameters(), strict=True
    ):
        assert torch.allclose(parameter.grad, expected.grad, **close), name
    print("batch-norm ok", flush=True)


@pytest.mark.train
def test_a_warm_up_step_on_two_processes_is_one_step_on_one():
    done = torchrun("-m", "tests.workflows.train.test_distributed", "warm-up-step")
    assert done.stdout.count("warm-up step ok") == 2


def _warm_up_step_worker() -> None:
    """From the same weights, ACERT's standard-phase loss (ε = 0: the warm-up regularisers on
    the IBP pass at 1e-6) and IBP's loss at a step of the ramp, on two processes holding 16 and 16
    of a batch of 32: the mean of their metrics, their logits and the averaged gradients must be
    one process's, to rounding (the end-to-end runs leave the regularisers out: module docstring).
    """
    config = resolve(TrainConfig(**CONFIG))
    torch.manual_seed(config.seed)
    model = build_model(config).train()
    idx = torch.arange(32)
    train, _ = training_sets(config)
    batch = Batch(train.floats(idx), train.labels[idx], idx)
    schedule = EpsSchedule(config.eps_train, 14, config.stn_epochs, config.reg_epochs)
    steps = {
        "acert": Step(3, 0, 0.0, schedule.eps_max, True),
        "ibp": Step(21, 1, schedule(21), schedule.eps_max, True),
    }
    # τ = 1: the ReLU-balance terms (0 at τ = 0.5 on this net) carry gradients as well
    regularizer = WarmupRegularizer(0.5, 0.5, tau=1.0)

    def method(name: str):
        configured = create_method(dataclasses.replace(config, method=name))
        return dataclasses.replace(configured, regularizer=regularizer)

    reference = {}
    for name, step in steps.items():  # before the group exists: one process
        one = copy.deepcopy(model)
        terms = method(name).loss(one, batch, step)
        terms.loss.backward()
        reference[name] = terms, [parameter.grad for parameter in one.parameters()]
    dist.init_process_group("gloo")
    world = World(dist.get_rank(), 2)
    rows, weight = shard(32, world)
    mine = Batch(batch.x[rows], batch.y[rows], batch.idx[rows])
    for name, step in steps.items():
        expected, grads = reference[name]
        two = copy.deepcopy(model)
        loss = distributed_loss(two, method(name), world)  # held: DDP reduces while it lives
        terms = loss(mine, step)
        (weight * terms.loss).backward()
        keys = sorted(expected.metrics)
        assert sorted(terms.metrics) == keys, name
        means = torch.tensor([terms.metrics[key] for key in keys], dtype=torch.float64)
        dist.all_reduce(means)
        for key, value in zip(keys, (means / 2).tolist(), strict=True):
            assert value == pytest.approx(expected.metrics[key], rel=1e-5, abs=1e-9), (name, key)
        assert expected.metrics["loss_reg"] > 0.1, name  # the regularisers were on
        assert terms.metrics["loss_reg"] == pytest.approx(expected.metrics["loss_reg"], rel=1e-6)
        assert torch.allclose(terms.logits, expected.logits[rows], rtol=0, atol=1e-5), name
        scale = max(grad.abs().max().item() for grad in grads)
        for (key, parameter), grad in zip(two.named_parameters(), grads, strict=True):
            assert torch.allclose(parameter.grad, grad, rtol=0, atol=1e-4 * scale), (name, key)
        del loss
    dist.destroy_process_group()
    print("warm-up step ok", flush=True)


WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _refuse_writes_into(folder: str) -> None:
    """Make every file write, rename, removal or mkdir under ``folder`` by this process fail."""
    root = os.path.abspath(folder)

    def inside(path) -> bool:
        if isinstance(path, int):
            return False
        path = os.path.abspath(os.fsdecode(path))
        return path == root or path.startswith(root + os.sep)

    def hook(event: str, args: tuple) -> None:
        writes = event in ("os.rename", "os.mkdir", "os.remove", "os.rmdir") or (
            event == "open" and isinstance(args[2], int) and args[2] & WRITE_FLAGS
        )
        paths = args[:2] if event == "os.rename" else args[:1]
        if writes and any(inside(path) for path in paths):
            raise PermissionError(f"rank {os.environ['RANK']} wrote {paths[-1]} ({event})")

    sys.addaudithook(hook)


def _acert_train() -> None:
    """``acert train ARGS`` (``sys.argv[2:]``); a rank other than 0 may not touch ``--out``."""
    argv = sys.argv[2:]
    if os.environ.get("RANK", "0") != "0":
        _refuse_writes_into(argv[argv.index("--out") + 1])
    sys.exit(main(argv))


if __name__ == "__main__":
    workers = {
        "acert-train": _acert_train,
        "batch-norm": _batch_norm_worker,
        "warm-up-step": _warm_up_step_worker,
    }
    workers[sys.argv[1]]()
