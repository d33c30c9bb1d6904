"""The memory layout of a run (acert.foundation.layout and the ``layout`` key)."""

from __future__ import annotations

import pytest
import torch

from acert.config import tiny_run
from acert.config.resolve import resolve
from acert.foundation.errors import ConfigError
from acert.foundation.layout import in_layout, model_in_layout
from acert.models import create_model
from acert.workflows.train.run import run
from tests.kit import quiet


def test_images_and_convolution_weights_take_the_layout_and_other_tensors_stay():
    x = torch.rand(4, 3, 8, 8)
    assert in_layout(x, "channels-last").is_contiguous(memory_format=torch.channels_last)
    assert not x.is_contiguous(memory_format=torch.channels_last)
    assert in_layout(x, "contiguous") is x
    flat = torch.rand(4, 10)
    assert in_layout(flat, "channels-last") is flat
    model = model_in_layout(
        create_model("cnn7-tiny", (3, 8, 8), 10, [0.5] * 3, [0.2] * 3), "channels-last"
    )
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)


def test_an_unknown_layout_names_the_known_ones():
    with pytest.raises(
        ConfigError, match="unknown layout 'nhwc'; choose one of contiguous, channels-last"
    ):
        in_layout(torch.rand(1, 1, 2, 2), "nhwc")
    with pytest.raises(ConfigError, match="choose one of contiguous, channels-last"):
        resolve(tiny_run(layout="nhwc"))


def test_a_channels_last_run_trains_the_same_model_up_to_rounding():
    config = tiny_run(
        model="cnn7-tiny",
        train_limit=120,
        val_size=0,
        epochs=2,
        batch_size=40,
        eval_limit=40,
        eval_pgd_steps=0,
        threads=1,
    )
    plain = run(config, progress=False, log=quiet)
    last = run(
        tiny_run(**{**config.__dict__, "layout": "channels-last"}), progress=False, log=quiet
    )
    for a, b in zip(plain.history, last.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)
    conv = next(m for m in last.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
