"""The perturbation set (clipped ℓ∞ box), the Interval object, the margin specification, and the
one-line errors for bad inputs."""

from __future__ import annotations

import pytest
import torch

from acert.bounds import Interval, input_box, margin_bounds, margin_matrix, other_classes
from acert.bounds.interval import as_eps
from acert.foundation.errors import AcertError
from acert.radius import SearchSettings, radius_search

pytestmark = pytest.mark.usefixtures("single_thread")


def test_input_box_clips_to_the_domain_per_sample():
    x = torch.tensor([[0.0, 0.05, 0.5, 0.97, 1.0], [0.2, 0.4, 0.6, 0.8, 1.0]])
    box = input_box(x, torch.tensor([0.1, 0.0]))
    torch.testing.assert_close(box.lower[0], torch.tensor([0.0, 0.0, 0.4, 0.87, 0.9]))
    torch.testing.assert_close(box.upper[0], torch.tensor([0.1, 0.15, 0.6, 1.0, 1.0]))
    torch.testing.assert_close(box.lower[1], x[1])
    torch.testing.assert_close(box.upper[1], x[1])
    assert (box.radius >= 0).all()
    # a number applies to every row; eps beyond 1 gives the whole domain
    whole = input_box(x, 2.0)
    assert (whole.lower == 0).all() and (whole.upper == 1).all()
    # images: eps broadcasts over (C, H, W) per row
    img = torch.rand(3, 2, 4, 4)
    eps = torch.tensor([0.0, 0.1, 0.3])
    box = input_box(img, eps)
    assert box.shape == img.shape
    for i in range(3):
        torch.testing.assert_close(box.lower[i], (img[i] - eps[i]).clamp(0, 1))
        torch.testing.assert_close(box.upper[i], (img[i] + eps[i]).clamp(0, 1))


def test_interval_operations():
    a = Interval.from_bounds(torch.tensor([-1.0, 0.0, 2.0]), torch.tensor([1.0, 3.0, 2.0]))
    torch.testing.assert_close(a.centre, torch.tensor([0.0, 1.5, 2.0]))
    torch.testing.assert_close(a.radius, torch.tensor([1.0, 1.5, 0.0]))
    b = Interval.from_bounds(torch.tensor([-2.0, 1.0, 1.0]), torch.tensor([0.5, 4.0, 3.0]))
    c = a.intersect(b)
    torch.testing.assert_close(c.lower, torch.tensor([-1.0, 1.0, 2.0]))
    torch.testing.assert_close(c.upper, torch.tensor([0.5, 3.0, 2.0]))
    rows = Interval(torch.arange(6.0).view(3, 2), torch.ones(3, 2)).index(torch.tensor([2, 0]))
    torch.testing.assert_close(rows.lower, torch.tensor([[3.0, 4.0], [-1.0, 0.0]]))


def test_as_eps_shapes_and_dtype():
    like = torch.zeros(3, dtype=torch.float64)
    e = as_eps(0.25, 3, like)
    assert e.shape == (3,) and e.dtype == torch.float64 and (e == 0.25).all()
    e = as_eps(torch.tensor([0.0, 0.1, 1.0]), 3, like)
    assert e.dtype == torch.float64


def test_margin_specification():
    y = torch.tensor([0, 2, 3])
    torch.testing.assert_close(other_classes(y, 4), torch.tensor([[1, 2, 3], [0, 1, 3], [0, 1, 2]]))
    spec = margin_matrix(y, 4)
    assert spec.shape == (3, 3, 4)
    z = torch.tensor([[1.0, 2.0, 4.0, 8.0]]).expand(3, 4)
    margins = torch.einsum("bsk,bk->bs", spec, z)
    expected = torch.tensor([[-1.0, -3.0, -7.0], [3.0, 2.0, -4.0], [7.0, 6.0, 4.0]])
    torch.testing.assert_close(margins, expected)


