"""Networks of one's own with their own forward (tests/kit/graphs.py: a custom CNN, a ResNet with
projection shortcuts, a torch.cat net, a LeakyReLU net) train through acert.fit and certify
through acert.certify with IBP and CROWN; PGD inside each certified radius flips nothing. The
registry's resnet-cifar trains as a tiny run on digits."""

import pytest
import torch

import acert
from acert.config import tiny_run
from acert.foundation.errors import ConfigError
from acert.radius.attacks import pgd_attack
from acert.workflows.train.run import run
from tests.kit import quiet
from tests.kit.graphs import GRAPH_NETS, build_graph_net

SHAPE = (1, 8, 8)


def _bands(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose label is the brightest of three horizontal bands, far apart."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = 0.3 * torch.rand(n, *SHAPE, generator=generator)
    for k in range(3):
        x[y == k, 0, 3 * k : 3 * k + 2] += 0.6
    return x.clamp(0, 1), y


@pytest.mark.train
@pytest.mark.parametrize("name", GRAPH_NETS)
def test_a_network_of_ones_own_trains_and_certifies_and_pgd_cannot_beat_its_radii(name, tmp_path):
    model = build_graph_net(name, SHAPE, classes=3)
    trained = acert.fit(
        model, _bands(240, 0), eps_max=0.1, epochs=4, out=tmp_path / "run", progress=False,
        lr=5e-3, batch_size=40, method="ibp",
    )  # fmt: skip
    assert trained is model and not model.training
    x, y = _bands(15, 1)
    for bound in ("ibp", "crown"):
        report = acert.certify(model, (x, y), eps_max=0.1, bound=bound, progress=False)
        assert report.clean_accuracy > 0.6
        certified = report.radii > 0
        assert certified.sum() >= 3, (bound, report.radii)
        xs, ys, radii = x[certified], y[certified], report.radii[certified]
        attacked = pgd_attack(model, xs, ys, radii, steps=30, restarts=2)
        with torch.no_grad():
            assert (model(attacked).argmax(1) == ys).all()
    loaded = acert.load(tmp_path / "run")
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.train
def test_the_registrys_resnet_cifar_trains_as_a_tiny_run():
    result = run(tiny_run(model="resnet-cifar", eval_limit=30), progress=False, log=quiet)
    assert type(result.model).__name__ == "ResNetCIFAR"
    accuracies = [row["train_acc"] for row in result.history]
    assert accuracies[-1] > 0.3 and accuracies[-1] > accuracies[0]
    assert result.test is not None and result.test.radii.shape == (30,)


def test_the_acert_loss_in_ones_own_loop_bounds_a_traced_network():
    model = build_graph_net("resnet", SHAPE, classes=3).train()
    loss_fn = acert.ACERTLoss(eps_max=0.1, kappa=0.25)
    x, y = _bands(16, 2)
    terms = loss_fn(model, x, y, 0.05, torch.arange(16))
    terms.loss.backward()
    assert torch.isfinite(terms.loss) and terms.radii.shape == (16,)
    assert all(p.grad is not None for p in model.parameters())


def test_taps_which_splits_a_chain_refuses_a_graph_in_one_line():
    model = build_graph_net("custom-cnn", SHAPE, classes=3)
    with pytest.raises(
        ConfigError, match=r"^TAPS splits a chain of layers .* this model is a graph"
    ):
        acert.fit(model, _bands(40, 0), eps_max=0.1, epochs=1, progress=False, method="taps")
