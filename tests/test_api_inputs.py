"""What the Python API does with the inputs of issue 17, item 4: each certifies soundly in the
arithmetic the model runs in, or is refused in one line naming the problem and the fix.

Float64 models fit and certify in float64; float16/bfloat16 models and ``torch.autocast`` are
refused; a device the build lacks, a model that cannot run on the input, a model with nothing
to train, bad arguments of ``ACERTLoss`` and clean-batch statistics that would hide a
train-mode layer get one line; ``fit`` inside ``torch.no_grad()`` trains; ``bound="best"``
means in Python what ``acert certify --bound best`` means."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import acert
from acert.bounds import margin_bounds
from acert.foundation.errors import AcertError
from acert.models import Normalize, Residual
from acert.radius import KnownBatch, radius_search
from acert.radius.attacks import pgd_attack

pytestmark = pytest.mark.usefixtures("single_thread")


def raises(call, *fragments: str) -> str:
    """The one-line AcertError of ``call()``; every fragment is in its message."""
    with pytest.raises(AcertError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def _images(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 6, 6, generator=generator), torch.arange(n) % 3


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 3)).eval()


def _fit(model: nn.Module, data=None, **options):
    return acert.fit(model, data or _images(), eps_max=0.1, epochs=1, progress=False, **options)


# --- dtypes ---------------------------------------------------------------------------------


def test_a_float64_network_fits_and_certifies_in_float64_and_its_radii_hold_against_pgd():
    """as_imageset used to cast every input to float32, so a float64 model could not be fitted
    (a dtype clash inside the loop) nor certified; both now run in float64, with float64's
    rounding allowances, and no PGD point strictly inside a radius flips the prediction."""
    x, y = acert.data.load("mnist5k", split="train")
    x, y = x[:400].double(), y[:400]
    torch.manual_seed(0)
    model = nn.Sequential(
        Normalize([0.1307], [0.3081]), nn.Flatten(), nn.Linear(784, 32), nn.ReLU(),
        nn.Linear(32, 10),
    ).double()  # fmt: skip
    model = acert.fit(model, (x[:300], y[:300]), eps_max=0.1, epochs=3, progress=False, lr=5e-3)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    x_test, y_test = x[300:], y[300:]
    report = acert.certify(model, (x_test, y_test), eps_max=0.1, bound="best", progress=False)
    assert report.radii.dtype == torch.float64 and report.clean_accuracy > 0.5
    certified = report.radii > 0
    assert certified.sum() > 10
    inside = 0.999 * report.radii[certified]
    xs, ys = x_test[certified], y_test[certified]
    attacked = pgd_attack(model, xs, ys, inside, steps=40, restarts=2)
    assert attacked.dtype == torch.float64
    with torch.no_grad():
        assert (model(attacked).argmax(1) == ys).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_are_refused_naming_the_dtypes_that_certify(dtype):
    """The float32 allowances do not cover float16/bfloat16 arithmetic (n·u > 1 for a long
    dot product in bfloat16): refused, by certify and by the bounds alike."""
    x, y = _images()
    model = _mlp().to(dtype)
    for call in (
        lambda: acert.certify(model, (x, y), eps_max=0.1, progress=False),
        lambda: margin_bounds(model, x.to(dtype), y, 0.01),
        lambda: _fit(model),
    ):
        raises(call, str(dtype), "float32 and float64", "model.float()")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_this_build_lacks_is_one_line():
    for call in (
        lambda: acert.certify(_mlp(), _images(), eps_max=0.1, device="cuda", progress=False),
        lambda: _fit(_mlp(), device=torch.device("cuda")),
    ):
        raises(call, "'cuda'", "no CUDA", 'pass device="cpu"')


@pytest.mark.parametrize("bound", ["ibp", "crown"])
def test_certifying_under_autocast_is_refused(bound):
    """Under CPU autocast the model and IBP compute in bfloat16 (issue 17 saw CROWN end in a
    RuntimeError): no certificate covers that arithmetic."""
    x, y = _images()
    with torch.autocast("cpu"):
        raises(
            lambda: acert.certify(_mlp(), (x, y), eps_max=0.1, bound=bound, progress=False),
            "torch.autocast",
            "outside the autocast block",
        )
        raises(lambda: margin_bounds(_mlp(), x, y, 0.01, bound), "torch.autocast")
        raises(lambda: radius_search(_mlp(), x, y, 0.1, bound), "torch.autocast")
    assert acert.certify(_mlp(), (x, y), eps_max=0.1, bound=bound, progress=False).n == 12


# --- the model and the input ----------------------------------------------------------------


def _conv_then_batchnorm1d() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm1d(2), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3)
    ).eval()


def test_a_model_that_cannot_run_on_the_input_gets_no_bounds():
    """Conv2d → BatchNorm1d: the model raises on a 4-D input, but the bounds (which fold the
    batch-norm into the convolution) used to return numbers for it."""
    x, y = _images()
    model = _conv_then_batchnorm1d()
    for call in (
        lambda: margin_bounds(model, x, y, 0.01),
        lambda: acert.certify(model, (x, y), eps_max=0.1, progress=False),
        lambda: _fit(model.train()),
    ):
        raises(call, "input of shape (1, 6, 6) does not fit the model", "got 4D input")


def test_checking_that_a_model_runs_draws_no_random_numbers_and_keeps_its_statistics():
    """The check runs the layers on shapes alone: a train-mode Dropout draws nothing (a
    seeded training run stays the same) and a batch-norm's running averages stay."""
    from acert.bounds import check_model_input

    model = nn.Sequential(
        nn.Flatten(), nn.Linear(36, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3)
    ).train()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    torch.manual_seed(0)
    check_model_input(model, (1, 6, 6), torch.float32)
    assert torch.equal(torch.rand(3), torch.manual_seed(0) and torch.rand(3))
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_fit_refuses_a_residual_body_that_changes_the_shape_before_training(monkeypatch):
    """x + body(x) broadcast a 1-channel input onto a 2-channel body, so fit trained a model
    that only certify then refused."""
    torch.manual_seed(0)
    model = nn.Sequential(
        Residual(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1))), nn.Flatten(), nn.Linear(72, 3)
    )
    monkeypatch.setattr(acert.api, "run", lambda *args: pytest.fail("fit started training"))
    raises(lambda: _fit(model), "layer 0 (Residual)", "must keep the shape of its input")


