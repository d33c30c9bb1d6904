import pytest

from acert.config import TrainConfig, config_from_dict, load_yaml, parse_override, resolve
from acert.errors import ConfigError


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
    ("values", "message"),
    [
        ({"eps_max": 0.0}, "eps_max must lie in"),
        ({"eps_max": 1.0}, "eps_max must lie in"),
        ({"eps_max": 0.2}, "certification eps 0.3 must lie in"),
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
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")):
        config = resolve(config_from_dict(load_yaml(path)))
        assert config.dataset in path.stem
