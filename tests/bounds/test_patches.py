"""CROWN on patches (acert.bounds.patches): the same bounds as the dense backward pass on conv
nets of every geometry, the padding region at the image border, a trained-ish cnn7-tiny on
digits, soundness against sampled margins, gradients and chunking."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import acert.data
from acert.bounds import clean_forward, crown, input_box, margin_bounds, patches
from acert.bounds.crown import crown_margins, relu_relaxation
from acert.bounds.interval import Interval
from acert.bounds.kinds import walk
from acert.models import Normalize, create_model

pytestmark = pytest.mark.usefixtures("single_thread")

# (input shape, conv layers, batch-norm): 1 and 3 channels, odd sizes, stride 1/2, padding
# 0/1/2, kernels 2/3/5, no bias, dilation, groups; windows that outgrow the image (kernel 5);
# max pooling after a block ("pool": nn.MaxPool2d's arguments): non-overlapping, overlapping
# (stride < kernel), odd remainders cut off, dilation, then convolutions with padding
CASES = {
    "k3-s1-p1-odd": ((1, 7, 7), [dict(out_channels=3, kernel_size=3, padding=1)] * 3, True),
    "k3-s2-p0-nobias": (
        (3, 9, 8),
        [
            dict(out_channels=4, kernel_size=3, stride=2, bias=False),
            dict(out_channels=4, kernel_size=3, padding=1),
            dict(out_channels=3, kernel_size=2),
        ],
        True,
    ),
    "k2-s2-p1": (
        (3, 10, 11),
        [
            dict(out_channels=4, kernel_size=2, stride=2, padding=1),
            dict(out_channels=4, kernel_size=3, padding=1, bias=False),
            dict(out_channels=3, kernel_size=2, stride=2, padding=1),
        ],
        False,
    ),
    "k5-p2-outgrows": (
        (1, 9, 9),
        [
            dict(out_channels=3, kernel_size=5, padding=2),
            dict(out_channels=3, kernel_size=5, stride=2, padding=2),
            dict(out_channels=2, kernel_size=3, padding=1),
        ],
        True,
    ),
    "dilation-groups": (
        (2, 11, 10),
        [
            dict(out_channels=4, kernel_size=3, padding=2, dilation=2),
            dict(out_channels=4, kernel_size=3, stride=2, padding=1, groups=2),
            dict(out_channels=3, kernel_size=(3, 2), stride=(1, 2), padding=(1, 0)),
        ],
        True,
    ),
    "maxpool-k2": (
        (1, 11, 10),
        [
            dict(out_channels=3, kernel_size=3, padding=1, pool=dict(kernel_size=2)),
            dict(out_channels=4, kernel_size=3, padding=1),
            dict(out_channels=3, kernel_size=2),
        ],
        True,
    ),
    "maxpool-overlapping": (
        (3, 12, 11),
        [
            dict(out_channels=4, kernel_size=3, pool=dict(kernel_size=3, stride=2)),
            dict(out_channels=4, kernel_size=3, padding=1, pool=dict(kernel_size=2, stride=1)),
            dict(out_channels=3, kernel_size=2),
        ],
        False,
    ),
    "maxpool-dilation-outgrows": (
        (2, 9, 10),
        [
            dict(
                out_channels=3, kernel_size=3, padding=2,
                pool=dict(kernel_size=(2, 3), stride=1, dilation=(1, 2)),
            ),
            dict(out_channels=3, kernel_size=5, padding=2, pool=dict(kernel_size=2)),
            dict(out_channels=2, kernel_size=3, padding=1),
        ],
        True,
    ),
}  # fmt: skip


def _conv_net(in_shape, convs, batch_norm, seed=0) -> nn.Sequential:
    """Normalize (mean != 0, so that padding differs from a zero pixel), conv(-BN)-ReLU blocks,
    then Flatten, Linear-ReLU, Linear: both the patch and the dense path are used."""
    torch.manual_seed(seed)
    channels = in_shape[0]
    layers: list[nn.Module] = [Normalize([0.45] * channels, [0.3] * channels)]
    for conv in convs:
        layers.append(nn.Conv2d(channels, **{k: v for k, v in conv.items() if k != "pool"}))
        channels = conv["out_channels"]
        if batch_norm:
            layers.append(nn.BatchNorm2d(channels))
        layers.append(nn.ReLU())
        if "pool" in conv:
            layers.append(nn.MaxPool2d(**conv["pool"]))
    with torch.no_grad():
        features = nn.Sequential(*layers)(torch.zeros(1, *in_shape)).numel()
    layers += [nn.Flatten(), nn.Linear(features, 6), nn.ReLU(), nn.Linear(6, 4)]
    model = nn.Sequential(*layers)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.3 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.num_features, generator=g))
    return model.eval()


def _bounds_and_preactivations(monkeypatch, model, box, y, stats, use_patches):
    """Margin bounds and the pre-activation intervals CROWN relaxed, in ReLU order."""
    seen = []

    def recording(pre):
        seen.append(pre)
        return relu_relaxation(pre)

    monkeypatch.setattr("acert.bounds.activations.relu_relaxation", recording)
    lb = crown_margins(model, box, y, stats, use_patches=use_patches)
    monkeypatch.undo()
    return lb, seen


def _assert_same(actual, expected):
    """Equal up to rounding: 1e-5 relative, with the scale of the whole tensor near zero."""
    scale = float(expected.detach().abs().max()) + 1e-12
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


def _assert_patches_equal_dense(monkeypatch, model, box, y, stats=None):
    lb, pre = _bounds_and_preactivations(monkeypatch, model, box, y, stats, True)
    lb_dense, pre_dense = _bounds_and_preactivations(monkeypatch, model, box, y, stats, False)
    assert len(pre) == len(pre_dense)
    for ours, theirs in zip(pre, pre_dense, strict=True):
        _assert_same(ours.lower, theirs.lower)
        _assert_same(ours.upper, theirs.upper)
    _assert_same(lb, lb_dense)
    return lb, pre


@pytest.mark.parametrize(
    "name, mode",
    [(name, "eval") for name in CASES] + [(name, "train") for name in CASES if CASES[name][2]],
)
def test_patches_equal_dense_on_conv_nets(monkeypatch, name, mode):
    in_shape, convs, batch_norm = CASES[name]
    model = _conv_net(in_shape, convs, batch_norm).train(mode == "train")
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, *in_shape, generator=g)
    y = torch.tensor([0, 1, 3])
    stats = clean_forward(model, x, update_running_stats=False)[1]
    box = input_box(x, torch.tensor([0.01, 0.05, 0.15]))
    _assert_patches_equal_dense(monkeypatch, model, box, y, stats)


def test_conv_nets_use_the_patch_path(monkeypatch):
    """Every conv-stage ReLU with CROWN bounds goes through the patch path; the linear one not."""
    calls = []
    original = patches.preactivation_bounds

    def counting(net, end, ibp_bounds, undecided, budget):
        calls.append(end)
        return original(net, end, ibp_bounds, undecided, budget)

    monkeypatch.setattr(patches, "preactivation_bounds", counting)
    in_shape, convs, batch_norm = CASES["k3-s1-p1-odd"]
    model = _conv_net(in_shape, convs, batch_norm)
    x = torch.rand(2, *in_shape, generator=torch.Generator().manual_seed(2))
    crown_margins(model, input_box(x, 0.1), torch.tensor([0, 1]))
    relus = [step.index for step in walk(model) if isinstance(step.layer, nn.ReLU)]
    # the first ReLU's IBP bounds are exact (one affine map), the last follows a Linear
    assert calls == relus[1:-1]


def test_relus_after_a_max_pooling_use_the_patch_path(monkeypatch):
    """A MaxPool2d has a patch rule: the conv-stage ReLUs after it are bounded on patches, not
    by the dense pass (which took 25 s a digit on a small conv-maxpool net)."""
    calls, dense = [], []
    on_patches, densely = patches.preactivation_bounds, crown._dense_preactivation
    monkeypatch.setattr(
        patches, "preactivation_bounds", lambda net, end, *rest: calls.append(end) or
        on_patches(net, end, *rest),
    )  # fmt: skip
    monkeypatch.setattr(
        crown, "_dense_preactivation", lambda net, end, *rest: dense.append(end) or
        densely(net, end, *rest),
    )  # fmt: skip
    in_shape, convs, batch_norm = CASES["maxpool-overlapping"]
    model = _conv_net(in_shape, convs, batch_norm)
    x = torch.rand(2, *in_shape, generator=torch.Generator().manual_seed(2))
    crown_margins(model, input_box(x, 0.1), torch.tensor([0, 1]))
    steps = walk(model)
    relaxed = [step.index for step in steps if step.kind.relaxer is not None]
    pools = [step.index for step in steps if isinstance(step.layer, nn.MaxPool2d)]
    assert len(pools) == 2 and set(pools) < set(relaxed[1:-1])
    # the first ReLU's IBP bounds are exact; only the last, after the Linear, is dense
    assert calls == relaxed[1:-1] and dense == relaxed[-1:]


def test_single_value_normalize_on_patches(monkeypatch):
    """Normalize holding one mean/std for three channels broadcasts in the patch rules too."""
    torch.manual_seed(3)
    model = nn.Sequential(
        Normalize([0.5], [0.25]),
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 2, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, 3),
    ).eval()
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    _assert_patches_equal_dense(monkeypatch, model, input_box(x, 0.05), torch.tensor([0, 2]))


def _linear_conv_stage(seed=4) -> nn.Sequential:
    """Normalize with mean far from 0, conv (padding 2) + BN with large shifts, conv (padding 1):
    a zero pixel and a zero-padded input differ a lot, so any padding leak shows."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        Normalize([0.8, 0.2], [0.2, 0.3]),
        nn.Conv2d(2, 3, 3, padding=2),
        nn.BatchNorm2d(3),
        nn.Conv2d(3, 2, 3, stride=2, padding=1),
    )
    with torch.no_grad():
        model[2].running_mean.copy_(torch.tensor([-2.0, 1.5, 3.0]))
        model[2].bias.copy_(torch.tensor([4.0, -3.0, 2.0]))
        model[3].bias.copy_(torch.tensor([1.0, -2.0]))
    return model.eval()


