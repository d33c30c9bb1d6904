"""The command line: a short real run, certify, and one-line errors with exit status 2."""

import json
import subprocess
import sys

import pytest
import torch

from acert.cli import _computes, main
from tests.kit import short_flags

TINY = short_flags(eval_pgd_steps=2)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    return out


@pytest.mark.train
def test_train_prints_metrics_and_writes_the_run(trained_run, capsys):
    assert (trained_run / "test_metrics.json").is_file()
    assert (trained_run / "checkpoints" / "last.pt").is_file()


@pytest.mark.train
def test_certify_with_crown_writes_json(trained_run, capsys):
    assert (
        main(
            [
                "certify",
                str(trained_run),
                "--bound",
                "crown",
                "--limit",
                "30",
                "--pgd-steps",
                "0",
                "--quiet",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "ACR" in printed and "certified acc @ 0.1" in printed
    assert "float32 on cpu, IEEE (no TF32, no autocast), gradual underflow" in printed
    metrics = json.loads((trained_run / "certify_crown.json").read_text())
    assert metrics["bound"] == "crown" and metrics["n"] == 30 and metrics["pgd_accuracy"] == {}
    assert metrics["arithmetic"] == {
        "dtype": "float32", "device": "cpu", "ieee": True, "tf32": False, "autocast": False,
        "flush_to_zero": False,
    }  # fmt: skip
    radii = torch.load(trained_run / "certify_crown.radii.pt")
    assert radii.shape == (30,) and metrics["acr"] == pytest.approx(radii.mean().item(), rel=1e-5)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["train", "--kappa", "2"], "kappa must lie in [0, 1]"),
        (["train", "--eps-max", "1.5"], "eps_max must lie in (0, 1]"),
        (
            ["train", "--eps-max", "0.2", "--cert-eps", "0.3"],
            "certification eps 0.3 must lie in (0, eps_max=0.2]",
        ),
        (["train", "--epochs", "many"], "'epochs' needs int"),
        (["train", "--set", "colour=red"], "unknown config key 'colour'"),
        (
            ["train", "--config", "/nonexistent.yaml"],
            "config file /nonexistent.yaml does not exist",
        ),
        (["certify", "/nonexistent/run"], "does not exist"),
        (["train", "--dataset", "cifar10", "--data-dir", "/nonexistent"], "cifar10"),
    ],
)
def test_bad_input_is_one_line_with_exit_status_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("acert: error: ") and message in err
    assert err.count("\n") == 1


@pytest.mark.train
def test_certify_rejects_eps_beyond_eps_max_and_corrupt_checkpoints(trained_run, tmp_path, capsys):
    assert main(["certify", str(trained_run), "--eps", "0.5"]) == 2
    assert "certification eps 0.5 exceeds eps_max=0.4; raise --eps-max" in capsys.readouterr().err
    assert main(["certify", str(trained_run), "--eps", "-0.1"]) == 2
    assert "cert_eps must lie in (0, 1] pixel units, got -0.1" in capsys.readouterr().err
    corrupt = tmp_path / "bad.pt"
    corrupt.write_bytes(b"not a checkpoint")
    assert main(["certify", str(corrupt)]) == 2
    assert "corrupt or not a torch file" in capsys.readouterr().err


def test_console_script_runs_as_a_module():
    done = subprocess.run(
        [sys.executable, "-m", "acert", "list"], capture_output=True, text=True, check=True
    )
    assert "mnist5k" in done.stdout and "acert" in done.stdout and "cnn7" in done.stdout


@pytest.mark.train
def test_certify_check_float64_finds_no_failing_certificate(trained_run, capsys):
    argv = ["certify", str(trained_run), "--limit", "30", "--pgd-steps", "0", "--check-float64"]
    assert main([*argv, "--quiet", "--out", str(trained_run / "f64.json")]) == 0
    assert "0 of" in capsys.readouterr().out
    metrics = json.loads((trained_run / "f64.json").read_text())
    check = metrics["float64_check"]
    assert check["violations"] == 0 and check["checked"] == sum(
        1 for r in torch.load(trained_run / "f64.radii.pt") if r > 0
    )


@pytest.mark.train
def test_export_command_writes_onnx_and_properties(trained_run, tmp_path, capsys):
    onnx_path, vnnlib = tmp_path / "bench" / "onnx" / "model.onnx", tmp_path / "bench" / "vnnlib"
    argv = ["export", str(trained_run), "--onnx", str(onnx_path), "--vnnlib", str(vnnlib)]
    assert main([*argv, "--eps", "0.05", "--n", "10"]) == 0
    assert "onnxruntime matches torch" in capsys.readouterr().out
    assert onnx_path.is_file() and len(list(vnnlib.glob("prop_*.vnnlib"))) == 10
    assert (tmp_path / "bench" / "instances.csv").read_text().count("\n") == 10
    assert main([*argv, "--eps", "1.5", "--n", "10"]) == 2
    assert "eps" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "computes"),
    [
        (["train", "--quick"], True),
        (["--quiet", "certify", "run"], True),
        (["certify", "list"], True),
        (["sweep", "--help"], False),
        (["list"], False),
        (["download", "mnist"], False),
        (["-h"], False),
        ([], False),
    ],
)
def test_only_the_commands_that_compute_look_at_the_machines_load(argv, computes):
    assert _computes(argv) is computes
