"""Tracing any nn.Module into a graph of kinds (acert.bounds.tracing): the graph computes the
model bit for bit and shares its modules, the functional forms become modules, a chain of
supported layers is left as it is, and every input tracing cannot take gets one line that
names it: an untraceable forward, an operation without a kind, a graph that differs from the
model, an in-place write whose old value is read again."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from acert.bounds import margin_bounds
from acert.bounds.tracing import as_graph, bounds_form, last_layer
from acert.foundation.errors import AcertError, UnsupportedModelError
from acert.models import Add, Concat, GraphNet, Normalize, Residual
from tests.kit.graphs import GRAPH_NETS, build_graph_net

SHAPE = (1, 8, 8)


def _types(graph: GraphNet) -> list[type]:
    return [type(module) for module in graph.nodes]


@pytest.mark.parametrize("name", GRAPH_NETS)
def test_a_traced_graph_computes_the_model_bit_for_bit_and_shares_its_modules(name):
    model = build_graph_net(name, SHAPE, classes=3)
    graph = as_graph(model, SHAPE)
    x = torch.rand(5, *SHAPE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(graph(x), model(x))
        model.train()
        assert torch.equal(graph(x), model(x))  # batch statistics of the same modules
    parameters = {id(p) for p in model.parameters()}
    assert {id(p) for p in graph.parameters()} == parameters
    assert last_layer(graph) is list(model.modules())[-1]
    expected = {"resnet": Add, "cat": Concat, "leaky": nn.LeakyReLU, "custom-cnn": nn.Flatten}
    assert expected[name] in _types(graph)


def test_the_resnets_shortcuts_are_projections_joined_by_add():
    graph = as_graph(build_graph_net("resnet", SHAPE, 3), SHAPE)
    adds = [i for i, module in enumerate(graph.nodes) if isinstance(module, Add)]
    assert len(adds) == 2
    shortcut = graph.inputs[adds[1]][1]  # the second block's: 1x1 stride-2 conv + BN
    conv = graph.nodes[graph.inputs[shortcut][0]]
    assert isinstance(graph.nodes[shortcut], nn.BatchNorm2d)
    assert conv.kernel_size == (1, 1) and conv.stride == (2, 2)
    slopes = as_graph(build_graph_net("leaky", SHAPE, 3), SHAPE).nodes
    assert [m.negative_slope for m in slopes if isinstance(m, nn.LeakyReLU)] == [0.2, 0.05]


class _Forms(nn.Module):
    """Every functional form tracing maps, once."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.other = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(4 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.conv(x))
        b = self.other(x).relu()
        h = torch.add(a, b) + F.relu(a)
        h = torch.cat((F.max_pool2d(h, 2), F.avg_pool2d(h, kernel_size=2)), dim=-3)
        h = F.max_pool2d(h, 2, 2)
        flat = [h.view(h.size(0), -1), h.reshape(h.shape[0], -1), h.flatten(1), h.view(-1, 16)]
        return self.fc(torch.cat(flat, 1))


def test_the_functional_forms_become_modules():
    model = _Forms().eval()
    graph = as_graph(model, SHAPE)
    types = _types(graph)
    assert types.count(nn.ReLU) == 3 and types.count(Add) == 2
    assert types.count(nn.MaxPool2d) == 2 and types.count(nn.AvgPool2d) == 1
    assert types.count(nn.Flatten) == 4 and types.count(Concat) == 2
    assert [m.dim for m in graph.nodes if isinstance(m, Concat)] == [1, 1]
    x = torch.rand(4, *SHAPE)
    assert torch.equal(graph(x), model(x))


