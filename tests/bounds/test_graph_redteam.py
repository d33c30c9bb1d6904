"""Red-team cases of models as graphs (issue 19): the graphs people build that the engines
first got wrong (each test failed before its fix), and attacks that held, kept where they
cover something test_graph.py and test_kinds.py do not."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from acert.bounds import METHODS, clean_forward, input_box, kinds, margin_bounds, register_kind
from acert.bounds.activations import IDENTITY
from acert.bounds.crown import crown_margins
from acert.foundation.errors import AcertError, UnsupportedModelError
from acert.models import Add, Concat, GraphNet, Normalize, Residual
from acert.models.graph import INPUT
from tests.kit.exact import exact_min_margins
from tests.kit.nets import true_margins

pytestmark = pytest.mark.usefixtures("single_thread")


def _below_sampled(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, lb) -> None:
    """The bounds below the margins of 200 points of each ball (half of them corners)."""
    g = torch.Generator().manual_seed(0)
    u = torch.rand(x.shape[0], 200, *x.shape[1:], generator=g, dtype=x.dtype)
    u[:, 100:] = u[:, 100:].round()
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    points = (lo.unsqueeze(1) + u * (hi - lo).unsqueeze(1)).flatten(0, 1)
    with torch.no_grad():
        sampled = true_margins(model(points), y.repeat_interleave(200))
    assert (lb.repeat_interleave(200, 0) <= sampled).all()


def _shared_conv_net() -> tuple[GraphNet, nn.Conv2d]:
    """One Conv2d at two nodes (weights shared): ``relu(c(x)) + relu(c(relu(c(x))))``."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 2, 3, padding=1)
    nodes = [
        ("c1", conv, (INPUT,)),
        ("r1", nn.ReLU(), (0,)),
        ("c2", conv, (1,)),
        ("r2", nn.ReLU(), (2,)),
        ("add", Add(), (1, 3)),
        ("flat", nn.Flatten(), (4,)),
        ("out", nn.Linear(2 * 5 * 5, 3), (5,)),
    ]
    return GraphNet(nodes).eval(), conv


