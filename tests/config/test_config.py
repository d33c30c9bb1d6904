import subprocess
import sys
from pathlib import Path

import pytest

from acert.cli import main
from acert.config import (
    TrainConfig,
    check_key,
    config_from_dict,
    config_key,
    config_keys,
    flag_help,
    load_yaml,
    markdown_table,
    parse_override,
    resolve,
)
from acert.config.docs import BEGIN, END
from acert.foundation.errors import AcertError, ConfigError
from acert.foundation.ranges import Range
from acert.methods import TrainingAttack
from acert.radius import SearchSettings
from acert.radius.settings import STRATEGY


def test_resolve_fills_dataset_presets_and_keeps_explicit_values():
    config = resolve(TrainConfig(dataset="mnist5k", epochs=3))
    assert config.epochs == 3
    assert config.eps_max == 0.4 and config.eps_train == 0.4
    assert config.model == "cnn7-tiny" and config.batch_size > 0 and config.lr > 0
    assert config.cert_eps == [0.1, 0.2, 0.3, 0.4]
    cifar = resolve(TrainConfig(dataset="cifar10"))
    assert (
        cifar.eps_max == pytest.approx(8.8 / 255) and cifar.reg_epochs == 80 and cifar.epochs == 200
    )
    tin = resolve(TrainConfig(dataset="tinyimagenet"))
    assert tin.lambda_tight == 0.2 and tin.l1 == 1e-4 and tin.batch_size == 256
    # a limited training set keeps a tenth for validation unless told otherwise
    assert cifar.val_size == 5000
    assert resolve(TrainConfig(dataset="cifar10", train_limit=2000)).val_size == 200
    assert resolve(TrainConfig(dataset="cifar10", train_limit=2000, val_size=300)).val_size == 300


def test_values_are_coerced_and_checked():
    config = config_from_dict(
        {"epochs": "5", "kappa": "0.25", "cert_eps": "0.1,0.2", "train_limit": None}
    )
    assert config.epochs == 5 and config.kappa == 0.25 and config.cert_eps == [0.1, 0.2]
    for values, message in [
        ({"epohcs": 3}, "unknown config key 'epohcs'"),
        ({"epochs": "many"}, "'epochs' needs int"),
        ({"kappa": "nan"}, "'kappa' needs float"),
        ({"dataset": None}, "may not be null"),
        ({"epochs": True}, "'epochs' needs int"),
    ]:
        with pytest.raises(ConfigError, match=message) as err:
            config_from_dict(values)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("dataset", "eps_max", "cert_eps"),
    [
        ("mnist5k", None, [0.1, 0.2, 0.3, 0.4]),
        ("mnist5k", 0.25, [0.1, 0.2]),
        ("mnist5k", 0.05, [0.05]),
        ("fashion-mnist", 0.1, [0.05, 0.1]),
    ],
)
def test_the_datasets_certification_radii_follow_a_lower_eps_max(dataset, eps_max, cert_eps):
    assert resolve(config_from_dict({"dataset": dataset, "eps_max": eps_max})).cert_eps == cert_eps


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"eps_max": 0.0}, "eps_max must lie in"),
        ({"eps_max": 1.01}, "eps_max must lie in"),
        ({"eps_max": 0.2, "cert_eps": [0.3]}, "certification eps 0.3 must lie in"),
        ({"kappa": 1.5}, "kappa must lie in"),
        ({"epochs": 0}, "epochs must be"),
        ({"dataset": "imagenet"}, "unknown dataset"),
        ({"model": "resnet"}, "unknown model 'resnet'; choose one of cnn7"),
        ({"method": "trades"}, "unknown method 'trades'; choose one of acert"),
    ],
)
def test_resolve_rejects_out_of_range_values(values, message):
    with pytest.raises(Exception, match=message) as err:
        resolve(config_from_dict(values))
    assert "\n" not in str(err.value)