def test_a_chain_of_supported_layers_is_not_traced_and_a_graph_is_cached():
    chain = nn.Sequential(Normalize([0.5], [0.2]), nn.Flatten(), nn.Linear(64, 3))
    assert bounds_form(chain) is chain
    model = build_graph_net("cat", SHAPE, 3)
    graph = bounds_form(model, SHAPE)
    assert isinstance(graph, GraphNet) and bounds_form(model) is graph
    model.mix = nn.Conv2d(5, 4, 3, stride=2, padding=1)  # a layer replaced after tracing
    retraced = bounds_form(model, SHAPE)
    assert retraced is not graph and retraced.nodes[graph.names.index("mix")] is model.mix
    handle = model.left.register_forward_hook(lambda module, inputs, output: -output)
    with pytest.raises(UnsupportedModelError, match=r"hooks .* on layer left \(Conv2d\)"):
        bounds_form(model)
    handle.remove()
    nested = nn.Sequential(
        nn.Sequential(nn.Flatten(), nn.Linear(64, 4)), nn.ReLU(), nn.Linear(4, 2)
    )
    assert _types(bounds_form(nested, SHAPE)) == [nn.Flatten, nn.Linear, nn.ReLU, nn.Linear]


class _WithResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 8)
        self.block = Residual(nn.Sequential(nn.Linear(8, 8), nn.ReLU()))
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.block(self.fc(x.flatten(1)))))


def test_a_residual_block_stays_one_node_that_the_walk_expands():
    model = _WithResidual().eval()
    graph = as_graph(model, SHAPE)
    assert _types(graph) == [nn.Flatten, nn.Linear, Residual, nn.ReLU, nn.Linear]
    x, y = torch.rand(3, *SHAPE), torch.tensor([0, 1, 2])
    for method in ("ibp", "crown"):
        assert torch.equal(
            margin_bounds(model, x, y, 0.01, method), margin_bounds(graph, x, y, 0.01, method)
        )


class _WithBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.out = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(torch.flatten(x, 1))
        if h.mean() > 0:
            h = F.relu(h)
        return self.out(h)


class _Op(nn.Module):
    """``op`` between a Linear and the last Linear."""

    def __init__(self, op) -> None:
        super().__init__()
        self.op = op
        self.fc = nn.Linear(64, 8)
        self.scale = nn.Parameter(torch.ones(8))
        self.act = nn.GELU()
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(self, x)


def _refusal(model: nn.Module) -> str:
    with pytest.raises(AcertError) as err:
        bounds_form(model.eval(), SHAPE)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_a_forward_fx_cannot_trace_names_the_model_and_the_fix():
    message = _refusal(_WithBranch())
    assert message.startswith("torch.fx cannot trace _WithBranch.forward (")
    assert "move data-dependent control flow" in message and "nn.Sequential" in message
    x, y = torch.rand(2, *SHAPE), torch.tensor([0, 1])
    with pytest.raises(UnsupportedModelError, match=r"cannot trace _WithBranch\.forward"):
        margin_bounds(_WithBranch().eval(), x, y, 0.1)


@pytest.mark.parametrize(
    ("op", "named"),
    [
        (lambda m, x: m.out(torch.sigmoid(m.fc(x.flatten(1)))), "the operation torch.sigmoid"),
        (lambda m, x: m.out(m.act(m.fc(x.flatten(1)))), r"layer act (GELU)"),
        (lambda m, x: m.out(m.fc(x.flatten(1)) * 2), "the operation operator.mul"),
        (lambda m, x: m.out(m.fc(x.flatten(1)) + 1.0), "the operation operator.add"),
        (lambda m, x: m.out(m.fc(torch.flatten(x).view(2, 64))), "the operation torch.flatten"),
        (lambda m, x: m.out(m.fc(x.view(2, -1))), "the method .view()"),
    ],
)
def test_an_operation_without_a_kind_is_named_with_its_place(op, named):
    message = _refusal(_Op(op))
    assert message.startswith(f"{named} has no bound rule; supported layers are Normalize, ")
    assert "functional forms F.relu, F.leaky_relu, a + b, torch.cat(xs, dim)" in message
    assert "test_tracing.py:" in message and message.endswith("in _Op.forward")