@pytest.mark.parametrize("method", list(METHODS))
def test_a_module_at_two_nodes_keeps_its_weights_and_is_bounded_soundly(method):
    """The input check ran the model on the meta device with torch.func.functional_call,
    which leaves a module used at two places holding meta tensors: the bounds crashed and
    the model itself no longer computed anything."""
    model, conv = _shared_conv_net()
    weight = conv.weight
    x = torch.rand(3, 2, 5, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    lb = margin_bounds(model, x, y, 0.01, method)
    assert conv.weight is weight and weight.device.type == "cpu"
    _below_sampled(model, x, y, 0.01, lb)


def test_a_tied_weight_in_a_chain_stays_tied_and_real():
    torch.manual_seed(2)
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight
    model = nn.Sequential(
        Normalize([0.5] * 4, [0.25] * 4), first, nn.ReLU(), second, nn.ReLU(), nn.Linear(4, 3)
    ).eval()
    x = torch.rand(4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = model(x).argmax(1)
    lb = margin_bounds(model, x, y, 0.02, "crown")
    assert second.weight is first.weight and first.weight.device.type == "cpu"
    assert model[0].mean.device.type == "cpu"
    _below_sampled(model, x, y, 0.02, lb)


def test_a_train_mode_batchnorm_at_two_nodes_is_refused_by_the_clean_pass():
    """The model normalises each node with that node's batch statistics; the statistics were
    kept per module, the second node's overwriting the first's, so a training objective's
    bounds at ε = 0 lay ~1 above the clean margins it trained."""
    torch.manual_seed(11)
    norm = nn.BatchNorm2d(2)
    nodes = [
        ("c1", nn.Conv2d(1, 2, 3, padding=1), (INPUT,)),
        ("bn_a", norm, (0,)),
        ("r", nn.ReLU(), (1,)),
        ("c2", nn.Conv2d(2, 2, 3, padding=1), (2,)),
        ("bn_b", norm, (3,)),
        ("r2", nn.ReLU(), (4,)),
        ("flat", nn.Flatten(), (5,)),
        ("out", nn.Linear(2 * 4 * 4, 3), (6,)),
    ]
    model, x = GraphNet(nodes).train(), torch.rand(8, 1, 4, 4)
    with pytest.raises(UnsupportedModelError, match=r"layer bn_b \(BatchNorm2d\) is layer bn_a"):
        clean_forward(model, x)
    clean_forward(model.eval(), x)  # running statistics: one function at both nodes


def test_an_inplace_write_of_a_tensor_an_earlier_node_read_is_refused():
    """A Linear reads fc0's output, then an in-place ReLU overwrites it: the values are
    right, but the Linear kept its input for the gradient, so PGD inside a radius and every
    training step failed with autograd's RuntimeError instead of a one-line refusal."""
    nodes = [
        ("fc0", nn.Linear(4, 4), (INPUT,)),
        ("a", nn.Linear(4, 4), (0,)),
        ("r", nn.LeakyReLU(0.1, inplace=True), (0,)),
        ("add", Add(), (1, 2)),
        ("out", nn.Linear(4, 3), (3,)),
    ]
    x, y = torch.rand(2, 4), torch.tensor([0, 1])
    with pytest.raises(
        UnsupportedModelError,
        match=r"layer r \(LeakyReLU\(inplace=True\)\) overwrites the output of layer fc0 "
        r"\(Linear\), which layer a \(Linear\) read before it .* use nn.LeakyReLU\(0.1\) ",
    ):
        margin_bounds(GraphNet(nodes).eval(), x, y, 0.01, "ibp")


def _leaky(slope: object) -> nn.LeakyReLU:
    layer = nn.LeakyReLU(0.1)
    layer.negative_slope = slope
    return layer


def _concat(dim: int) -> Concat:
    layer = Concat(1)
    layer.dim = dim
    return layer


def _graph(*middle: tuple) -> GraphNet:
    return GraphNet([("fc", nn.Linear(4, 4), (INPUT,)), *middle, ("out", nn.Linear(4, 3), (1,))])


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (  # ValueError: too many values to unpack
            lambda: _graph(("res", Residual(nn.Sequential(nn.Linear(4, 4))), (INPUT, 0))),
            r"layer res \(Residual\) takes 1 input, got 2",
        ),
        (  # TypeError: list indices must be integers
            lambda: _graph(("relu", nn.ReLU(), (0.0,))),
            r"node 1 \(relu\) takes inputs \(0.0,\); give a tuple of ints",
        ),
        (  # TypeError: 'int' object is not iterable
            lambda: _graph(("relu", nn.ReLU(), 0)),
            r"node 1 \(relu\) takes inputs 0; give a tuple of ints",
        ),
        (  # TypeError from nn.ModuleList
            lambda: _graph(("relu", torch.relu, (0,))),
            r"node 1 \(relu\) is a builtin_function_or_method, not an nn.Module",
        ),
        (  # ValueError: not enough values to unpack
            lambda: GraphNet([("fc", nn.Linear(4, 3))]),
            r"each node is \(name, module, inputs\)",
        ),
        (  # IndexError in the shape rule
            lambda: _graph(("cat", _concat(-1), (0, 0))),
            r"layer cat \(Concat\) joins along dim -1; the bounds take a dimension after",
        ),
        (  # TypeError: '<=' not supported
            lambda: _graph(("leaky", _leaky("0.1"), (0,))),
            r"layer leaky \(LeakyReLU\) has slope '0.1' \(str\)",
        ),
        (  # True passed the check as a slope of 1; the meta pass then failed on a bool
            lambda: _graph(("leaky", _leaky(True), (0,))),
            r"layer leaky \(LeakyReLU\) has slope True \(bool\)",
        ),
    ],
)
def test_malformed_graphs_get_one_line(build, match):
    x, y = torch.rand(2, 4), torch.tensor([0, 1])
    with pytest.raises(AcertError, match=match) as info:
        margin_bounds(build(), x, y, 0.01, "crown")
    assert "\n" not in str(info.value)


class _Twice(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x], 1)


@pytest.fixture
def lying_kind():
    """A user's kind whose shape rule says its input's shape; its layer doubles the width."""
    saved = list(kinds.LAYER_KINDS), list(kinds.SUPPORTED_LAYERS), dict(kinds._KINDS)
    yield register_kind(
        dataclasses.replace(IDENTITY, type=_Twice, example=lambda: (_Twice(), (4,)))
    )
    kinds.LAYER_KINDS[:], kinds.SUPPORTED_LAYERS[:] = saved[0], saved[1]
    kinds._KINDS.clear()
    kinds._KINDS.update(saved[2])


@pytest.mark.parametrize("method", list(METHODS))
def test_a_registered_kind_whose_shape_rule_lies_is_named(lying_kind, method):
    """The model runs, so the input check passed, and the bounds failed inside einsum or a
    matrix product, reported as "input of shape (4,) does not fit the model"."""
    model = _graph(("twice", _Twice(), (0,)))
    model.nodes[-1] = nn.Linear(8, 3)
    x, y = torch.rand(2, 4), torch.tensor([0, 1])
    with pytest.raises(
        AcertError,
        match=r"layer twice \(_Twice\) gives outputs of shape \(8,\), but its kind's shape "
        r"rule says \(4,\)",
    ):
        margin_bounds(model, x, y, 0.01, method)