def test_fit_with_every_parameter_frozen_is_one_line():
    model = _mlp().requires_grad_(False)
    raises(lambda: _fit(model), "every parameter of the model is frozen", "requires_grad_(True)")
    model[3].requires_grad_(True)  # fine-tuning the last layer alone trains
    assert _fit(model)[3].weight.requires_grad


def test_fit_inside_no_grad_trains():
    model, start = _mlp(), _mlp()[1].weight.clone()
    with torch.no_grad():
        trained = _fit(model)
    assert not torch.equal(trained[1].weight, start)
    with torch.inference_mode():
        raises(lambda: _fit(_mlp()), "torch.inference_mode()", "outside")


# --- ACERTLoss ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("idx", "fragments"),
    [
        (list(range(12)), ("torch tensor of row indices, got list", "torch.as_tensor(idx)")),
        (torch.arange(12).float(), ("integer row indices", "torch.float32", "idx.long()")),
        (torch.arange(6), ("idx must be (12,)",)),
    ],
)
def test_acert_loss_names_bad_row_indices(idx, fragments):
    x, y = _images()
    loss = acert.ACERTLoss(eps_max=0.3)
    raises(lambda: loss(_mlp().train(), x, y, 0.1, idx), *fragments)


def test_acert_loss_names_a_setting_it_does_not_have():
    raises(
        lambda: acert.ACERTLoss(eps_max=0.3, kapa=0.5),
        "ACERTLoss has no setting 'kapa'",
        "kappa",
        "search",
    )


def test_fit_refuses_resume_without_a_run_folder():
    x, y = _images()
    raises(lambda: acert.fit(_mlp(), (x, y), eps_max=0.3, epochs=1, resume=True), "needs out=")


def test_acert_loss_names_inputs_of_another_dtype_than_the_model():
    x, y = _images()
    loss = acert.ACERTLoss(eps_max=0.3)
    raises(
        lambda: loss(_mlp().train(), x.double(), y, 0.1),
        "inputs are torch.float64 but the model computes in torch.float32",
        "x.to(torch.float32)",
    )


@pytest.mark.parametrize(
    "eps", [torch.tensor(0.1), np.float32(0.1), np.float64(0.1), torch.tensor([0.1])]
)
def test_acert_loss_takes_eps_as_a_numpy_scalar_or_one_element_tensor(eps):
    x, y = _images()
    terms = acert.ACERTLoss(eps_max=torch.tensor(0.3))(_mlp().train(), x, y, eps)
    assert terms.loss.requires_grad and terms.radii.shape == (12,)
    raises(lambda: acert.ACERTLoss(eps_max=0.3)(_mlp().train(), x, y, torch.tensor([0.1, 0.2])))


# --- statistics and bounds ------------------------------------------------------------------


def test_clean_batch_statistics_do_not_skip_the_train_mode_refusal():
    """stats={} (or statistics of other layers) used to skip every mode check: a train-mode
    Dropout got bounds as if it were the identity."""
    x, y = _images()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(36, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 3)
    ).train()
    for call in (
        lambda: margin_bounds(model, x, y, 0.01, stats={}),
        lambda: radius_search(model, x, y, 0.1, known=KnownBatch(stats={})),
    ):
        raises(call, "layer 2 (Dropout)", "model.eval()")
    norm = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    raises(lambda: margin_bounds(norm.train(), x, y, 0.01, stats={}), "layer 2 (BatchNorm1d)")
    _, stats = acert.bounds.clean_forward(norm, x)
    assert margin_bounds(norm, x, y, 0.01, stats=stats).shape == (12, 2)


@pytest.mark.parametrize(
    ("bound", "names"),
    [("best", ("ibp", "crown-ibp", "crown")), ("best:ibp,crown", ("ibp", "crown"))],
)
def test_certify_takes_best_as_the_command_line_does(bound, names):
    """Per sample the largest radius of the bounds named, as ``acert certify --bound``."""
    data = _images()
    report = acert.certify(_mlp(), data, eps_max=0.2, bound=bound, eps=(0.05,), progress=False)
    assert tuple(report.bound_radii) == names
    radii = torch.stack([report.bound_radii[name] for name in names])
    assert torch.equal(report.radii, radii.amax(0))
    alone = acert.certify(_mlp(), data, eps_max=0.2, bound=names, progress=False)
    assert torch.equal(report.radii, alone.radii)
    raises(
        lambda: acert.certify(_mlp(), data, eps_max=0.2, bound="best:ibp,nope", progress=False),
        "unknown bound 'nope'",
    )
