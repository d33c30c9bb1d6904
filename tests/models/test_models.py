import json
import math

import pytest
import torch
from torch import nn

import acert.data
from acert.bounds import METHODS
from acert.foundation.errors import ConfigError
from acert.models import Normalize, Residual, cnn7, create_model, ibp_init_, list_models, resnet
from acert.radius import radius_search
from acert.radius.attacks import pgd_attack
from acert.records.runs import load
from acert.workflows.train.run import run
from tests.kit import tiny_run


def test_normalize_is_per_channel_affine():
    layer = Normalize((0.5, 0.25, 0.0), (0.5, 0.25, 2.0))
    x = torch.rand(2, 3, 4, 4)
    expected = (x - torch.tensor([0.5, 0.25, 0.0]).view(1, 3, 1, 1)) / torch.tensor(
        [0.5, 0.25, 2.0]
    ).view(1, 3, 1, 1)
    assert torch.allclose(layer(x), expected)
    with pytest.raises(ConfigError):
        Normalize((0.0,), (0.0,))


@pytest.mark.parametrize(
    ("shape", "classes", "last_stride"),
    [((1, 28, 28), 10, 1), ((3, 32, 32), 10, 1), ((3, 64, 64), 200, 2), ((1, 5, 7), 3, 1)],
)
def test_cnn7_shapes_and_structure(shape, classes, last_stride):
    net = cnn7(
        shape,
        classes,
        [0.0] * shape[0],
        [1.0] * shape[0],
        width=4,
        linear_width=8,
        last_stride=last_stride,
    )
    assert isinstance(net, nn.Sequential) and isinstance(net[0], Normalize)
    assert net(torch.rand(2, *shape)).shape == (2, classes)
    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 4, 8, 8, 8]
    assert [c.stride[0] for c in convs] == [1, 1, 2, 1, last_stride]
    # batch-norm after every conv/linear except the last
    kinds = [type(m) for m in net]
    assert kinds.count(nn.BatchNorm2d) == 5 and kinds.count(nn.BatchNorm1d) == 1
    assert isinstance(net[-1], nn.Linear)


@pytest.mark.parametrize("name", list_models())
def test_registry_builds_every_model(name):
    shape = (1, 28, 28) if name != "cnn7-tinyimagenet" else (3, 64, 64)
    net = create_model(name, shape, 10, (0.1,) * shape[0], (0.3,) * shape[0])
    assert net.eval()(torch.rand(2, *shape)).shape == (2, 10)


def test_ibp_init_scale_and_last_layer_untouched():
    torch.manual_seed(0)
    net = cnn7((1, 28, 28), 10, (0.0,), (1.0,), width=16, linear_width=64)
    last_before = net[-1].weight.clone()
    ibp_init_(net)
    layers = [m for m in net if isinstance(m, nn.Conv2d | nn.Linear)]
    for layer in layers[:-1]:
        fan_in = layer.weight[0].numel()
        assert layer.weight.std().item() == pytest.approx(math.sqrt(2 * math.pi) / fan_in, rel=0.15)
        assert torch.all(layer.bias == 0)
    assert torch.equal(net[-1].weight, last_before)


def test_create_model_errors_are_one_line():
    with pytest.raises(ConfigError, match="unknown model 'resnet'") as err:
        create_model("resnet", (1, 28, 28), 10, (0.0,), (1.0,))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="channels"):
        create_model("cnn7-tiny", (3, 32, 32), 10, (0.0,), (1.0,))


@pytest.mark.parametrize(
    ("shape", "blocks"), [((1, 28, 28), 1), ((3, 32, 32), 2), ((3, 64, 64), 1), ((1, 9, 9), 1)]
)
def test_resnet_shapes_and_structure(shape, blocks):
    net = resnet(
        shape, 5, [0.5] * shape[0], [0.2] * shape[0], width=4, linear_width=8, blocks=blocks
    )
    assert isinstance(net[0], Normalize) and isinstance(net[-1], nn.Linear)
    assert net.eval()(torch.rand(2, *shape)).shape == (2, 5)
    residuals = [m for m in net if isinstance(m, Residual)]
    assert len(residuals) == 2 * blocks
    h = torch.rand(1, *shape)
    for layer in net:
        if isinstance(layer, Residual):  # each body keeps the shape it adds to
            assert layer.body(h).shape == h.shape
            assert torch.equal(layer(h), h + layer.body(h))
        h = layer(h)
    assert [type(m) for m in net].count(nn.AvgPool2d) == 1


@pytest.mark.train
def test_resnet_tiny_trains_end_to_end_and_certifies(tmp_path):
    """IBP training of resnet-tiny on digits through acert.workflows.train.run.run (18 steps), then
    the trained network's certificates with every bound: PGD cannot break them. (After 18 steps
    the running batch-norm statistics are far from the batches', so the eval-mode network
    predicts poorly; the training accuracy shows that it learns.)"""
    config = tiny_run(
        model="resnet-tiny", method="ibp", val_size=20, eval_limit=20, cert_eps=[0.01], eps_max=0.05
    )
    run(config, out=tmp_path / "run", progress=False, log=lambda line: None)
    model = load(tmp_path / "run")
    assert sum(isinstance(m, Residual) for m in model.modules()) == 2 and not model.training
    metrics = json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    assert metrics["n"] == 20 and set(metrics["certified_accuracy"]) == {"0.01"}
    last_epoch = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[-1].split(",")
    assert float(last_epoch[4]) > 0.5  # train_acc: it learns
    x = acert.data.load("mnist5k", "test")[0][:6]
    with torch.no_grad():
        y = model(x).argmax(1)  # certificates are about the prediction, right or wrong
    for method in METHODS:
        radius = radius_search(model, x, y, 0.05, method).radius
        assert (radius > 0).any(), method
        adversarial = pgd_attack(model, x, y, radius, steps=20, restarts=2)
        with torch.no_grad():
            assert (model(adversarial).argmax(1) == y)[radius > 0].all(), method
