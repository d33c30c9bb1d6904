"""Bad input to the public Python API (issue 10, part 5): one-line AcertError naming the problem
and the fix, raised at the entry point (acert.bounds.margin_bounds, acert.radius.radius_search,
acert.evaluation.evaluate.evaluate, acert.load), never a traceback from inside the bounds nor a
silently wrong number."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import acert
from acert.bounds import margin_bounds
from acert.evaluation.evaluate import EvaluationSettings, evaluate
from acert.foundation.errors import AcertError
from acert.methods import ACERT
from acert.models import Normalize
from acert.radius import KnownBatch, SearchSettings, radius_search

pytestmark = pytest.mark.usefixtures("single_thread")

METHODS = ("ibp", "crown-ibp", "crown")
NO_ATTACK = EvaluationSettings(0.1, pgd_steps=0)


def mlp(outputs: int = 3) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        Normalize([0.5] * 6, [0.3] * 6), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, outputs)
    ).eval()


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    return mlp(), torch.rand(4, 6, generator=g), torch.tensor([0, 1, 2, 0])


def raises(call, *fragments: str) -> str:
    """The one-line AcertError of ``call()``; every fragment is in its message."""
    with pytest.raises(AcertError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# --- the model ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_a_single_logit_is_refused_by_margin_bounds(data, method):
    _, x, _ = data
    y = torch.zeros(4, dtype=torch.long)
    raises(lambda: margin_bounds(mlp(1), x, y, 0.1, method), "1 output", ">= 2 classes")


def test_a_single_logit_is_refused_by_the_radius_search_and_evaluate(data):
    _, x, _ = data
    y = torch.zeros(4, dtype=torch.long)
    raises(lambda: radius_search(mlp(1), x, y, 0.1), "1 output", ">= 2 classes")
    raises(lambda: evaluate(mlp(1), x, y, NO_ATTACK), ">= 2 classes")


@pytest.mark.parametrize("method", METHODS)
def test_a_missing_flatten_is_named(method):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Linear(2 * 4 * 4, 3)).eval()
    x, y = torch.rand(2, 1, 6, 6), torch.tensor([0, 1])
    for call in (
        lambda: margin_bounds(model, x, y, 0.1, method),
        lambda: radius_search(model, x, y, 0.1, method),
    ):
        message = raises(call, "Flatten is missing before layer 2")
        assert "does not fit the model" not in message


def test_flat_inputs_to_a_convolution_are_named():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3)).eval()
    raises(
        lambda: margin_bounds(model, torch.rand(2, 36), torch.tensor([0, 1]), 0.1),
        "layer 0 (Conv2d) gets a 2-D tensor",
    )


def test_a_model_of_mixed_dtypes_is_named(data):
    _, x, y = data
    half_double = mlp()
    half_double[1].double()
    message = raises(lambda: margin_bounds(half_double, x, y, 0.1), "mixes dtypes", "model.float()")
    assert "torch.float64" in message and "torch.float32" in message
    # all float64 but the Normalize buffers: the old check read the first buffer only
    mostly_double = mlp().double()
    mostly_double[0].float()
    raises(lambda: radius_search(mostly_double, x.double(), y, 0.1), "mixes dtypes")


def test_inputs_of_another_dtype_than_the_model_name_both_and_the_fix(data):
    model, x, y = data
    raises(
        lambda: margin_bounds(model.double(), x, y, 0.1),
        "inputs are torch.float32",
        "the model computes in torch.float64 (its parameters)",
        "x.to(torch.float64)",
    )


# --- x and y ------------------------------------------------------------------------------


def test_an_empty_batch_is_refused(data):
    model, x, y = data
    for method in METHODS:
        raises(lambda m=method: margin_bounds(model, x[:0], y[:0], 0.1, m), "empty batch")
    raises(lambda: radius_search(model, x[:0], y[:0], 0.1), "empty batch")
    raises(lambda: evaluate(model, x[:0], y[:0], NO_ATTACK), "empty batch")


@pytest.mark.parametrize("kind", ["numpy", "list"])
def test_numpy_arrays_and_lists_are_refused_with_the_fix(data, kind):
    model, x, y = data
    convert = (lambda t: t.numpy()) if kind == "numpy" else (lambda t: t.tolist())
    expected = "numpy.ndarray" if kind == "numpy" else "list"
    for call, name in (
        (lambda: margin_bounds(model, convert(x), y, 0.1), "x"),
        (lambda: margin_bounds(model, x, convert(y), 0.1), "y"),
        (lambda: radius_search(model, convert(x), y, 0.1), "x"),
        (lambda: radius_search(model, x, convert(y), 0.1), "y"),
        (lambda: evaluate(model, convert(x), convert(y), NO_ATTACK), "x"),
    ):
        raises(call, f"{name} must be a torch.Tensor, got {expected}", f"torch.as_tensor({name})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool])
def test_labels_must_be_integer_class_indices(data, dtype):
    model, x, y = data
    for call in (
        lambda: radius_search(model, x, y.to(dtype), 0.1),
        lambda: margin_bounds(model, x, y.to(dtype), 0.1),
        lambda: evaluate(model, x, y.to(dtype), NO_ATTACK),
    ):
        message = raises(call, "labels must be integer class indices (int64)", "y.long()")
        assert "does not fit the model" not in message
    # int32 indices work as int64 do
    torch.testing.assert_close(
        radius_search(model, x, y.int(), 0.1).radius, radius_search(model, x, y, 0.1).radius
    )


# --- ε and the radius search's arguments ----------------------------------------------------


def test_eps_given_as_a_string_is_refused(data):
    model, x, y = data
    raises(lambda: margin_bounds(model, x, y, "0.1"), "eps must be a number", "'0.1'")
    raises(lambda: radius_search(model, x, y, "0.1"), "eps_max must be a number")
    raises(lambda: EvaluationSettings("0.1"), "eps_max must be a number")
    raises(lambda: EvaluationSettings(0.1, ["0.05"]), "cert_eps must be a number")
    raises(lambda: EvaluationSettings(0.1, pgd_eps=["0.05"]), "pgd_eps must be a number")


@pytest.mark.parametrize("eps_max", [math.inf, 5.0, 1.5, 0.0, -0.1, math.nan])
def test_a_cap_outside_the_pixel_range_is_refused(data, eps_max):
    """inf gave every radius 0, 5 the same radii as 1; pixels lie in [0, 1]."""
    model, x, y = data
    raises(lambda: radius_search(model, x, y, eps_max), "eps_max must lie in (0, 1]")
    raises(lambda: EvaluationSettings(eps_max), "eps_max must lie in (0, 1]")


def test_per_sample_caps_outside_the_pixel_range_are_refused(data):
    model, x, y = data
    caps = torch.tensor([0.1, 0.0, 2.0, 0.1])
    raises(lambda: radius_search(model, x, y, caps), "per-sample eps_max must lie in [0, 1]", "2")
    caps[2] = math.inf
    raises(lambda: radius_search(model, x, y, caps), "per-sample eps_max must lie in [0, 1]")


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("xtol", math.nan, "xtol must be a finite number > 0"),
        ("xtol", math.inf, "xtol must be a finite number > 0"),
        ("xtol", 0.0, "xtol must be a finite number > 0"),
        ("xtol", -1e-4, "xtol must be a finite number > 0"),
        ("rtol", math.nan, "rtol must be a finite number >= 0"),
        ("rtol", math.inf, "rtol must be a finite number >= 0"),
        ("rtol", -0.1, "rtol must be a finite number >= 0"),
        ("ftol", math.nan, "ftol must be a finite number >= 0"),
        ("ftol", math.inf, "ftol must be a finite number >= 0"),
        ("max_iter", -1, "max_iter must be a whole number >= 0"),
        ("max_iter", 2.5, "max_iter must be a whole number >= 0"),
        ("max_iter", True, "max_iter must be a whole number >= 0"),
        ("strategy", "newton", "unknown radius search 'newton'; choose one of brent, bisection"),
        ("strategy", None, "unknown radius search None"),
        ("sound", "yes", "sound must be True (certificates) or False"),
        ("spread", -0.5, "spread must lie in (0, 1)"),
        ("spread", math.nan, "spread must lie in (0, 1)"),
        ("spread", 0.0, "spread must lie in (0, 1)"),
        ("spread", 1.0, "spread must lie in (0, 1)"),
        ("spread", 3.0, "spread must lie in (0, 1)"),
    ],
)
def test_search_settings_that_would_give_radius_zero_are_refused_when_made(option, value, message):
    """Each setting has its one range check, in SearchSettings itself: nothing to search yet."""
    raises(lambda: SearchSettings(**{option: value}), message)


def test_search_settings_come_as_one_object(data):
    model, x, y = data
    raises(
        lambda: radius_search(model, x, y, 0.1, "ibp", "bisection"),
        "settings must be an acert.radius.SearchSettings, got str",
        "SearchSettings(strategy='bisection'",
    )
    raises(
        lambda: radius_search(model, x, y, 0.1, known={"logits": model(x)}),
        "known must be an acert.radius.KnownBatch, got dict",
    )
    raises(lambda: ACERT(search="bisection"), "search must be an acert.radius.SearchSettings")


@pytest.mark.parametrize("shape", [(3,), (4, 1), (5,)])
def test_a_guess_of_the_wrong_shape_is_named(data, shape):
    model, x, y = data
    raises(
        lambda: radius_search(model, x, y, 0.1, known=KnownBatch(guess=torch.full(shape, 0.05))),
        "guess must be a (4,) tensor",
        f"got shape {shape}",
    )


@pytest.mark.parametrize("shape", [(4, 2), (4,), (3, 3), (4, 3, 1)])
def test_logits_of_the_wrong_shape_are_named(data, shape):
    model, x, y = data
    raises(
        lambda: radius_search(model, x, y, 0.1, known=KnownBatch(logits=torch.zeros(shape))),
        "logits must be the (4, 3) clean logits of x",
        f"got shape {shape}",
    )


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("cert_eps", (0.1, 1.5), "cert_eps must lie in (0, 1] pixel units, got 1.5"),
        ("cert_eps", (0.0,), "cert_eps must lie in (0, 1]"),
        ("cert_eps", (math.nan,), "cert_eps must lie in (0, 1]"),
        ("cert_eps", 0.1, "cert_eps must be a sequence of radii such as (0.1, 0.2)"),
        ("cert_eps", "0.1", "cert_eps must be a sequence of radii"),
        ("cert_eps", (torch.tensor([0.1, 0.2]),), "cert_eps holds a tensor of shape (2,)"),
        ("pgd_eps", (-0.1,), "pgd_eps must lie in (0, 1]"),
        ("bounds", "alpha", "unknown bound 'alpha'; choose one of crown, crown-ibp, ibp"),
        ("bounds", ("ibp", 3), "unknown bound 3"),
        ("bounds", (), "bounds must name one or more of ibp, crown-ibp, crown"),
        ("pgd_steps", -1, "pgd_steps must be >= 0 (0 skips the attack), got -1"),
        ("pgd_steps", 2.5, "pgd_steps must be a whole number >= 0"),
        ("batch_size", 0, "batch_size must be >= 1, got 0"),
        ("batch_size", True, "batch_size must be a whole number >= 1"),
        ("crown_memory_mib", math.nan, "crown_memory_mib must be > 0 or null (no cap), got nan"),
        ("crown_memory_mib", 0, "crown_memory_mib must be > 0"),
        ("crown_memory_mib", math.inf, "crown_memory_mib must be > 0"),
    ],
)
def test_evaluation_settings_are_refused_when_made(option, value, message):
    """Each setting has its one range check, in EvaluationSettings itself: no data yet."""
    raises(lambda: EvaluationSettings(0.1, **{option: value}), message)


def test_evaluation_settings_come_as_one_object_and_keep_each_value_once(data):
    model, x, y = data
    raises(
        lambda: evaluate(model, x, y, 0.1),
        "settings must be an acert.evaluation.evaluate.EvaluationSettings, got float",
        "EvaluationSettings(eps_max=0.1",
    )
    settings = EvaluationSettings(0.1, [0.05, 0.1, 0.05], "crown", pgd_eps=[0.1, 0.1])
    assert settings.cert_eps == (0.05, 0.1) and settings.pgd_eps == (0.1,)
    assert settings.bounds == ("crown",) and settings.label == "crown"
    assert EvaluationSettings(0.1, bounds=["ibp", "crown", "ibp"]).bounds == ("ibp", "crown")
    # a radius given twice was counted twice: certified accuracy above the clean one
    result = evaluate(model, x, y, EvaluationSettings(0.1, [0.05, 0.05], pgd_steps=0))
    assert list(result.certified_accuracy) == [0.05]
    assert result.certified_accuracy[0.05] <= result.clean_accuracy


# --- runs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [123, None, 1.5, ["run"]])
def test_load_names_a_run_by_its_path(path):
    raises(lambda: acert.load(path), "a run is named by its path", "pass a run folder")


def test_load_refuses_an_unknown_checkpoint_name(tmp_path):
    raises(lambda: acert.load(tmp_path, "worst"), "unknown checkpoint 'worst'")


def test_a_run_config_that_is_not_resolved_is_refused(tmp_path):
    from acert.records.runs import RunDir

    run = RunDir(tmp_path)
    run.config_path.write_text("{}\n")
    raises(run.load_config, "config.yaml lacks", "eps_max", "cert_eps", "not the resolved config")


def test_a_run_config_with_a_cap_above_one_is_refused(tmp_path):
    import yaml

    from acert.config import TrainConfig, resolve
    from acert.records.runs import RunDir

    run = RunDir(tmp_path)
    stored = {**resolve(TrainConfig(epochs=1)).to_dict(), "eps_max": 5.0}
    run.config_path.write_text(yaml.safe_dump(stored))
    raises(run.load_config, "config.yaml: eps_max must lie in (0, 1]")


def test_numpy_scalars_are_numbers(data):
    """np.float64 is a number, not an array: accepted as eps and as a cap."""
    model, x, y = data
    margin_bounds(model, x, y, np.float64(0.1))
    radius_search(model, x, y, np.float32(0.1))
    with pytest.raises(AcertError, match="eps must be a number"):
        margin_bounds(model, x, y, np.array([0.1] * 4))
