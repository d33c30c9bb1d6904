"""The arithmetic certificates cover: flush-to-zero refused, TF32 / reduced-precision float32 and
autocast off while certifying and restored afterwards, the record of what a certificate covers.
(No GPU here: the switches are checked, not TF32's effect on a GPU.)"""

import contextlib

import pytest
import torch
from torch import nn

import acert
from acert.bounds import arithmetic as arith
from acert.bounds import margin_bounds
from acert.bounds.arithmetic import FloatModeError, flushes_subnormals, ieee_arithmetic
from acert.evaluation.evaluate import EvaluationSettings, evaluate
from acert.foundation.errors import AcertError
from acert.radius import radius_search


@contextlib.contextmanager
def _flushing():
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormal numbers")
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def _set(layer: nn.Module, **values: object) -> nn.Module:
    with torch.no_grad():
        for name, value in values.items():
            getattr(layer, name).copy_(torch.as_tensor(value, dtype=torch.float32))
    return layer


def _flushed_below_half() -> nn.Sequential:
    """z = 2^-125·x is below float32's normal range for x < 0.5; the batch-norm (scale 2^100,
    folded: weight 2^-25) and the last layer make the margin ``x - 0.4``. Flush-to-zero sets z
    to 0 there, and the margin to -0.4."""
    norm = nn.BatchNorm1d(1, eps=0.0)
    _set(norm, running_mean=[0.0], running_var=[1.0], weight=[2.0**100], bias=[0.0])
    last = _set(nn.Linear(1, 2), weight=[[2.0**25], [0.0]], bias=[-0.4, 0.0])
    return nn.Sequential(_set(nn.Linear(1, 1), weight=[[2.0**-125]], bias=[0.0]), norm, last)


def test_flush_to_zero_is_detected_and_refused():
    """Under flush-to-zero the model flips at x = 0.49, 0.11 from x = 0.6, where every method
    certified 0.2 (the allowances assume gradual underflow); now each entry point refuses in
    one line, and certifies 0.2 again, soundly, with gradual underflow."""
    model, x, y = _flushed_below_half().eval(), torch.tensor([[0.6]]), torch.tensor([0])
    assert not flushes_subnormals()
    assert radius_search(model, x, y, 0.3, "ibp").radius.item() == pytest.approx(0.2, abs=1e-3)
    with _flushing():
        assert flushes_subnormals() and flushes_subnormals(torch.float64)
        assert model(x).argmax(1).item() == 0
        assert model(torch.tensor([[0.49]])).argmax(1).item() == 1
        for method in ("ibp", "crown-ibp", "crown"):
            with pytest.raises(FloatModeError, match=r"set_flush_denormal\(False\)"):
                radius_search(model, x, y, 0.3, method)
            with pytest.raises(FloatModeError, match="flushes subnormal numbers to zero"):
                margin_bounds(model, x, y, 0.15, method)
        with pytest.raises(FloatModeError):
            acert.certify(model, (x, y), eps_max=0.3, progress=False)
    assert not flushes_subnormals()


def _switches() -> dict:
    leaves = arith._precision_leaves()
    if leaves:
        precision = {arith._PRECISION_LEAVES[i]: leaf.fp32_precision for i, leaf in
                     enumerate(leaves)}  # fmt: skip
    else:
        precision = {
            "matmul": torch.get_float32_matmul_precision(),
            "cuda": torch.backends.cuda.matmul.allow_tf32,
            "cudnn": torch.backends.cudnn.allow_tf32,
        }
    return {**precision, "autocast": torch.is_autocast_enabled("cpu")}


@pytest.fixture
def reduced_precision():
    """The switches a training script sets (TF32 matmuls, bfloat16 oneDNN matmuls on a CPU
    that has them, cuDNN's TF32 convolutions) and CPU autocast; the defaults afterwards."""
    torch.set_float32_matmul_precision("medium")
    torch.backends.cudnn.allow_tf32 = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yield _switches()
    torch.set_float32_matmul_precision("highest")


def test_reduced_precision_is_off_inside_and_restored_after(reduced_precision):
    before = reduced_precision
    assert before["autocast"]
    with ieee_arithmetic():
        inside = _switches()
    assert _switches() == before
    assert inside["autocast"] is False
    precisions = [value for key, value in inside.items() if key != "autocast"]
    assert set(precisions) <= {"ieee", "highest", False}
    with pytest.raises(RuntimeError, match="boom"), ieee_arithmetic():
        raise RuntimeError("boom")
    assert _switches() == before
    assert torch.get_float32_matmul_precision() == "medium"  # the legacy view works again


def test_certification_runs_in_ieee_float32_and_says_so(reduced_precision, monkeypatch):
    """The bound passes and the forward pass of an evaluation see the IEEE switches; the
    certificate records what it covers; the caller's switches come back, also after an error."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x, y = torch.rand(5, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1])
    seen = []
    linear = torch.nn.functional.linear

    def spy(*args):  # the model's forward pass and IBP's, CROWN's last layer: matmul
        seen.append(_switches())
        return linear(*args)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    result = acert.certify(model, (x, y), eps_max=0.1, progress=False)
    assert seen and all(s["autocast"] is False for s in seen)
    assert all(set(s.values()) <= {"ieee", "highest", False} for s in seen)
    assert _switches() == reduced_precision
    assert result.arithmetic == {
        "dtype": "float32", "device": "cpu", "ieee": True, "tf32": False, "autocast": False,
        "flush_to_zero": False,
    }  # fmt: skip
    assert result.to_dict()["arithmetic"] == result.arithmetic
    with pytest.raises(AcertError):
        evaluate(model, x, y.clone().fill_(7), EvaluationSettings(0.1), progress=False)
    assert _switches() == reduced_precision
