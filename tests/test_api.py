"""The Python API on a network and data of one's own: acert.fit, acert.certify, and the README's
examples of them, run as they are written."""

import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import acert
import acert.records.runs
from acert.foundation.errors import AcertError
from acert.models import Normalize, Residual
from acert.radius.attacks import pgd_attack

ROOT = Path(__file__).resolve().parents[1]


def _digits(n: int = 600) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = acert.data.load("mnist5k", split="train")
    rows = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:n]
    return x[rows], y[rows]


def _network() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        Normalize([0.1307], [0.3081]),
        nn.Flatten(),
        nn.Linear(784, 48),
        nn.ReLU(),
        nn.Linear(48, 10),
    )


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    x, y = _digits()
    out = tmp_path_factory.mktemp("fit") / "run"
    model = acert.fit(
        _network(), (x[:500], y[:500]), val=(x[500:], y[500:]), eps_max=0.1, epochs=5, out=out,
        progress=False, lr=5e-3, batch_size=50,
    )  # fmt: skip
    return model, out, (x[500:], y[500:])


@pytest.mark.train
def test_fit_trains_a_network_of_ones_own_into_a_run_folder(fitted):
    model, out, (x, y) = fitted
    assert not model.training
    report = acert.certify(model, (x, y), eps_max=0.1, eps=(0.02, 0.1), progress=False)
    assert report.clean_accuracy > 0.6 and report.acr > 0
    assert report.radii.shape == (100,)
    assert 0 <= report.certified_accuracy[0.1] <= report.certified_accuracy[0.02]
    for name in ("config.yaml", "metrics.csv", "model.pt", "checkpoints/last.pt"):
        assert (out / name).is_file(), name
    loaded = acert.load(out)
    torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.train
def test_certified_radii_of_a_given_network_hold_against_pgd(fitted):
    model, _, (x, y) = fitted
    report = acert.certify(model, (x, y), eps_max=0.1, bound=("ibp", "crown"), progress=False)
    certified = report.radii > 0
    assert certified.any()
    xs, ys, radii = x[certified], y[certified], report.radii[certified]
    attacked = pgd_attack(model, xs, ys, radii, steps=40, restarts=2)
    with torch.no_grad():
        assert (model(attacked).argmax(1) == ys).all()


@pytest.mark.train
def test_an_interrupted_fit_resumes_to_the_same_model(tmp_path, monkeypatch):
    x, y = _digits(300)
    settings = {"eps_max": 0.1, "epochs": 2, "progress": False, "batch_size": 50}
    whole = acert.fit(_network(), (x, y), out=tmp_path / "whole", **settings)
    write_metrics = acert.records.runs.RunDir.write_metrics

    def interrupted(self, rows):
        write_metrics(self, rows)
        raise KeyboardInterrupt  # after the first epoch's checkpoint

    monkeypatch.setattr(acert.records.runs.RunDir, "write_metrics", interrupted)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        acert.fit(_network(), (x, y), out=out, **settings)
    monkeypatch.undo()
    with pytest.raises(AcertError, match="already holds a run"):
        acert.fit(_network(), (x, y), out=out, **settings)
    resumed = acert.fit(_network(), (x, y), out=out, resume=True, **settings)
    assert len((out / "metrics.csv").read_text().strip().splitlines()) == 3  # header, 2 epochs
    torch.testing.assert_close(resumed(x), whole(x), rtol=0, atol=0)
    torch.testing.assert_close(acert.load(out, "last")(x), whole(x), rtol=0, atol=0)


@pytest.mark.train
@pytest.mark.parametrize("kind", ["dataset", "loader"])
def test_fit_takes_a_dataset_or_a_loader_and_a_method_object(kind):
    x, y = _digits(200)
    data = TensorDataset(x, y)
    train = data if kind == "dataset" else DataLoader(data, batch_size=50)
    method = acert.methods.ACERT(kappa=0.5)
    model = acert.fit(_network(), train, eps_max=0.05, epochs=2, method=method, progress=False,
                      batch_size=50)  # fmt: skip
    assert acert.certify(model, data, eps_max=0.05, progress=False).clean_accuracy > 0.3
    assert method.memory.radius.numel() > 0  # the given object trained


@pytest.mark.train
@pytest.mark.parametrize(
    "data, match",
    [
        ((torch.rand(8, 1, 28, 28) * 2, torch.zeros(8, dtype=torch.long)), r"pixels must lie"),
        ((torch.rand(8, 1, 28, 28), torch.full((8,), 12)), r"labels must lie in \[0, 10\)"),
        ((torch.rand(8, 1, 28, 28), torch.zeros(8)), r"labels are torch.float32"),
        ((torch.rand(8, 1, 28, 28), torch.zeros(7, dtype=torch.long)), r"images \(N, C, H, W\)"),
        (((torch.rand(8, 1, 28, 28) * 255).byte(), torch.zeros(8, dtype=torch.long)), "uint8"),
        ([[0.5]], "an \\(x, y\\) pair of tensors"),
    ],
)
def test_bad_data_is_one_line(data, match):
    for call in (
        lambda: acert.fit(_network(), data, eps_max=0.1, epochs=1, progress=False),
        lambda: acert.certify(_network(), data, eps_max=0.1, progress=False),
    ):
        with pytest.raises(AcertError, match=match) as err:
            call()
        assert "\n" not in str(err.value)


