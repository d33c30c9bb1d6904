"""In-place layers: refused where the forward pass reads the tensor they overwrite (a residual
block's input, the model's input, a ReLU's output that autograd keeps), through layers that
pass their input on as it is or as a view; allowed, and exact, where no one reads it again."""

import pytest
import torch
from torch import nn

import acert
import acert.bounds as bounds
from acert.bounds import clean_forward, margin_bounds
from acert.foundation.errors import UnsupportedModelError
from acert.models import Residual
from acert.radius import radius_search

METHODS = tuple(bounds.METHODS)


def _preactivation(inplace: bool) -> nn.Sequential:
    """``z = x - (0.5, 2)``, ``h = z + body(relu(z))`` with a zero body, margin
    ``0.1 - h_1 - h_2``: with x_2 <= 1, z_2 <= -1, so the margin is >= 1.1 - z_1 > 0 on the
    whole box. The in-place ReLU overwrites z before the sum reads it: the model computes
    ``0.1 - relu(z_1) - relu(z_2)``, which flips at x_1 > 0.6."""
    first, body, last = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        first.weight.copy_(torch.eye(2))
        first.bias.copy_(torch.tensor([-0.5, -2.0]))
        body.weight.zero_()
        body.bias.zero_()
        last.weight.copy_(torch.tensor([[-1.0, -1.0], [0.0, 0.0]]))
        last.bias.copy_(torch.tensor([0.1, 0.0]))
    block = Residual(nn.Sequential(nn.ReLU(inplace=inplace), body))
    return nn.Sequential(first, block, last).eval()


def test_an_inplace_relu_at_the_start_of_a_residual_body_is_refused():
    """The pre-activation block: every method bounds ``x + body(relu(x))`` and certifies the
    whole cap, which is what the code before the refusal reported for the in-place model too
    (the bounds never looked at ``inplace``); its own forward pass flips at 0.11."""
    x, y, cap = torch.tensor([[0.5, 0.5]]), torch.tensor([0]), 0.4
    plain, overwriting = _preactivation(False), _preactivation(True)
    for method in METHODS:
        assert radius_search(plain, x, y, cap, method).radius.item() == pytest.approx(cap)
    assert overwriting(x.clone()).argmax(1).item() == 0
    flipped = torch.tensor([[0.61, 0.5]])  # 0.11 from x, inside the certified radius
    assert overwriting(flipped.clone()).argmax(1).item() == 1
    assert plain(flipped).argmax(1).item() == 0
    for method in METHODS:
        with pytest.raises(
            UnsupportedModelError, match=r"layer 1\.body\.0 \(ReLU\(inplace=True\)\)"
        ):
            radius_search(overwriting, x, y, cap, method)
        with pytest.raises(UnsupportedModelError, match=r"use nn\.ReLU\(\) instead of"):
            margin_bounds(overwriting, x, y, 0.1, method)
    with pytest.raises(UnsupportedModelError, match="input of residual block 1"):
        acert.certify(overwriting, (x, y), eps_max=cap, progress=False)
    with pytest.raises(UnsupportedModelError, match="inplace=True"):
        clean_forward(overwriting.train(), x)
    with pytest.raises(UnsupportedModelError, match="inplace=True"):
        acert.fit(overwriting, (x, y), eps_max=cap, epochs=1, progress=False)


def _block(*head: nn.Module) -> nn.Sequential:
    body = nn.Sequential(*head, nn.Linear(3, 3))
    return nn.Sequential(nn.Linear(3, 3), Residual(body), nn.Linear(3, 2)).eval()


