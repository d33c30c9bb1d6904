"""Supported layers, batch-norm semantics and clean_forward."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import acert.bounds as bounds
from acert.bounds import clean_forward, margin_bounds
from acert.foundation.errors import AcertError, UnsupportedModelError
from acert.models import Normalize, Residual, cnn7, mlp, resnet
from acert.radius import radius_search

pytestmark = pytest.mark.usefixtures("single_thread")

METHODS = tuple(bounds.METHODS)


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message and "\n" not in message
    return message


class _LeakyReLU(nn.ReLU):
    """A subclass of a supported layer with a different function: traced into its forward."""

    def forward(self, x):
        return nn.functional.leaky_relu(x, 0.1)


class _Wrapper(nn.Module):
    def __init__(self, features: int = 16):
        super().__init__()
        self.body = nn.Sequential(Normalize([0.5], [0.5]), nn.Flatten(), nn.Linear(features, 3))

    def forward(self, x):
        return self.body(x)


def _head(*middle: nn.Module, out: nn.Module | None = None) -> nn.Sequential:
    return nn.Sequential(Normalize([0.5], [0.5]), *middle, out or nn.Linear(4, 3))


def _pooled(pool: nn.Module) -> nn.Sequential:
    return _head(nn.Conv2d(1, 1, 1), pool, nn.Flatten())


UNSUPPORTED = [
    (_pooled(nn.MaxPool2d(2, padding=1)), r"layer 2 \(MaxPool2d\) pads with -inf"),
    (_pooled(nn.MaxPool2d(3, ceil_mode=True)), r"layer 2 \(MaxPool2d\) uses ceil_mode=True"),
    (_pooled(nn.MaxPool2d(2, return_indices=True)), "return_indices"),
    (_pooled(nn.AvgPool2d(3, ceil_mode=True)), r"layer 2 \(AvgPool2d\) uses ceil_mode=True"),
    (_pooled(nn.AvgPool2d(2, divisor_override=3)), "divisor_override=3"),
    (_pooled(nn.AvgPool2d(3, padding=1, count_include_pad=False)), "count_include_pad=False"),
    (_pooled(nn.Dropout2d(0.1)), r"layer 2 \(Dropout2d\) has no bound rule"),
    (
        _head(nn.Flatten(), nn.Linear(16, 4), Residual(nn.Sequential(nn.Linear(4, 4), nn.Tanh()))),
        r"layer 3.body.1 \(Tanh\) has no bound rule",
    ),
    (_head(nn.Flatten(), nn.Linear(16, 4), Residual(nn.Linear(4, 4))), "non-empty nn.Sequential"),
    (_head(nn.Flatten(), nn.Linear(16, 4), Residual(nn.Sequential())), "non-empty nn.Sequential"),
    (_head(nn.Flatten(), nn.Linear(16, 4), nn.Tanh()), "Tanh"),
    (_head(nn.Flatten(), nn.Linear(16, 4), out=nn.ReLU()), "ReLU"),
    (nn.Sequential(), "empty nn.Sequential"),
    (_head(nn.Conv2d(1, 1, 3, padding="same"), nn.Flatten(), nn.Linear(16, 4)), "padding"),
    (_head(nn.Conv2d(1, 1, 3, padding="valid"), nn.Flatten(), nn.Linear(4, 4)), "padding"),
    (_head(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"), nn.Flatten()), "reflect"),
]


@pytest.mark.parametrize("model, name", UNSUPPORTED)
def test_unsupported_models_are_named_in_one_line(model, name):
    x, y = torch.rand(2, 1, 4, 4), torch.tensor([0, 1])
    for method in METHODS:
        with pytest.raises(UnsupportedModelError) as err:
            margin_bounds(model, x, y, 0.1, method)
        assert re.search(name, _one_line(err))
    with pytest.raises(UnsupportedModelError) as err:
        radius_search(model, x, y, 0.1)
    assert re.search(name, _one_line(err))


@pytest.mark.parametrize(
    "model, same",
    [
        (  # a subclass of a kind with a forward of its own: traced, not taken for its base
            _head(nn.Flatten(), nn.Linear(16, 4), _LeakyReLU()),
            _head(nn.Flatten(), nn.Linear(16, 4), nn.LeakyReLU(0.1)),
        ),
        (  # a Sequential inside the chain
            _head(nn.Flatten(), nn.Linear(16, 4), nn.Sequential(nn.ReLU())),
            _head(nn.Flatten(), nn.Linear(16, 4), nn.ReLU()),
        ),
        (_Wrapper(), None),  # a module whose forward calls a Sequential
    ],
)
def test_modules_of_ones_own_are_traced_and_bounded_as_what_they_compute(model, same):
    torch.manual_seed(0)
    x, y = torch.rand(2, 1, 4, 4), torch.tensor([0, 1])
    if same is None:
        same = model.body
    else:
        same.load_state_dict(model.state_dict())
    for method in METHODS:
        assert torch.equal(
            margin_bounds(model, x, y, 0.1, method), margin_bounds(same, x, y, 0.1, method)
        )


def test_a_traced_model_whose_layers_do_not_fit_the_input_says_so_in_one_line():
    with pytest.raises(AcertError) as err:
        margin_bounds(_Wrapper(features=4), torch.rand(2, 1, 4, 4), torch.tensor([0, 1]), 0.1)
    assert _one_line(err) == (
        "input of shape (1, 4, 4) does not fit the model: "
        "mat1 and mat2 shapes cannot be multiplied (2x16 and 4x3)"
    )


@pytest.mark.parametrize(
    "body, shapes",
    [
        (nn.Sequential(nn.Linear(4, 2)), r"\(2,\) to its input of shape \(4,\)"),
        (nn.Sequential(nn.Conv2d(1, 1, 3, stride=2, padding=1)), r"\(1, 2, 2\) to .* \(1, 4, 4\)"),
    ],
)
def test_a_residual_body_that_changes_the_shape_is_refused(body, shapes):
    if isinstance(body[0], nn.Linear):
        model = _head(nn.Flatten(), nn.Linear(16, 4), Residual(body), out=nn.Linear(4, 3))
    else:
        model = _head(Residual(body), nn.Flatten(), out=nn.Linear(16, 3))
    x, y = torch.rand(2, 1, 4, 4), torch.tensor([0, 1])
    for method in METHODS:
        with pytest.raises(AcertError) as err:
            margin_bounds(model, x, y, 0.1, method)
        message = _one_line(err)
        assert "(Residual) adds its body's output of shape" in message
        assert re.search(shapes, message), message


def test_registered_models_are_supported():
    for model in (
        cnn7((3, 9, 9), 4, [0.4] * 3, [0.2] * 3, width=2, linear_width=6, last_stride=2),
        resnet((3, 9, 9), 4, [0.4] * 3, [0.2] * 3, width=2, linear_width=6),
        mlp((1, 3, 3), 4, [0.1], [0.3], hidden=(5, 5)),
    ):
        x = torch.rand(3, *((3, 9, 9) if model[1].__class__ is nn.Conv2d else (1, 3, 3)))
        for method in METHODS:
            lb = margin_bounds(model.eval(), x, torch.tensor([0, 1, 3]), 0.01, method)
            assert lb.shape == (3, 3) and torch.isfinite(lb).all()


def test_eval_mode_uses_running_stats(tiny_net, margins_at, exact_arithmetic):
    model, shape = tiny_net("cnn-bn", seed=0)
    x = torch.rand(4, *shape, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0])
    before = {m: margin_bounds(model, x, y, 0.05, m) for m in METHODS}
    # the batch plays no role in eval mode: one row alone gives its bound
    for method in METHODS:
        torch.testing.assert_close(
            margin_bounds(model, x[1:2], y[1:2], 0.05, method), before[method][1:2]
        )
    with torch.no_grad():
        model[2].running_mean += 0.5
        model[5].running_var *= 2
    for method in METHODS:
        after = margin_bounds(model, x, y, 0.05, method)
        assert (after - before[method]).abs().max() > 1e-3, method
        # eps = 0 gives the clean margins of the model with its new running statistics
        clean = margin_bounds(model, x, y, 0.0, method)
        torch.testing.assert_close(clean, margins_at(model, x, y), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["mlp-bn", "cnn-bn"])
def test_train_mode_bounds_need_the_clean_batch_stats(tiny_net, name):
    model, shape = tiny_net(name, seed=1)
    model.train()
    x = torch.rand(6, *shape, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    buffers = copy.deepcopy({k: v.clone() for k, v in model.state_dict().items()})
    _, stats = clean_forward(model, x, update_running_stats=False)
    assert set(stats) == {m for m in model if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)}
    eps = torch.tensor([0.0, 0.01, 0.03, 0.1, 0.2, 0.5])
    for method in METHODS:
        # without statistics no bound holds for model(x), which depends on the whole batch
        with pytest.raises(UnsupportedModelError, match=r"model\.eval"):
            margin_bounds(model, x, y, eps, method)
        explicit = margin_bounds(model, x, y, eps, method, stats=stats)
    # nothing above touched the running statistics (nor the batch counter)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, buffers[key], atol=0, rtol=0, msg=key)
    assert model.training
    # other statistics give other bounds (the stats argument is used)
    other = {m: (mean + 0.3, var * 1.5) for m, (mean, var) in stats.items()}
    assert (margin_bounds(model, x, y, 0.05, "ibp", stats=other) - explicit).abs().max() > 1e-3
    # the running statistics play no role in train mode
    with torch.no_grad():
        for m in stats:
            m.running_mean += 1.0
    torch.testing.assert_close(margin_bounds(model, x, y, eps, "crown", stats=stats), explicit)


def test_train_mode_bounds_depend_on_the_whole_batch(tiny_net):
    model, shape = tiny_net("mlp-bn", seed=2)
    model.train()
    x = torch.rand(6, *shape, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    stats = clean_forward(model, x, update_running_stats=False)[1]
    half_stats = clean_forward(model, x[:3], update_running_stats=False)[1]
    full = margin_bounds(model, x, y, 0.05, "ibp", stats=stats)
    half = margin_bounds(model, x[:3], y[:3], 0.05, "ibp", stats=half_stats)
    assert (full[:3] - half).abs().max() > 1e-4
    # the rows of the full batch, with the full batch's statistics, are reproduced
    torch.testing.assert_close(
        margin_bounds(model, x[:3], y[:3], 0.05, "ibp", stats=stats), full[:3]
    )


@pytest.mark.parametrize("name", ["mlp-bn", "cnn-bn", "cnn"])
def test_clean_forward_logits_equal_the_model(tiny_net, name):
    model, shape = tiny_net(name, seed=3)
    x = torch.rand(5, *shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, stats = clean_forward(model, x)
        torch.testing.assert_close(logits, model(x))
    assert stats == {}
    model.train()
    reference = copy.deepcopy(model)
    with torch.no_grad():
        expected = reference(x)  # updates the copy's running stats
        logits, stats = clean_forward(model, x)  # updates the model's the same way
    torch.testing.assert_close(logits, expected)
    for a, b in zip(model.state_dict().values(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    # the statistics are the clean batch's mean and biased variance at each batch-norm
    h = x
    with torch.no_grad():
        for layer, ref in zip(model, copy.deepcopy(model), strict=True):
            if layer in stats:
                dims = [0, *range(2, h.dim())]
                torch.testing.assert_close(stats[layer][0], h.mean(dims))
                torch.testing.assert_close(stats[layer][1], h.var(dims, unbiased=False))
            h = ref(h)
    # without updates: same logits and statistics, running stats untouched
    frozen = copy.deepcopy(model.state_dict())
    logits2, stats2 = clean_forward(model, x, update_running_stats=False)
    torch.testing.assert_close(logits2, logits)
    for layer in stats:
        torch.testing.assert_close(stats2[layer][0], stats[layer][0])
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, frozen[key], atol=0, rtol=0)