def test_border_neurons_mask_the_padding_region(exact_arithmetic):
    """Every neuron of a conv stage without ReLUs, corners included, against its exact minimum
    over the box (value at the centre minus |gradient|·radius): windows that reach into the
    padding must not pick up the Normalize/BN shifts, biases or box values there."""
    model = _linear_conv_stage()
    x = torch.rand(2, 2, 7, 6, generator=torch.Generator().manual_seed(4))
    box = input_box(x, torch.tensor([0.1, 0.3]))
    net = crown._prepare(list(model), box, None, "crown", 2**20, True)
    out = model(box.centre)
    shape = tuple(out.shape[1:])
    rows = torch.arange(2).repeat_interleave(out[0].numel())
    neurons = torch.arange(out[0].numel()).repeat(2)
    windows = patches._neuron_windows(rows, neurons, shape, out)
    bias = torch.zeros(rows.numel(), 2)
    bounds = patches.lower_bound(net, len(net.steps), windows, bias)
    x_req = box.centre.clone().requires_grad_(True)
    flat = model(x_req).flatten(1)
    for row, neuron, bound in zip(rows.tolist(), neurons.tolist(), bounds, strict=True):
        (g,) = torch.autograd.grad(flat[row, neuron], x_req, retain_graph=True)
        spread = float((g[row].abs() * box.radius[row]).sum())
        value = float(flat[row, neuron].detach())
        torch.testing.assert_close(bound[0].item(), value - spread, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(-bound[1].item(), value + spread, atol=2e-5, rtol=1e-5)
    # and the same as the dense pass
    dense_A = torch.zeros(rows.numel(), 2, out[0].numel())
    dense_A[torch.arange(rows.numel()), 0, neurons] = 1.0
    dense_A[torch.arange(rows.numel()), 1, neurons] = -1.0
    dense = net.lower_bound(len(net.steps), dense_A.view(-1, 2, *shape), bias, rows)
    _assert_same(bounds, dense)


@pytest.fixture(scope="module")
def digits_model():
    """cnn7-tiny after 20 Adam steps of IBP training on digits (eps ramped to 0.05, about 3 s):
    at eps 0.05 a third to a half of its conv neurons are unstable and CROWN's margins are near
    0, as on a trained net. Returns the eval-mode model and 4 test digits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    x, y = acert.data.load("mnist5k", "train")
    torch.manual_seed(0)
    model = create_model("cnn7-tiny", (1, 28, 28), 10, (0.1307,), (0.3081,))
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for step in range(20):
        batch = torch.randint(0, x.shape[0], (64,), generator=g)
        logits, stats = clean_forward(model, x[batch])
        eps = 0.05 * min(1.0, step / 10)
        lb = margin_bounds(model, x[batch], y[batch], eps, "ibp", stats=stats)
        robust = torch.logsumexp(F.pad(-lb, (1, 0)), 1).mean()
        loss = F.cross_entropy(logits, y[batch]) + robust
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    torch.set_num_threads(threads)
    x_test, y_test = acert.data.load("mnist5k", "test")
    return model.eval(), x_test[:4], y_test[:4]


def _record_preactivation_calls(monkeypatch) -> list[tuple]:
    """(net, end, IBP bounds) of every CROWN intermediate-bound call, in order."""
    calls = []
    original = crown._crown_preactivation

    def recording(net, end, ibp_bounds, undecided, budget, use_patches):
        calls.append((net, end, ibp_bounds))
        return original(net, end, ibp_bounds, undecided, budget, use_patches)

    monkeypatch.setattr(crown, "_crown_preactivation", recording)
    return calls


def _only(pre: Interval, keep: torch.Tensor) -> Interval:
    """``pre`` with every neuron outside ``keep`` made stable (so neither pass bounds it)."""
    lower = torch.where(keep, pre.lower, torch.ones_like(pre.lower))
    upper = torch.where(keep, pre.upper, torch.ones_like(pre.upper))
    return Interval.from_bounds(lower, upper)


def _border(shape) -> torch.Tensor:
    """(B, C, H, W) mask of the first and last rows and columns."""
    border = torch.zeros(shape, dtype=torch.bool)
    border[:, :, [0, -1], :] = border[:, :, :, [0, -1]] = True
    return border


def _some_neurons(pre: Interval, generator: torch.Generator) -> torch.Tensor:
    """A mask of about 40 random unstable neurons per sample and every unstable neuron on the
    image border (windows reaching into the padding)."""
    unstable = (pre.lower < 0) & (pre.upper > 0)
    share = 40 / unstable.flatten(1).sum(1).clamp(min=1).view(-1, 1, 1, 1)
    keep = torch.rand(pre.shape, generator=generator) < share
    return (keep | _border(pre.shape)) & unstable


def test_patches_equal_dense_on_cnn7_tiny_digits(monkeypatch, digits_model, margins_at):
    """Every conv-stage layer of CROWN on 4 digits: the patch pass and the dense pass (given
    the same relaxations before the layer) on a sample of its unstable neurons, border ones
    included; the whole CROWN pass on one digit (the dense pass takes ~8 s a digit)."""
    model, x, y = digits_model
    box = input_box(x, 0.05)
    calls = _record_preactivation_calls(monkeypatch)
    lb = crown_margins(model, box, y)
    monkeypatch.undo()
    conv_calls = [call for call in calls if call[2].centre.dim() == 4]
    # the ReLU steps after the 2nd to 5th convolution (each folded with its batch-norm)
    assert [end for _, end, _ in conv_calls] == [4, 6, 8, 10]
    g = torch.Generator().manual_seed(0)
    border = 0
    for net, end, ibp_bounds in conv_calls:
        keep = _some_neurons(ibp_bounds, g)
        assert keep.sum() > 100
        border += int((keep & _border(keep.shape)).sum())
        pre = _only(ibp_bounds, keep)
        unstable = (pre.lower < 0) & (pre.upper > 0)
        ours = patches.preactivation_bounds(net, end, pre, unstable, 2**22)
        theirs = crown._dense_preactivation(net, end, pre, unstable, 2**24)
        _assert_same(ours.lower, theirs.lower)
        _assert_same(ours.upper, theirs.upper)
        assert (ours.lower[keep] > ibp_bounds.lower[keep] + 1e-3).float().mean() > 0.5
    assert border > 50
    lb_one, _ = _assert_patches_equal_dense(monkeypatch, model, input_box(x[:1], 0.05), y[:1])
    _assert_same(lb_one, lb[:1])
    # sound: below the margins of sampled points of the ball (corners included)
    u = torch.rand(4, 200, *x.shape[1:], generator=g)
    u[:, 100:] = u[:, 100:].round()
    points = box.lower.unsqueeze(1) + u * (2 * box.radius).unsqueeze(1)
    margins = margins_at(model, points.flatten(0, 1), y.repeat_interleave(200))
    assert (lb.repeat_interleave(200, 0) <= margins + 1e-5).all()


def test_patch_bounds_are_sound_for_sampled_inputs(monkeypatch, digits_model):
    """The conv-stage pre-activation bounds contain the pre-activations of sampled points."""
    model, x, y = digits_model
    box = input_box(x[:2], 0.1)
    _, pre = _bounds_and_preactivations(monkeypatch, model, box, y[:2], None, True)
    relus = [i for i, layer in enumerate(model) if isinstance(layer, nn.ReLU)]
    g = torch.Generator().manual_seed(1)
    u = torch.rand(2, 100, *x.shape[1:], generator=g)
    u[:, 50:] = u[:, 50:].round()
    points = (box.lower.unsqueeze(1) + u * (2 * box.radius).unsqueeze(1)).flatten(0, 1)
    for relu, interval in zip(relus, pre, strict=True):
        with torch.no_grad():
            h = model[:relu](points).view(2, 100, *interval.shape[1:])
        slack = 1e-5 * (1 + h.abs())
        assert (h >= interval.lower.unsqueeze(1) - slack).all()
        assert (h <= interval.upper.unsqueeze(1) + slack).all()


def test_gradients_through_patches_equal_dense():
    in_shape, convs, batch_norm = CASES["k3-s2-p0-nobias"]
    model = _conv_net(in_shape, convs, batch_norm)
    x = torch.rand(2, *in_shape, generator=torch.Generator().manual_seed(5))
    y = torch.tensor([1, 2])
    grads = []
    for use_patches in (True, False):
        model.zero_grad()
        crown_margins(model, input_box(x, 0.05), y, use_patches=use_patches).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for ours, theirs in zip(*grads, strict=True):
        _assert_same(ours, theirs)


@pytest.mark.parametrize("budget", [1, 50, 3000])
def test_patch_chunks_do_not_change_the_bounds(budget):
    in_shape, convs, batch_norm = CASES["k5-p2-outgrows"]
    model = _conv_net(in_shape, convs, batch_norm)
    x = torch.rand(3, *in_shape, generator=torch.Generator().manual_seed(6))
    box = input_box(x, torch.tensor([0.02, 0.1, 0.2]))
    y = torch.tensor([0, 1, 2])
    small = crown_margins(model, box, y, memory_budget=budget)
    _assert_same(small, crown_margins(model, box, y))


def test_patches_in_float64(monkeypatch):
    in_shape, convs, batch_norm = CASES["k2-s2-p1"]
    model = copy.deepcopy(_conv_net(in_shape, convs, batch_norm)).double()
    x = torch.rand(2, *in_shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    lb, _ = _assert_patches_equal_dense(monkeypatch, model, input_box(x, 0.1), torch.tensor([0, 3]))
    assert lb.dtype == torch.float64