@pytest.mark.parametrize(
    ("model", "where", "reader"),
    [
        (_block(nn.Identity(), nn.ReLU(inplace=True)), r"1\.body\.1", "residual block 1"),
        (_block(nn.Dropout(0.2), nn.ReLU(inplace=True)), r"1\.body\.1", "residual block 1"),
        (_block(nn.Flatten(), nn.ReLU(inplace=True)), r"1\.body\.1", "residual block 1"),
        (_block(nn.Dropout(0.2, inplace=True)), r"1\.body\.0", "residual block 1"),
        (
            nn.Sequential(
                nn.Linear(3, 3),
                Residual(nn.Sequential(nn.Linear(3, 3), Residual(_block(nn.ReLU(True))[1].body))),
                nn.Linear(3, 2),
            ),
            r"1\.body\.1\.body\.0",
            r"residual block 1\.body\.1,",
        ),
        (
            nn.Sequential(
                nn.Linear(3, 3),
                Residual(nn.Sequential(nn.Identity(), _block(nn.ReLU(True))[1])),
                nn.Linear(3, 2),
            ),
            r"1\.body\.1\.body\.0",
            r"residual block 1\.body\.1,",
        ),
        (nn.Sequential(nn.ReLU(inplace=True), nn.Linear(3, 2)), "0", "the model's input"),
        (nn.Sequential(nn.Flatten(), nn.ReLU(True), nn.Linear(3, 2)), "1", "the model's input"),
        (
            nn.Sequential(
                nn.Linear(3, 3), nn.ReLU(), nn.Identity(), nn.ReLU(True), nn.Linear(3, 2)
            ),
            "3",
            r"output of layer 1 \(ReLU\), which autograd keeps",
        ),
    ],
)
def test_observable_inplace_writes_are_refused_through_aliases_and_nested_blocks(
    model, where, reader
):
    x, y = torch.rand(2, 3), torch.tensor([0, 1])
    with pytest.raises(UnsupportedModelError, match=rf"layer {where} .*overwrites .*{reader}"):
        margin_bounds(model.eval(), x, y, 0.01, "ibp")
    with pytest.raises(UnsupportedModelError, match="inplace=True"):
        bounds.clean_pass.check_supported(model)


def test_dropout_is_named_with_its_probability_in_the_fix():
    with pytest.raises(
        UnsupportedModelError,
        match=r"nn\.Dropout\(0\.2\) instead of nn\.Dropout\(0\.2, inplace=True\)",
    ):
        bounds.clean_pass.check_supported(_block(nn.Dropout(0.2, inplace=True)))


def _harmless(inplace: bool) -> nn.Sequential:
    torch.manual_seed(3)
    body = nn.Sequential(
        nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(inplace=inplace),
        nn.Conv2d(2, 2, 3, padding=1),
    )  # fmt: skip
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(inplace=inplace), Residual(body),
        nn.ReLU(inplace=inplace), nn.Flatten(), nn.Linear(32, 8), nn.ReLU(inplace=inplace),
        nn.Dropout(0.3), nn.Linear(8, 3),
    )  # fmt: skip
    with torch.no_grad():
        norm = body[1]
        norm.running_mean.copy_(torch.tensor([0.1, -0.2]))
        norm.running_var.copy_(torch.tensor([0.5, 2.0]))
    return model


def test_inplace_layers_that_write_fresh_tensors_are_allowed_and_exact():
    """After a Conv2d, a batch-norm, a residual sum or a Linear nothing reads the old values:
    the model, its clean pass with batch statistics, its gradients and every bound are those of
    the same model without ``inplace``."""
    x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    plain, overwriting = _harmless(False), _harmless(True)
    overwriting.load_state_dict(plain.state_dict())
    outputs = []
    for model in (plain, overwriting):
        model.train()
        torch.manual_seed(0)  # the same Dropout masks
        logits, stats = clean_forward(model, x, update_running_stats=False)
        logits.sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.eval()
        margins = [margin_bounds(model, x, y, 0.02, method) for method in METHODS]
        radii = radius_search(model, x, y, 0.1, "crown").radius
        outputs.append((model(x), logits, list(stats.values()), grads, margins, radii))
    for ours, theirs in zip(*outputs, strict=True):
        for a, b in zip(_flat(ours), _flat(theirs), strict=True):
            assert torch.equal(a, b)


def _flat(value):
    if isinstance(value, torch.Tensor):
        return [value]
    return [t for item in value for t in _flat(item)]
