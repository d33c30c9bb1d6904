"""Each method's settings record: its keys are config keys (a flag each, ``--set``, YAML,
``--help``, docs/CONFIG.md), so that a method with a knob of its own is one file."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import textwrap
from dataclasses import dataclass

import pytest
import yaml

from acert.cli import main
from acert.config import TrainConfig, config_from_dict, config_keys, method_keys, resolve
from acert.foundation.errors import ConfigError
from acert.foundation.settings import Settings, setting
from acert.methods import (
    TRAINING_METHODS,
    ACERTSettings,
    KappaSettings,
    SABRSettings,
    Standard,
    STAPSSettings,
    create_method,
    register_method,
)
from tests.kit import tiny_run
from tests.kit.methods import restored_registry

# The whole of a method with a knob of its own, as a user's file would hold it
# (docs/ARCHITECTURE.md, "Adding a method").
SCALED_METHOD = '''
"""Clean cross-entropy times a weight of its own: a new method with a new knob, one file."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import nn

from acert.foundation.ranges import between
from acert.foundation.settings import Settings, setting
from acert.methods import Batch, LossTerms, Step, register_method
from acert.methods.base import Stateless

BUILT: list[float] = []  # the weights from_config was given, for the test


@dataclass(frozen=True)
class ScaledSettings(Settings):
    scaled_weight: float = setting(
        1.0, "weight w of the scaled method's clean loss", between(0, 2)
    )


@register_method("scaled", knobs={"scaled_weight": "w"}, settings=ScaledSettings)
@dataclass
class Scaled(Stateless):
    weight: float = 1.0

    @classmethod
    def from_config(cls, config: Any) -> Scaled:
        BUILT.append(ScaledSettings.read(config).scaled_weight)
        return cls(weight=ScaledSettings.read(config).scaled_weight)

    def loss(self, model: nn.Sequential, batch: Batch, step: Step) -> LossTerms:
        logits = model(batch.x)
        return LossTerms(self.weight * F.cross_entropy(logits, batch.y), logits)
'''

ONE_STEP = tiny_run(
    method="scaled", train_limit=20, val_size=0, batch_size=20, epochs=1, eval_limit=10,
    eval_pgd_steps=0,
)  # fmt: skip


@pytest.fixture
def scaled_module(tmp_path):
    """The file above imported as a module of its own (registering ``scaled``); the registry
    and the modules as they were afterwards."""
    path = tmp_path / "scaled_method.py"
    path.write_text(textwrap.dedent(SCALED_METHOD))
    spec = importlib.util.spec_from_file_location("scaled_method", path)
    module = importlib.util.module_from_spec(spec)
    with restored_registry():
        sys.modules["scaled_method"] = module
        try:
            spec.loader.exec_module(module)
            yield module
        finally:
            del sys.modules["scaled_method"]


def _flags(config: TrainConfig) -> list[str]:
    """``config`` as flags, without the new key (each test sets it its own way)."""
    return [*config.as_flags(), "--quiet"]


@pytest.mark.train
def test_a_method_with_a_knob_of_its_own_trains_through_its_flag_and_set(
    scaled_module, tmp_path, capsys
):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    printed = " ".join(capsys.readouterr().out.split())
    said = "weight w of the scaled method's clean loss [in [0, 2]; default 1.0]"
    assert f"--scaled-weight V {said}" in printed
    for how, weight, out in (
        (["--scaled-weight", "0.5"], 0.5, tmp_path / "flag"),
        (["--set", "scaled_weight=0.25"], 0.25, tmp_path / "set"),
    ):
        assert main(["train", *_flags(ONE_STEP), *how, "--out", str(out)]) == 0
        saved = yaml.safe_load((out / "config.yaml").read_text())
        assert saved["method"] == "scaled" and saved["scaled_weight"] == weight
    assert scaled_module.BUILT == [0.5, 0.25]
    # a resume reads the key back from the run folder like any other
    resume = ["train", "--out", str(tmp_path / "set"), "--resume", "--scaled-weight", "0.5"]
    assert main(resume) == 2
    assert "--resume with a different config (scaled_weight)" in capsys.readouterr().err


def test_a_knob_of_its_own_is_checked_by_its_rule_in_one_line(scaled_module, capsys):
    assert main(["train", *_flags(ONE_STEP), "--scaled-weight", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "acert: error: scaled_weight must lie in [0, 2], got 3.0"
    with pytest.raises(ConfigError, match=r"scaled_weight must lie in \[0, 2\], got -1"):
        scaled_module.ScaledSettings(scaled_weight=-1)


def test_the_registry_restored_takes_the_key_away(scaled_module):
    assert "scaled_weight" in config_keys()
    with restored_registry():
        del TRAINING_METHODS["scaled"]
        assert "scaled_weight" not in config_keys()
        with pytest.raises(ConfigError, match="unknown config key 'scaled_weight'"):
            config_from_dict({"scaled_weight": 0.5})


def test_the_methods_keys_are_their_records_fields_read_back_as_records():
    keys = method_keys()
    assert keys["kappa"].record is KappaSettings and keys["radius_rtol"].record is ACERTSettings
    assert keys["sabr_lambda"].record is SABRSettings  # STAPS inherits it, declared once
    config = resolve(TrainConfig(method="staps", sabr_lambda=0.3, taps_head=2))
    assert STAPSSettings.read(config) == STAPSSettings(sabr_lambda=0.3, taps_head=2)
    assert create_method(config).lam == 0.3 and create_method(config).head == 2
    assert config.method_settings["sabr_lambda"] == 0.3 == config.sabr_lambda
    replaced = dataclasses.replace(config, kappa=0.5, epochs=7)
    assert (replaced.kappa, replaced.sabr_lambda, replaced.epochs) == (0.5, 0.3, 7)
    assert config.kappa == 0.0  # replace made a new record of the values
    with pytest.raises(TypeError, match="unexpected keyword argument 'kapa'"):
        TrainConfig(kapa=0.5)


def test_a_record_is_refused_unless_it_declares_each_key_once_with_help_and_rule():
    @dataclass(frozen=True)
    class OwnKappa(Settings):
        kappa: float = setting(0.1, "another κ")

    @dataclass(frozen=True)
    class NoHelp(Settings):
        weight: float = 1.0

    @dataclass
    class Mutable(Settings):
        weight: float = setting(1.0, "a weight")

    @dataclass(frozen=True)
    class EveryRun(Settings):
        epochs: int = setting(3, "epochs again")

    class Throwaway(Standard):
        pass

    with restored_registry():
        with pytest.raises(ValueError, match="'kappa' of OwnKappa is declared by KappaSettings"):
            register_method("own-kappa", settings=OwnKappa)(Throwaway)
        with pytest.raises(TypeError, match=r"NoHelp.weight needs setting\(default, help"):
            register_method("no-help", settings=NoHelp)(Throwaway)
        with pytest.raises(TypeError, match="must be a frozen dataclass of Settings"):
            register_method("mutable", settings=Mutable)(Throwaway)
        assert not {"own-kappa", "no-help", "mutable"} & set(TRAINING_METHODS)
        register_method("every-run", settings=EveryRun)(Throwaway)
        with pytest.raises(TypeError, match=r"EveryRun\.epochs is a key of every run already"):
            config_keys()
    assert "epochs" not in method_keys()