def _everything_net() -> GraphNet:
    """Graph shapes that held, in one net of a (1, 4, 4) input: a nested GraphNet with a
    skip, a Residual after it, an Add of a node with itself, a node read by four steps
    (one of them unused), a Concat of three inputs with different channel counts, the model's
    input among them, then MaxPool2d and a convolution."""
    torch.manual_seed(21)
    inner = GraphNet(
        [
            ("a", nn.Conv2d(2, 2, 3, padding=1), (INPUT,)),
            ("r", nn.ReLU(), (0,)),
            ("add", Add(), (1, INPUT)),
        ]
    )
    block = Residual(nn.Sequential(nn.Conv2d(2, 2, 1), nn.LeakyReLU(0.3)))
    nodes = [
        ("norm", Normalize([0.45], [0.3]), (INPUT,)),  # 0
        ("c1", nn.Conv2d(1, 2, 3, padding=1), (0,)),  # 1
        ("r1", nn.ReLU(), (1,)),  # 2: read by inner, twice (2x) and unused
        ("inner", inner, (2,)),  # 3
        ("res", block, (3,)),  # 4
        ("twice", Add(), (2, 2)),  # 5
        ("cat", Concat(1), (4, 5, INPUT)),  # 6
        ("pool", nn.MaxPool2d(2), (6,)),  # 7
        ("c2", nn.Conv2d(5, 2, 1), (7,)),  # 8
        ("r2", nn.ReLU(), (8,)),  # 9
        ("unused", nn.Conv2d(2, 1, 1), (2,)),  # 10
        ("flat", nn.Flatten(), (9,)),  # 11
        ("out", nn.Linear(2 * 2 * 2, 3), (11,)),  # 12
    ]
    return GraphNet(nodes).eval()


@pytest.mark.parametrize("method", list(METHODS))
def test_nested_graphs_self_adds_and_wide_concats_stay_below_the_exact_minimum(method):
    model = _everything_net()
    x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(22))
    with torch.no_grad():
        y = model(x).argmax(1)
    eps = torch.tensor([0.02, 0.08])
    lb = margin_bounds(model, x, y, eps, method)
    for i in range(2):
        exact = torch.from_numpy(exact_min_margins(model, x[i], int(y[i]), float(eps[i])))
        assert (lb[i].double() <= exact + 1e-6 * (1 + exact.abs())).all(), (lb[i], exact)


@pytest.mark.parametrize("intermediate", ["ibp", "crown"])
def test_nested_graphs_self_adds_and_wide_concats_on_patches_equal_dense(intermediate):
    model = _everything_net()
    x = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(23))
    with torch.no_grad():
        y = model(x).argmax(1)
        box = input_box(x, torch.tensor([0.01, 0.05, 0.2]))
        dense = crown_margins(model, box, y, intermediate=intermediate, use_patches=False)
        windowed = crown_margins(model, box, y, intermediate=intermediate, use_patches=True)
    torch.testing.assert_close(windowed, dense, atol=1e-5, rtol=1e-5)


def test_a_model_with_an_attribute_that_cannot_be_copied_is_still_bounded():
    """The input check runs a meta copy of the model; a module holding a lock (or anything
    deepcopy refuses) skips that run instead of failing."""
    import threading

    model = nn.Sequential(
        Normalize([0.5] * 4, [0.2] * 4), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)
    )
    model[1].lock = threading.Lock()
    x, y = torch.rand(2, 4), torch.tensor([0, 1])
    assert margin_bounds(model.eval(), x, y, 0.01, "crown").shape == (2, 2)


class _SharedConv(nn.Module):
    """A network of one's own (traced) that applies one convolution twice."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(24)
        self.norm = Normalize([0.5], [0.2])
        self.stem = nn.Conv2d(1, 2, 3, padding=1)
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.fc = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(self.norm(x)))
        h = torch.relu(self.conv(h)) + h
        return self.fc(torch.flatten(torch.relu(self.conv(h)), 1))


def test_a_traced_model_that_reuses_a_module_keeps_its_weights():
    """Tracing's input check ran the user's model through torch.func.functional_call too:
    the reused convolution was left on the meta device."""
    model = _SharedConv().eval()
    x = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(25))
    with torch.no_grad():
        y = model(x).argmax(1)
    lb = margin_bounds(model, x, y, 0.01, "crown")
    assert model.conv.weight.device.type == "cpu"
    _below_sampled(model, x, y, 0.01, lb)
