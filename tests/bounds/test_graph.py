"""Models as graphs (issue 19): a GraphNet with a projection shortcut, a concatenation of
branches and LeakyReLU under every engine; the same numbers for a chain and for a residual
block written as a graph; batch-norm folding, the in-place refusal and the sum's rounding
charge where several steps read a node."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from acert.bounds import METHODS, clean_forward, crown, input_box, margin_bounds, patches
from acert.bounds.clean_pass import forward_with_stats
from acert.bounds.combine import addition_error
from acert.bounds.kinds import check_shapes, walk
from acert.bounds.normalisation import random_batchnorm
from acert.bounds.rounding import step_errors
from acert.foundation.errors import AcertError, UnsupportedModelError
from acert.models import Add, Concat, GraphNet, Normalize, Residual
from acert.models.graph import INPUT
from tests.kit.exact import exact_min_margins
from tests.kit.nets import true_margins

from .test_patches import _assert_patches_equal_dense

pytestmark = pytest.mark.usefixtures("single_thread")


def _graph_net(seed: int = 0, leaky: float = 0.1) -> GraphNet:
    """A (2, 6, 6) input: stem conv-BN-ReLU; an Inception-like pair of branches (conv-BN-
    LeakyReLU and a 1x1 conv) joined along the channels and a ReLU; a stride-2 residual stage
    with a 1x1 stride-2 projection shortcut from the stem; ReLU, flatten, linear head."""
    torch.manual_seed(seed)
    nodes = [
        ("norm", Normalize([0.4, 0.5], [0.3, 0.2]), (INPUT,)),  # 0
        ("stem", nn.Conv2d(2, 3, 3, padding=1), (0,)),  # 1
        ("stem_bn", random_batchnorm(nn.BatchNorm2d(3)), (1,)),  # 2
        ("stem_relu", nn.ReLU(), (2,)),  # 3
        ("a", nn.Conv2d(3, 2, 3, padding=1), (3,)),  # 4
        ("a_bn", random_batchnorm(nn.BatchNorm2d(2)), (4,)),  # 5
        ("a_relu", nn.LeakyReLU(leaky), (5,)),  # 6
        ("b", nn.Conv2d(3, 1, 1), (3,)),  # 7
        ("cat", Concat(1), (6, 7)),  # 8
        ("cat_relu", nn.ReLU(), (8,)),  # 9
        ("down", nn.Conv2d(3, 4, 3, stride=2, padding=1), (9,)),  # 10
        ("shortcut", nn.Conv2d(3, 4, 1, stride=2), (3,)),  # 11
        ("add", Add(), (11, 10)),  # 12
        ("relu", nn.ReLU(), (12,)),  # 13
        ("flat", nn.Flatten(), (13,)),  # 14
        ("fc", nn.Linear(4 * 3 * 3, 6), (14,)),  # 15
        ("fc_relu", nn.LeakyReLU(leaky), (15,)),  # 16
        ("out", nn.Linear(6, 3), (16,)),  # 17
    ]
    return GraphNet(nodes).eval()


def _inputs(batch: int, seed: int) -> torch.Tensor:
    return torch.rand(batch, 2, 6, 6, generator=torch.Generator().manual_seed(seed))


def test_the_walk_reads_the_graph_and_folds_only_sole_readers():
    steps = walk(_graph_net())
    assert [step.where for step in steps][:5] == ["norm", "stem", "stem_relu", "a", "a_relu"]
    assert steps[1].norm_where == "stem_bn" and steps[3].norm_where == "a_bn"
    by_name = {step.where: step for step in steps}
    assert by_name["cat"].inputs == (by_name["a_relu"].index, by_name["b"].index)
    assert by_name["add"].inputs == (by_name["shortcut"].index, by_name["down"].index)
    # a conv read by a batch-norm and by another node keeps the batch-norm a step of its own
    conv, norm = nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1)
    shared = GraphNet([("conv", conv, (INPUT,)), ("bn", norm, (0,)), ("add", Add(), (0, 1))])
    assert [(step.where, step.norm) for step in walk(shared)] == [
        ("conv", None),
        ("bn", None),
        ("add", None),
    ]


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_patches_through_concat_and_projection_shortcuts_equal_dense(monkeypatch, mode):
    model = _graph_net().train(mode == "train")
    x, y = _inputs(3, 1), torch.tensor([0, 1, 2])
    stats = clean_forward(model, x, update_running_stats=False)[1]
    assert len(stats) == (2 if mode == "train" else 0)
    box = input_box(x, torch.tensor([0.01, 0.04, 0.2]))
    _, pre = _assert_patches_equal_dense(monkeypatch, model, box, y, stats)
    assert len(pre) == 3  # the conv-stage ReLUs (LeakyReLUs relax by their own rule)


def test_every_method_is_below_the_exact_minimum_and_the_clean_margins():
    model = _graph_net(seed=2)
    x = _inputs(2, 3)
    with torch.no_grad():
        y = model(x).argmax(1)
    eps = torch.tensor([0.01, 0.05])
    for method in METHODS:
        lb = margin_bounds(model, x, y, eps, method)
        for i in range(2):
            exact = torch.from_numpy(exact_min_margins(model, x[i], int(y[i]), float(eps[i])))
            assert (lb[i].double() <= exact + 1e-6 * (1 + exact.abs())).all(), (method, i)
        zero = margin_bounds(model, x, y, 0.0, method)
        with torch.no_grad():
            clean = true_margins(model(x), y)
        assert (zero <= clean).all()
        torch.testing.assert_close(zero, clean, atol=1e-4, rtol=1e-4)


def test_the_clean_pass_follows_the_graph():
    model = _graph_net(seed=4).train()
    x = _inputs(6, 5)
    expected = model(x)  # train mode: batch statistics
    logits, stats = clean_forward(copy.deepcopy(model), x, update_running_stats=False)
    torch.testing.assert_close(logits, expected)
    logits, stats = clean_forward(model, x, update_running_stats=False)
    assert len(stats) == 2
    torch.testing.assert_close(forward_with_stats(model, x, stats), expected, atol=1e-5, rtol=0)


def _as_graph(model: nn.Sequential) -> GraphNet:
    """The chain as a GraphNet, each residual block an explicit Add of its input and body."""
    nodes: list[tuple[str, nn.Module, tuple[int, ...]]] = []
    source = INPUT
    for i, layer in enumerate(model):
        if type(layer) is Residual:
            block_input = source
            for j, inner in enumerate(layer.body):
                nodes.append((f"{i}.body.{j}", inner, (source,)))
                source = len(nodes) - 1
            nodes.append((str(i), Add(), (block_input, source)))
        else:
            nodes.append((str(i), layer, (source,)))
        source = len(nodes) - 1
    return GraphNet(nodes).eval()


def test_a_chain_and_its_graph_give_the_same_bounds_bit_for_bit():
    torch.manual_seed(6)
    body = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), random_batchnorm(nn.BatchNorm2d(2)))
    model = nn.Sequential(
        Normalize([0.5], [0.25]), nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), Residual(body),
        nn.LeakyReLU(0.05), nn.Flatten(), nn.Linear(2 * 5 * 5, 3),
    ).eval()  # fmt: skip
    graph = _as_graph(model)
    x = torch.rand(3, 1, 5, 5, generator=torch.Generator().manual_seed(7))
    y = torch.tensor([0, 1, 2])
    for method in METHODS:
        assert torch.equal(
            margin_bounds(model, x, y, 0.03, method), margin_bounds(graph, x, y, 0.03, method)
        )


def test_concat_along_the_height_takes_the_dense_pass_and_is_sound():
    torch.manual_seed(8)
    nodes = [
        ("conv", nn.Conv2d(1, 2, 3, padding=1), (INPUT,)),
        ("relu", nn.ReLU(), (0,)),
        ("other", nn.Conv2d(1, 2, 3, stride=(2, 1), padding=1), (INPUT,)),
        ("cat", Concat(2), (1, 2)),
        ("relu2", nn.ReLU(), (3,)),
        ("flat", nn.Flatten(), (4,)),
        ("out", nn.Linear(2 * 6 * 4, 3), (5,)),
    ]
    model = GraphNet(nodes).eval()
    steps = walk(model)
    assert not patches.supports(steps[:4], (2, 6, 4))
    x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        y = model(x).argmax(1)
    for method in METHODS:
        lb = margin_bounds(model, x, y, 0.05, method)
        exact = torch.from_numpy(exact_min_margins(model, x[0], int(y[0]), 0.05))
        assert (lb[0].double() <= exact + 1e-6 * (1 + exact.abs())).all(), method
    along_width = GraphNet([*nodes[:3], ("cat", Concat(3), (1, 2)), *nodes[4:]])
    with pytest.raises(AcertError, match=r"layer cat \(Concat\) joins inputs of shapes"):
        check_shapes(along_width, (1, 4, 4))  # heights 4 and 2


def test_an_addition_of_two_shapes_is_refused_in_one_line():
    nodes = [
        ("a", nn.Conv2d(1, 2, 1), (INPUT,)),
        ("b", nn.Conv2d(1, 3, 1), (INPUT,)),
        ("add", Add(), (0, 1)),
        ("flat", nn.Flatten(), (2,)),
        ("out", nn.Linear(2 * 4 * 4, 2), (3,)),
    ]
    with pytest.raises(AcertError, match=r"layer add \(Add\) adds inputs of shapes"):
        check_shapes(GraphNet(nodes), (1, 4, 4))


@pytest.mark.parametrize(
    ("nodes", "reader"),
    [
        (  # the conv's output is read by the in-place ReLU and, later, by the sum
            [
                ("conv", nn.Linear(3, 3), (INPUT,)),
                ("relu", nn.ReLU(inplace=True), (0,)),
                ("fc", nn.Linear(3, 3), (1,)),
                ("add", Add(), (0, 2)),
                ("out", nn.Linear(3, 2), (3,)),
            ],
            r"layer relu \(ReLU\(inplace=True\)\) overwrites the output of layer conv "
            r"\(Linear\), which layer add \(Add\) reads again",
        ),
        (  # the model's input
            [
                ("flat", nn.Flatten(), (INPUT,)),
                ("relu", nn.LeakyReLU(0.1, inplace=True), (0,)),
                ("out", nn.Linear(3, 2), (1,)),
            ],
            r"layer relu \(LeakyReLU\(inplace=True\)\) overwrites the model's input",
        ),
    ],
)
def test_inplace_writes_another_node_reads_are_refused(nodes, reader):
    x, y = torch.rand(2, 3), torch.tensor([0, 1])
    with pytest.raises(UnsupportedModelError, match=reader):
        margin_bounds(GraphNet(nodes).eval(), x, y, 0.01, "ibp")


def test_an_inplace_write_read_by_no_one_else_is_allowed():
    nodes = [
        ("fc", nn.Linear(3, 3), (INPUT,)),
        ("relu", nn.ReLU(inplace=True), (0,)),
        ("a", nn.Linear(3, 3), (1,)),
        ("b", nn.Linear(3, 3), (1,)),
        ("add", Add(), (2, 3)),
        ("out", nn.Linear(3, 2), (4,)),
    ]
    x, y = torch.rand(2, 3), torch.tensor([0, 1])
    margin_bounds(GraphNet(nodes).eval(), x, y, 0.01, "crown")


def test_a_node_read_by_k_steps_is_charged_the_rounding_of_a_sum_of_k():
    nodes = [
        ("fc", nn.Linear(3, 3), (INPUT,)),
        ("a", nn.Linear(3, 3), (0,)),
        ("b", nn.Linear(3, 3), (0,)),
        ("ab", Add(), (1, 2)),
        ("abc", Add(), (3, 0)),
        ("out", nn.Linear(3, 2), (4,)),
    ]
    steps = walk(GraphNet(nodes))
    box = input_box(torch.rand(2, 3), 0.1)
    _, sums = step_errors(steps, box, None)
    assert sorted(sums) == [0]  # fc's output: read by a, b and abc
    seen = []
    crown.ibp.program(steps, None, True).run(box, observe=lambda s, _, out: seen.append(out))
    expected = addition_error(seen[0], 3)
    assert torch.equal(sums[0].elementwise, expected.elementwise)
    assert (expected.elementwise > addition_error(seen[0], 2).elementwise).all()
