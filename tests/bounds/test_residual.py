"""Residual blocks: the walk's fork and join, IBP and CROWN by hand, CROWN on patches through
blocks in the convolutional stage, and batch-norm statistics inside bodies."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import acert.bounds as bounds
from acert.bounds import clean_forward, input_box, margin_bounds
from acert.bounds.clean_pass import forward_with_stats
from acert.bounds.kinds import walk
from acert.models import Normalize, Residual

from .test_patches import _assert_patches_equal_dense

pytestmark = pytest.mark.usefixtures("single_thread")


def test_the_walk_makes_body_and_add_steps_reading_the_block_input():
    inner = Residual(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(4, 4), Residual(nn.Sequential(nn.ReLU(), inner)), nn.Linear(4, 2)
    )
    steps = walk(model)
    shape = [(step.kind.name, step.where, type(step.layer).__name__, step.inputs) for step in steps]
    assert shape == [
        ("Flatten", "0", "Flatten", (-1,)),
        ("Linear", "1", "Linear", (0,)),
        ("ReLU", "2.body.0", "ReLU", (1,)),
        ("Linear", "2.body.1.body.0", "Linear", (2,)),  # its batch-norm folded in
        ("Add", "2.body.1", "Residual", (2, 3)),  # x + body(x) of the inner block
        ("Add", "2", "Residual", (1, 4)),
        ("Linear", "3", "Linear", (5,)),
    ]
    assert steps[3].norm is inner.body[1] and steps[3].norm_where == "2.body.1.body.1"


def _cancelling_net() -> nn.Sequential:
    """``y = x + (1 - x) = 1``; logits ``(y_0, -0.5)``: margin 1.5 for any input."""
    body = nn.Linear(2, 2)
    last = nn.Linear(2, 2)
    with torch.no_grad():
        body.weight.copy_(-torch.eye(2))
        body.bias.fill_(1.0)
        last.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
        last.bias.copy_(torch.tensor([0.0, -0.5]))
    return nn.Sequential(Normalize([0.0, 0.0], [1.0, 1.0]), Residual(nn.Sequential(body)), last)


def test_ibp_adds_correlated_intervals_and_crown_follows_both_branches(exact_arithmetic):
    """IBP adds the intervals of x and 1 - x (width 2·2ε, sound but loose); CROWN's coefficients
    on the skip and through the body cancel at the fork: the exact margin."""
    model = _cancelling_net().eval()
    x, y = torch.tensor([[0.3, 0.6], [0.5, 0.5]]), torch.tensor([0, 0])
    eps = torch.tensor([0.1, 0.25])
    ibp = margin_bounds(model, x, y, eps, "ibp")
    torch.testing.assert_close(ibp, (1.5 - 2 * eps).view(2, 1))
    for method in ("crown-ibp", "crown"):
        torch.testing.assert_close(margin_bounds(model, x, y, eps, method), torch.full((2, 1), 1.5))


def test_sound_bounds_of_the_cancelling_block_stay_below_the_margin():
    """With the rounding allowances (the join's and the fork's), never above 1.5."""
    model = _cancelling_net().eval()
    x = torch.rand(64, 2, generator=torch.Generator().manual_seed(0))
    for method in bounds.METHODS:
        lb = margin_bounds(model, x, torch.zeros(64, dtype=torch.long), 1e-3, method)
        assert (lb < 1.5).all() and (lb > 1.5 - 1e-2).all()


def _residual_conv_net(seed: int = 0) -> nn.Sequential:
    """Residual blocks in the convolutional stage, one nested, one after an average pooling,
    each followed by a ReLU whose CROWN bounds run on patches through the block."""
    torch.manual_seed(seed)
    inner = Residual(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()))
    body = nn.Sequential(
        nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), inner,
        nn.Conv2d(3, 3, 3, padding=2, dilation=2),
    )  # fmt: skip
    model = nn.Sequential(
        Normalize([0.4, 0.5], [0.3, 0.2]),
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        Residual(body),
        nn.ReLU(),
        nn.AvgPool2d(3, stride=1, padding=1),
        Residual(nn.Sequential(nn.Conv2d(3, 3, (1, 3), padding=(0, 1), bias=False))),
        nn.ReLU(),
        nn.Conv2d(3, 2, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * 4 * 3, 3),
    )
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.3 * torch.randn(3, generator=g))
                m.running_var.copy_(0.5 + torch.rand(3, generator=g))
    return model.eval()


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_patches_through_residual_blocks_equal_dense(monkeypatch, mode):
    model = _residual_conv_net().train(mode == "train")
    x = torch.rand(3, 2, 9, 8, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2])
    stats = clean_forward(model, x, update_running_stats=False)[1]
    assert len(stats) == (2 if mode == "train" else 0)  # the body's batch-norm included
    box = input_box(x, torch.tensor([0.01, 0.05, 0.2]))
    _, pre = _assert_patches_equal_dense(monkeypatch, model, box, y, stats)
    assert len(pre) == 6  # every ReLU, the two inside bodies included


def test_batch_norm_statistics_inside_bodies():
    model = _residual_conv_net().train()
    x = torch.rand(5, 2, 9, 8, generator=torch.Generator().manual_seed(3))
    before = model[4].body[1].running_mean.clone()
    _, stats = clean_forward(model, x)
    assert model[4].body[1] in stats and not torch.equal(before, model[4].body[1].running_mean)
    model.train()
    expected = model(x)  # train mode: batch statistics, as clean_forward computes
    torch.testing.assert_close(clean_forward(model, x, update_running_stats=False)[0], expected)
    torch.testing.assert_close(forward_with_stats(model, x, stats), expected, atol=1e-5, rtol=0)
