"""The method registry: one decorator makes a class a method of ``--method``, ``acert list`` and
the figures; ``acert.fit`` takes a method object of one's own, registered or not."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import acert
from acert.config import TrainConfig
from acert.foundation.errors import ConfigError
from acert.methods import (
    TRAINING_METHODS,
    Batch,
    LossTerms,
    Standard,
    Step,
    create_method,
    list_methods,
    register_method,
)
from acert.models import Normalize
from acert.records.plots import knob_label


@dataclass
class HalfClean(Standard):
    """Standard training at half the loss: a method of one's own for the tests."""

    scale: float = 0.5

    @classmethod
    def from_config(cls, config: Any) -> HalfClean:
        return cls(scale=1 - config.kappa)

    def loss(self, model: nn.Sequential, batch: Batch, step: Step) -> LossTerms:
        terms = super().loss(model, batch, step)
        terms.loss = self.scale * terms.loss
        return terms


@pytest.fixture
def registered():
    """HalfClean registered as ``half-clean`` for one test, then taken out again."""
    register_method("half-clean", knobs={"kappa": "κ'"})(HalfClean)
    yield HalfClean
    del TRAINING_METHODS["half-clean"]
    HalfClean.name = Standard.name


def test_one_decorator_registers_a_method_for_config_list_and_figures(registered):
    assert "half-clean" in list_methods() and registered.name == "half-clean"
    method = create_method(TrainConfig(method="half-clean", kappa=0.25))
    assert isinstance(method, HalfClean) and method.scale == 0.75 and method.name == "half-clean"
    assert knob_label("kappa=0.25") == "κ'=0.25"


def test_every_registered_method_builds_from_a_config_under_its_own_name():
    for name, entry in TRAINING_METHODS.items():
        method = create_method(TrainConfig(method=name))
        assert type(method) is entry.method_class and method.name == name


def test_a_name_registered_twice_and_a_class_without_from_config_are_refused():
    with pytest.raises(ValueError, match="'ibp' is registered already"):
        register_method("ibp")(HalfClean)

    class NoFactory:
        pass

    with pytest.raises(TypeError, match="from_config"):
        register_method("no-factory")(NoFactory)
    assert "no-factory" not in TRAINING_METHODS


def test_the_config_names_the_given_method_and_create_method_says_how_to_resume():
    with pytest.raises(ConfigError, match=r"acert.fit\(..., method=<the same object>"):
        create_method(TrainConfig(method="given"))


@pytest.mark.train
def test_fit_trains_with_a_method_object_no_registration_names(tmp_path):
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(60, 1, 8, 8, generator=generator)
    y = (x.mean((1, 2, 3)) > 0.5).long()
    torch.manual_seed(0)
    model = nn.Sequential(Normalize([0.5], [0.3]), nn.Flatten(), nn.Linear(64, 2))
    method = HalfClean(scale=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    trained = acert.fit(model, (x, y), eps_max=0.05, epochs=2, method=method, out=tmp_path / "run",
                        progress=False, batch_size=20)  # fmt: skip
    assert any(not torch.equal(a, b) for a, b in zip(before, trained.parameters(), strict=True))
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "method: given" in saved


def test_fit_refuses_an_object_that_is_no_method_in_one_line():
    with pytest.raises(ConfigError, match="an object with loss, state_dict, load_state_dict"):
        data = (torch.rand(4, 1, 2, 2), torch.zeros(4, dtype=torch.long))
        model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        acert.fit(model, data, eps_max=0.1, epochs=1, method=object())


def test_every_module_of_the_package_is_imported_so_a_new_file_registers_itself():
    import pkgutil
    import sys

    import acert.methods

    names = [module.name for module in pkgutil.iter_modules(acert.methods.__path__)]
    assert "ibp" in names and "registry" in names
    assert all(f"acert.methods.{name}" in sys.modules for name in names)