def _assert_one_line(call, match):
    with pytest.raises(AcertError, match=match) as err:
        call()
    message = str(err.value)
    assert message and "\n" not in message
    return message


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_bad_inputs_are_one_line_errors(tiny_net, mode):
    model, shape = tiny_net("mlp-bn", seed=0)
    model.train(mode == "train")
    x = torch.rand(3, *shape)
    y = torch.tensor([0, 1, 3])
    nan = x.clone()
    nan[1, 2] = float("nan")
    calls = {
        "NaN": lambda m: margin_bounds(model, nan, y, 0.1, m),
        r"\[0, 1\]": lambda m: margin_bounds(model, x + 0.5, y, 0.1, m),
        "inf": lambda m: margin_bounds(model, x.masked_fill(x > 0.5, float("inf")), y, 0.1, m),
        r"eps must be >= 0": lambda m: margin_bounds(model, x, y, -0.1, m),
        r"eps must be >= 0 and not NaN": lambda m: margin_bounds(
            model, x, y, torch.tensor([0.1, float("nan"), 0.1]), m
        ),
        r"\(3,\)": lambda m: margin_bounds(model, x, y, torch.tensor([0.1, 0.2]), m),
        r"labels must lie in \[0, 4\)": lambda m: margin_bounds(
            model, x, torch.tensor([0, 4, 1]), 0.1, m
        ),
        r"labels": lambda m: margin_bounds(model, x, torch.tensor([0, -1, 1]), 0.1, m),
        r"y \(B,\)": lambda m: margin_bounds(model, x, y[:2], 0.1, m),
        "does not fit the model": lambda m: margin_bounds(model, torch.rand(3, 7), y, 0.1, m),
        "unknown bound method": lambda m: margin_bounds(model, x, y, 0.1, "lp"),
    }
    for method in ("ibp", "crown-ibp", "crown"):
        for match, call in calls.items():
            _assert_one_line(
                lambda call=call, method=method: call(method), _or_batch_norm(match, mode)
            )


def _or_batch_norm(match: str, mode: str) -> str:
    """In train mode a batch-norm without given statistics may be what is refused first."""
    return match if mode == "eval" else f"(?:{match})|batch-norm|BatchNorm"


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_radius_search_input_errors(tiny_net, mode):
    model, shape = tiny_net("cnn-bn", seed=0)
    model.train(mode == "train")
    x = torch.rand(3, *shape)
    y = torch.tensor([0, 1, 2])
    cases = [
        (lambda: radius_search(model, x, y, -0.1), "eps"),
        (lambda: radius_search(model, x, y, float("nan")), "eps"),
        (lambda: radius_search(model, x, y, torch.tensor([0.1, 0.2])), r"\(3,\)"),
        (lambda: radius_search(model, x, y, 0.1, settings=SearchSettings("newton")), "newton"),
        (lambda: radius_search(model, x, y, 0.1, method="lp"), "lp"),
        (lambda: radius_search(model, x * 2, y, 0.1), r"\[0, 1\]"),
        (lambda: radius_search(model, x, y + 1, 0.1), "labels"),
        (lambda: radius_search(model, torch.rand(3, 1, 6, 6), y, 0.1), "does not fit the model"),
    ]
    for call, match in cases:
        _assert_one_line(call, _or_batch_norm(match, mode))


def test_rounding_allowance_lowers_every_bound_by_its_share_of_the_magnitude(monkeypatch):
    import acert.bounds.allowances
    from acert.bounds import margin_bounds
    from tests.kit.nets import build_tiny_net

    model, shape = build_tiny_net("mlp")
    x = torch.rand(6, *shape)
    y = model(x).argmax(1)
    for method in ("ibp", "crown-ibp", "crown"):
        with_allowance = margin_bounds(model, x, y, 0.05, method)
        monkeypatch.setattr(acert.bounds.allowances, "ROUNDING_ULPS", 0)
        exact = margin_bounds(model, x, y, 0.05, method)
        monkeypatch.undo()
        gap = exact - with_allowance
        assert (gap > 0).all()
        # 256 machine epsilons per unit of magnitude: tiny next to the bound itself
        assert (gap < 256 * torch.finfo(torch.float32).eps * 100).all()