@pytest.mark.train
def test_an_unsupported_module_and_a_bad_key_are_one_line():
    data = _digits(50)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.Tanh(), nn.Linear(8, 10))
    with pytest.raises(AcertError, match=r"layer 2 \(Tanh\) has no bound rule; supported"):
        acert.fit(model, data, eps_max=0.1, epochs=1)
    with pytest.raises(AcertError, match="unknown config key 'learning_rate'"):
        acert.fit(_network(), data, eps_max=0.1, epochs=1, learning_rate=0.1)
    with pytest.raises(AcertError, match=r"acert\.fit takes them as arguments"):
        acert.fit(_network(), data, eps_max=0.1, epochs=1, dataset="mnist")


def _readme_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Your own network, data and training loop", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


@pytest.mark.parametrize("block", [0, 1], ids=["fit-and-certify", "custom-loop"])
def test_the_readme_examples_run_as_written(block, tmp_path, monkeypatch, capsys):
    blocks = _readme_blocks()
    assert len(blocks) >= 2  # the third, on the pieces underneath, needs a trained run
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[block], "README.md", "exec"), {})
    printed = capsys.readouterr().out
    if block == 0:
        assert re.search(r"clean \d+\.\d%, ACR 0\.\d{3}, certified at 0\.1: \d+\.\d%", printed)
        assert (tmp_path / "runs" / "mine" / "model.pt").is_file()
    else:
        assert re.search(r"last batch: loss \d\.\d{3}, mean radius 0\.\d{4}", printed)


def _pooling_residual_network() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        Normalize([0.1307], [0.3081]),
        nn.Conv2d(1, 6, 3, stride=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        Residual(nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU())),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(6 * 3 * 3, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


@pytest.mark.train
@pytest.mark.parametrize("kind", ["tensors", "dataset"])
def test_a_pooling_residual_network_trains_and_its_radii_hold(kind):
    """A network of one's own with max- and average-pooling and a residual block trains with
    ACERT through acert.fit; every bound method's radii hold against PGD inside them."""
    x, y = _digits(600)
    train = (x[:500], y[:500]) if kind == "tensors" else TensorDataset(x[:500], y[:500])
    model = acert.fit(_pooling_residual_network(), train, eps_max=0.1, epochs=3, lr=5e-3,
                      batch_size=50, progress=False)  # fmt: skip
    xs, ys = x[500:560], y[500:560]
    for bound in ("ibp", "crown-ibp", "crown"):
        report = acert.certify(model, (xs, ys), eps_max=0.1, bound=bound, progress=False)
        certified = report.radii > 0
        assert certified.sum() >= 3, bound
        attacked = pgd_attack(model, xs[certified], ys[certified], report.radii[certified],
                              steps=40, restarts=2)  # fmt: skip
        with torch.no_grad():
            assert (model(attacked).argmax(1) == ys[certified]).all(), bound


def _random_images(n: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=generator), torch.arange(n) % 10


@pytest.mark.parametrize(
    ("layer", "match"),
    [
        (nn.Dropout(0.5), r"layer 3 \(Dropout\) drops inputs at random in train mode.*model.eval"),
        (nn.BatchNorm1d(32), r"layer 3 \(BatchNorm1d\) normalises with the statistics of the"),
    ],
)
def test_certify_refuses_a_model_whose_train_mode_changes_what_it_computes(layer, match):
    """A Dropout drawing random masks, or a batch-norm using the batch's statistics: the model
    in train mode has no prediction of its own to certify; certifying its eval mode instead
    would promise something about another function."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), layer, nn.Linear(32, 10))
    with pytest.raises(AcertError, match=match) as err:
        acert.certify(model.train(), _random_images(), eps_max=0.1, progress=False)
    assert "\n" not in str(err.value)
    assert acert.certify(model.eval(), _random_images(), eps_max=0.1, progress=False).n == 20


def test_certify_leaves_the_models_modes_as_they_were():
    """A training loop that certifies between epochs keeps training its model in train mode."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.0), nn.Linear(32, 10)
    )
    result = acert.certify(model.train(), _random_images(), eps_max=0.1, progress=False)
    assert result.n == 20 and all(module.training for module in model.modules())
    model[1].eval()  # a mixed state comes back as it was too
    acert.certify(model, _random_images(), eps_max=0.1, progress=False)
    assert [m.training for m in model.modules()] == [True, True, False, True, True, True]
