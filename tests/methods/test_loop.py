"""A method's loss in a training loop of one's own (acert.methods.TrainingLoss / ACERTLoss)."""

import copy

import pytest
import torch

from acert.foundation.errors import AcertError
from acert.methods import ACERT, IBP, ACERTLoss, Batch, Step, TrainingLoss
from acert.models import create_model


def _model_and_batch():
    torch.manual_seed(0)
    model = create_model("mlp-small", (1, 8, 8), 4, (0.0,), (1.0,))
    g = torch.Generator().manual_seed(1)
    return model.train(), torch.rand(12, 1, 8, 8, generator=g), torch.arange(12) % 4


def test_acert_loss_is_the_loss_the_project_loop_computes():
    model, x, y = _model_and_batch()
    idx = torch.arange(100, 112)
    ours = ACERTLoss(eps_max=0.2, kappa=0.25)(copy.deepcopy(model), x, y, 0.05, idx)
    theirs = ACERT(kappa=0.25).loss(
        copy.deepcopy(model), Batch(x, y, idx), Step(0, 0, 0.05, 0.2, True)
    )
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=0, atol=0)
    torch.testing.assert_close(ours.radii, theirs.radii, rtol=0, atol=0)
    assert ours.radii.shape == (12,) and (ours.radii <= 0.05).all()


def test_sample_indices_warm_start_and_their_absence_leaves_the_memory_alone():
    model, x, y = _model_and_batch()
    loss_fn = ACERTLoss(eps_max=0.2)
    loss_fn(model, x, y, 0.2, torch.arange(50, 62))
    remembered = loss_fn.method.memory.radius.clone()
    assert remembered.numel() == 62 and torch.isnan(remembered[:50]).all()
    assert not torch.isnan(remembered[50:]).any()
    loss_fn(model, x, y, 0.2)  # no idx: cold searches, nothing remembered or mixed up
    assert torch.allclose(loss_fn.method.memory.radius, remembered, equal_nan=True)
    assert loss_fn.method.memory is not None


def test_any_method_object_and_one_step_of_training():
    model, x, y = _model_and_batch()
    loss_fn = TrainingLoss(IBP(kappa=0.5), eps_max=0.1)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    before = loss_fn(model, x, y, 0.1).loss.item()
    for _ in range(5):
        terms = loss_fn(model, x, y, 0.1)
        optimiser.zero_grad()
        terms.loss.backward()
        optimiser.step()
    assert loss_fn(model, x, y, 0.1).loss.item() < before
    assert terms.radii is None  # a fixed-ε method has no per-sample radii


@pytest.mark.parametrize("eps", [-0.1, 0.3, float("nan"), "0.1"])
def test_an_eps_outside_the_schedule_is_one_line(eps):
    model, x, y = _model_and_batch()
    with pytest.raises(AcertError, match=r"eps must lie in \[0, eps_max=0.2\]"):
        ACERTLoss(eps_max=0.2)(model, x, y, eps)


def test_a_bad_eps_max_is_one_line():
    with pytest.raises(AcertError, match=r"eps_max must lie in \(0, 1\]"):
        ACERTLoss(eps_max=2.0)