def test_a_tensor_used_directly_and_a_last_layer_other_than_linear_are_refused():
    message = _refusal(_Op(lambda m, x: m.out(m.fc(x.flatten(1)) * m.scale)))
    assert "uses the tensor self.scale directly" in message
    message = _refusal(_Op(lambda m, x: F.relu(m.out(F.relu(m.fc(x.flatten(1)))))))
    assert message.startswith("the model's output must be an nn.Linear of the layer before it")
    x, y = torch.rand(2, *SHAPE), torch.tensor([0, 1])
    with pytest.raises(UnsupportedModelError, match=r"must be an nn\.Linear"):
        margin_bounds(_Op(lambda m, x: F.relu(m.out(m.fc(x.flatten(1))))).eval(), x, y, 0.1)


class _ModeDependent(nn.Module):
    """A forward that reads ``self.training`` while it runs: tracing fixes the branch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(torch.flatten(x, 1))
        return self.out(h if self.training else F.relu(h))


def test_a_graph_that_differs_from_the_model_is_refused_not_certified():
    message = _refusal(_ModeDependent())
    assert message.startswith("the traced graph of _ModeDependent computes another output than")
    assert "in train mode" in message and "refused, not certified" in message


class _InPlace(nn.Module):
    """conv, then ``step`` (the in-place write), then the last Linear."""

    def __init__(self, step, inplace_relu: bool = False) -> None:
        super().__init__()
        self.step = step
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.relu = nn.ReLU(inplace=inplace_relu)
        self.fc = nn.Linear(128, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.step(self, x), 1))


def _skip_after_relu_(m, x):
    h = m.conv(x)
    y = h.relu_()
    return y + h.abs().neg()


def _relu_after_an_earlier_reader(m, x):
    h = m.conv(x)
    return h.abs() + h.relu_()  # abs runs first, and autograd keeps h for its gradient


def _iadd_read_again(m, x):
    h = m.conv(x)
    skip = h
    h += m.conv(x).clamp(min=0).neg()
    return h + skip


def _inplace_module_before_skip(m, x):
    h = m.conv(x)
    return m.relu(h) + h


_INPUT = "the model's input, which the caller, the bounds and the attacks read again"


@pytest.mark.parametrize(
    ("step", "inplace_relu", "reader", "fix"),
    [
        (
            lambda m, x: m.conv(F.relu(x, inplace=True)),
            False,
            _INPUT,
            "use the out-of-place form (F.relu(x), x.relu(), x + y)",
        ),
        (_skip_after_relu_, False, "abs_1 (test_tracing.py:", "use the out-of-place form"),
        (_relu_after_an_earlier_reader, False, "abs", "out-of-place form"),
        (_iadd_read_again, False, "add (test_tracing.py:", "write x = x + y instead of x += y"),
        (
            _inplace_module_before_skip,
            True,
            "add (test_tracing.py:",
            "use nn.ReLU() instead of nn.ReLU(inplace=True)",
        ),
    ],
)
def test_an_in_place_write_whose_old_value_is_read_again_is_refused(
    step, inplace_relu, reader, fix
):
    with pytest.raises(UnsupportedModelError) as err:
        as_graph(_InPlace(step, inplace_relu).eval(), SHAPE)
    message = str(err.value)
    assert message.startswith("_InPlace.forward writes ") and " in place at " in message
    assert f"but {reader}" in message and "reads the old value" in message
    assert "`return " in message.split(" but ")[1] or reader == _INPUT  # the reader's line
    assert "test_tracing.py:" in message and fix in message


def _iadd_alone(m, x):
    h = m.conv(x)
    h += m.conv(x)
    return m.relu(h)


def test_in_place_writes_that_no_one_reads_back_are_traced_exactly():
    for model in (_InPlace(_iadd_alone, inplace_relu=True), _InPlace(_iadd_alone)):
        graph = as_graph(model.eval(), SHAPE)
        assert Add in _types(graph)
        x = torch.rand(3, *SHAPE)
        assert torch.equal(graph(x.clone()), model(x.clone()))
