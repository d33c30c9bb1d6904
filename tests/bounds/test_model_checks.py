"""Models whose forward pass is not what the bounds follow are refused when certifying (red-team
cases 3 and 4): a Sequential subclass whose own forward computes what no kind bounds (it is
traced, :mod:`acert.bounds.tracing`, and the operation named), a forward replaced on the
instance, forward hooks (on any module, those inside residual blocks included), batch-norm that
normalises with the current batch, and Dropout in train mode."""

import pytest
import torch
from torch import nn

import acert.evaluation.evaluate
from acert.bounds import METHODS, margin_bounds
from acert.evaluation.evaluate import EvaluationSettings, evaluate
from acert.foundation.errors import UnsupportedModelError
from acert.models import Residual
from acert.radius import radius_search


class Negated(nn.Sequential):
    """The red team's model: the layers' logits, negated."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -super().forward(x)


def _layers() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)]


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(6, 1, 2, 2, generator=g), torch.arange(6) % 3


def _settings(bound: str) -> EvaluationSettings:
    return EvaluationSettings(0.5, (0.1,), (bound,), pgd_steps=0)


def _certifying_calls(model: nn.Module) -> list:
    x, y = _data()
    calls = []
    for method in METHODS:
        calls.append(lambda m=method: margin_bounds(model, x, y, 0.1, m))
        calls.append(lambda m=method: radius_search(model, x, y, 0.5, m))
        calls.append(lambda m=method: evaluate(model, x, y, _settings(m)))
    return calls


def test_a_sequential_subclass_with_its_own_forward_is_refused():
    for call in _certifying_calls(Negated(*_layers()).eval()):
        with pytest.raises(
            UnsupportedModelError, match=r"operator\.neg has no bound rule.* in Negated\.forward"
        ):
            call()


def test_a_forward_replaced_on_the_instance_is_refused():
    model = nn.Sequential(*_layers()).eval()
    model.forward = lambda x: -nn.Sequential.forward(model, x)
    for call in _certifying_calls(model):
        with pytest.raises(UnsupportedModelError, match="replaced forward on the model"):
            call()


def _with_residual() -> nn.Sequential:
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 8), Residual(body), nn.ReLU(), nn.Linear(8, 3))


class _DoubledResidual(Residual):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 2 * self.body(x)


def test_a_residual_block_that_computes_something_else_is_refused():
    model = _with_residual().eval()
    model[2] = _DoubledResidual(model[2].body)
    for call in _certifying_calls(model):
        with pytest.raises(
            UnsupportedModelError,
            match=r"operator\.mul has no bound rule.*test_model_checks\.py:\d+ `return x \+ 2",
        ):
            call()


@pytest.mark.parametrize("where", ["body layer", "body", "block"])
def test_forward_hooks_inside_residual_blocks_are_refused(where):
    model = _with_residual().eval()
    flip = lambda module, inputs, output: -output  # noqa: E731
    block = model[2]
    module = {"body layer": block.body[2], "body": block.body, "block": block}[where]
    handle = module.register_forward_hook(flip)
    name = {"body layer": "2.body.2", "body": "2.body", "block": "2"}[where]
    try:
        for call in _certifying_calls(model):
            with pytest.raises(UnsupportedModelError, match=rf"hooks .* on layer {name} \("):
                call()
    finally:
        handle.remove()
    margin_bounds(model, *_data(), 0.1)


@pytest.mark.parametrize("method", list(METHODS))
def test_dropout_in_train_mode_is_refused(method):
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.2), nn.ReLU())
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), Residual(body), nn.Linear(8, 3)).train()
    x, y = _data()
    for call in (
        lambda: margin_bounds(model, x, y, 0.1, method),
        lambda: radius_search(model, x, y, 0.5, method),
    ):
        with pytest.raises(UnsupportedModelError) as err:
            call()
        message = str(err.value)
        assert "\n" not in message
        assert (
            message.startswith("layer 2.body.1 (Dropout) drops inputs")
            and "model.eval()" in message
        )
    evaluate(model, x, y, _settings(method))  # evaluate puts it in eval mode: the identity
    # p = 0 drops nothing, in any mode
    body[1].p = 0.0
    margin_bounds(model.train(), x, y, 0.1, method)


@pytest.mark.parametrize("where", ["model", "layer", "pre", "global"])
def test_forward_hooks_are_refused(where):
    model = nn.Sequential(*_layers()).eval()
    flip = lambda module, inputs, output: -output  # noqa: E731
    if where == "model":
        handle = model.register_forward_hook(flip)
    elif where == "layer":
        handle = model[3].register_forward_hook(flip)
    elif where == "pre":
        handle = model[1].register_forward_pre_hook(lambda module, inputs: (2 * inputs[0],))
    else:
        handle = nn.modules.module.register_module_forward_hook(flip)
    try:
        for call in _certifying_calls(model):
            with pytest.raises(UnsupportedModelError, match="hook"):
                call()
    finally:
        handle.remove()
    margin_bounds(model, *_data(), 0.1)  # without the hook it certifies again


@pytest.mark.parametrize("compile_with", [torch.jit.script, torch.jit.trace])
def test_a_torchscript_module_is_refused_by_name(compile_with):
    model = nn.Sequential(*_layers()).eval()
    x, _ = _data()
    compiled = compile_with(model) if compile_with is torch.jit.script else compile_with(model, x)
    for call in _certifying_calls(compiled):
        with pytest.raises(UnsupportedModelError, match="TorchScript module"):
            call()


def _with_batchnorm(track_running_stats: bool) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(4, 8),
        nn.BatchNorm1d(8, track_running_stats=track_running_stats),
        nn.ReLU(),
        nn.Linear(8, 3),
    )


@pytest.mark.parametrize("method", list(METHODS))
def test_batch_norm_with_batch_statistics_is_refused(method):
    x, y = _data()
    train_mode = _with_batchnorm(True).train()
    for call in (
        lambda: margin_bounds(train_mode, x, y, 0.1, method),
        lambda: radius_search(train_mode, x, y, 0.5, method),
        lambda: radius_search(train_mode, x[:1], y[:1], 0.5, method),  # model(x) would raise
    ):
        with pytest.raises(UnsupportedModelError, match=r"layer 2 \(BatchNorm1d\).*model.eval"):
            call()
    untracked = _with_batchnorm(False).eval()
    with pytest.raises(UnsupportedModelError, match="track_running_stats=True"):
        evaluate(untracked, x, y, _settings(method))
    # the same network with running statistics in eval mode certifies
    evaluate(_with_batchnorm(True).eval(), x, y, _settings(method))


def test_a_sample_counts_as_certified_only_where_the_model_classifies_it(monkeypatch):
    """Even a bound that certified everything could not make certified accuracy exceed clean
    accuracy: evaluate counts a sample only where the model's forward pass is right."""
    x, y = _data()
    model = nn.Sequential(*_layers()).eval()
    monkeypatch.setattr(
        acert.evaluation.evaluate,
        "certified_by_any",
        lambda m, xb, yb, eps, bounds: torch.ones_like(yb) > 0,
    )
    result = evaluate(model, x, y, _settings("ibp"))
    assert result.clean_accuracy < 1
    assert result.certified_accuracy[0.1] == pytest.approx(result.clean_accuracy)