def test_eps_max_may_be_the_whole_pixel_range_as_in_the_api():
    """eps_max = 1 (every image of [0, 1]) is allowed, as acert.certify and acert.fit allow it."""
    config = resolve(config_from_dict({"eps_max": 1.0, "cert_eps": [0.5, 1.0]}))
    assert config.eps_max == 1.0 and config.eps_train == 1.0


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("kappa: 0.5\nepochs: 2\n")
    assert load_yaml(path) == {"kappa": 0.5, "epochs": 2}
    assert parse_override("cert_eps=0.1,0.3") == ("cert_eps", "0.1,0.3")
    assert parse_override("kappa=0.25") == ("kappa", 0.25)
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("kappa")
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("kappa: [0.5\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(tmp_path / "list.yaml")


def test_shipped_config_files_resolve():
    for path in sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml")):
        config = resolve(config_from_dict(load_yaml(path)))
        assert config.dataset in path.stem


# --- every key documented once ----------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


def test_docs_config_md_holds_the_generated_tables():
    text = (ROOT / "docs" / "CONFIG.md").read_text()
    generated = text.split(BEGIN + "\n", 1)[1].split(END, 1)[0]
    assert generated == markdown_table(), "docs/CONFIG.md is stale: run python -m acert.config"


def test_every_key_has_help_and_a_row_and_a_flag_that_says_it(capsys):
    names = list(config_keys())
    table = markdown_table()
    for name in names:
        assert len(config_key(name).help) > 10, name
        assert f"| `{name}` |" in table
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    printed = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
    for name in names:
        flag = "--" + name.replace("_", "-")
        assert f"{flag} V {' '.join(flag_help(name).split())}" in printed
    assert "[in [0, 1]; default 0.0]" in flag_help("kappa")
    assert "[>= 1; default the dataset's (docs/CONFIG.md)]" in flag_help("epochs")


def _out_of_range(rule: Range) -> list[float]:
    """Values just outside ``rule``, and values just inside it."""
    step = 1 if rule.whole else 0.5
    bad, good = [], []
    if rule.low is not None:
        (bad if rule.low_open else good).append(rule.low)
        bad.append(rule.low - step)
        good.append(rule.low + (step if rule.high is None else (rule.high - rule.low) / 2))
    if rule.high is not None:
        (bad if rule.high_open else good).append(rule.high)
        bad.append(rule.high + step)
    return bad, good


RANGED = [name for name in config_keys() if isinstance(config_key(name).rule, Range)]


@pytest.mark.parametrize("name", RANGED)
def test_each_range_is_checked_once_by_resolve_with_a_message_that_names_it(name):
    rule = config_key(name).rule
    bad, good = _out_of_range(rule)
    assert bad and good
    base = {"eps_max": 0.5} if name == "eps_train" else {}  # cert_eps may go up to 0.4
    for value in bad:
        with pytest.raises(ConfigError) as err:
            resolve(config_from_dict({**base, name: value}))
        message = str(err.value)
        assert message.startswith(f"{name} must ") and f"got {value!r}" in message
        assert rule._interval() in message and "\n" not in message
    for value in good:
        if name == "eps_max":
            base = {"cert_eps": [value]}
        assert getattr(resolve(config_from_dict({**base, name: value})), name) == value


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("init", "xavier", "unknown init 'xavier'; choose one of ibp, default"),
        ("method", "trades", "unknown method 'trades'; choose one of acert"),
        ("radius_search", "golden", "unknown radius_search 'golden'; choose one of brent"),
        ("logger", "wandb", "unknown logger 'wandb'; choose one of csv, tensorboard"),
        ("device", "tpu", "unknown device 'tpu'; use cpu, cuda or cuda:N"),
        ("dataset", "imagenet", "unknown dataset 'imagenet'; choose one of cifar10"),
        ("train_limit", 3, "train_limit must be >= 10 (an image of every class), got 3"),
        ("eval_limit", 9, "eval_limit must be >= 10 (an image of every class), got 9"),
        ("cert_eps", [0.1, 0.5], "certification eps 0.5 must lie in (0, eps_max=0.4]"),
        ("cert_eps", [0.0], "certification eps 0.0 must lie in (0, eps_max=0.4]"),
    ],
)
def test_names_and_checks_between_keys_are_one_line_errors(name, value, message):
    with pytest.raises(AcertError) as err:
        resolve(config_from_dict({name: value}))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_objects_that_take_a_key_check_it_with_the_keys_own_rule():
    """TrainingAttack and SearchSettings refuse exactly what the config refuses, in its words."""
    for key, value, build in [
        ("pgd_steps", -1, lambda v: TrainingAttack(steps=v)),
        ("pgd_step_size", 0.0, lambda v: TrainingAttack(step_size=v)),
        ("pgd_restarts", 0, lambda v: TrainingAttack(restarts=v)),
    ]:
        with pytest.raises(ConfigError) as from_object:
            build(value)
        with pytest.raises(ConfigError) as from_config:
            resolve(config_from_dict({key: value}))
        assert str(from_object.value) == str(from_config.value)
    assert config_key("radius_search").rule is STRATEGY
    with pytest.raises(AcertError, match="unknown radius search 'golden'; choose one of brent"):
        SearchSettings(strategy="golden")
    with pytest.raises(ConfigError, match=r"pgd_steps must be a whole number >= 0, got 2\.5"):
        TrainingAttack(steps=2.5)
    check_key("kappa", 0.5)
    with pytest.raises(ConfigError, match=r"kappa must lie in \[0, 1\], got 2"):
        check_key("kappa", 2)


def test_importing_the_config_and_the_figures_imports_no_training_code():
    """The methods' keys are found when a config first needs them, not when the config (or
    ``acert.records.plots``, which reads run folders through it) is imported."""
    code = (
        "import sys, acert.config, acert.records.plots; "
        "print(sorted(m for m in sys.modules if m.split('.')[:2] in [['acert', p] for p in "
        "('methods', 'bounds', 'radius', 'evaluation', 'workflows')]))"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert found.strip() == "[]"
    assert "kappa" in config_keys() and "acert.methods.ibp" in sys.modules  # found when needed
