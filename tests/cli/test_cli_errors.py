"""Bad input on every command: one line naming the problem and the fix, exit status 2, found
before any work is done and with nothing left behind."""

import json

import pytest

from acert.cli import main
from acert.records.runs import RunDir
from tests.kit import short_flags

# the short run without a PGD evaluation
TINY = short_flags(cert_eps=[0.1], eval_pgd_steps=0, threads=1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny finished run, trained without a PGD evaluation."""
    out = tmp_path_factory.mktemp("errors") / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    return out


def one_line_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("acert: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.train
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--eval-bound", "foo"], "unknown eval_bound 'foo'; choose one of crown, crown-ibp, ibp"),
        (["--set", "radius_search=golden"], "unknown radius_search 'golden'"),
        (["--eval-limit", "5"], "eval_limit must be >= 10"),
        (["--train-limit", "3"], "train_limit must be >= 10"),
        (["--eval-pgd-steps", "-1"], "eval_pgd_steps must be >= 0"),
        (["--batch-size", "1"], "batch_size must be >= 2"),
        (["--threads", "0"], "threads must be >= 1"),
        (["--l1", "-1"], "l1 must be >= 0"),
        (["--lambda-tight", "-5"], "lambda_tight must be >= 0"),
        (["--device", "tpu:0"], "device 'tpu:0'"),
        (
            ["--set", "eps-max=0.2", "--set", "cert_eps=[0.3]"],
            "certification eps 0.3 must lie in (0, eps_max=0.2]",
        ),
        (["--resume"], "--resume needs --out"),
    ],
)
def test_train_options_are_checked_before_anything_runs(argv, message, capsys, tmp_path):
    err = one_line_error(["train", *argv], capsys)
    assert message in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.train
def test_train_data_sizes_beyond_the_dataset_are_errors(tmp_path, capsys):
    out = tmp_path / "run"
    err = one_line_error(["train", "--train-limit", "999999", "--out", str(out)], capsys)
    assert "train_limit 999999 exceeds the 4000 training images of mnist5k" in err
    err = one_line_error(["train", "--val-size", "3000", "--out", str(out)], capsys)
    assert "use a val_size of at most 2000" in err
    assert not out.exists()


@pytest.mark.train
def test_train_out_and_config_of_the_wrong_kind(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    err = one_line_error(["train", *TINY, "--out", str(a_file / "run")], capsys)
    assert f"cannot create folder {a_file / 'run'}" in err and "choose another --out" in err
    assert "is a folder; pass a YAML file" in one_line_error(
        ["train", "--config", str(tmp_path)], capsys
    )
    nothere = tmp_path / "nothere"
    assert "is not a run folder" in one_line_error(
        ["train", "--out", str(nothere), "--resume"], capsys
    )
    assert not nothere.exists()


@pytest.mark.train
def test_a_folder_name_that_reads_as_a_number_is_a_folder_name(tmp_path, monkeypatch):
    from acert.cli import _config_from_args, _parser

    monkeypatch.chdir(tmp_path)
    args = _parser().parse_args(["train", "--out", "2024", "--set", "data_dir=yes"])
    config = _config_from_args(args)
    assert config.out == "2024" and config.data_dir == "yes"


@pytest.mark.train
def test_resume_needs_only_the_run_folder(run, capsys, tmp_path):
    """The saved config is the base of a resume: ``acert train --out RUN --resume`` continues
    a run started with any flags; a flag that changes what is computed is refused."""
    copy = tmp_path / "copy"
    (copy / "checkpoints").mkdir(parents=True)
    for name in ("config.yaml", "checkpoints/last.pt", "checkpoints/best.pt"):
        (copy / name).write_bytes((run / name).read_bytes())
    err = one_line_error(["train", "--out", str(copy), "--resume", "--kappa", "0.5"], capsys)
    assert "--resume with a different config (kappa)" in err
    # where and how it computes may change: threads, and the folder's own name
    assert main(["train", "--out", str(copy), "--resume", "--threads", "2", "--quiet"]) == 0
    resumed = json.loads((copy / "test_metrics.json").read_text())
    assert (
        resumed["clean_accuracy"]
        == json.loads((run / "test_metrics.json").read_text())["clean_accuracy"]
    )


@pytest.mark.train
def test_no_attack_steps_reports_no_pgd_accuracy(run):
    """0 PGD steps would report the clean accuracy under the name of PGD accuracy."""
    assert json.loads((run / "test_metrics.json").read_text())["pgd_accuracy"] == {}


@pytest.mark.train
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch-size", "0"], "batch_size must be >= 1, got 0"),
        (["--device", "gpu"], "unknown device 'gpu'"),
        (["--crown-memory-mib", "nan"], "crown_memory_mib must be > 0"),
        (["--limit", "5"], "--limit 5 cannot cover the 10 classes"),
        (["--bound", "alpha-crown"], "unknown bound 'alpha-crown'"),
        (["--dataset", "cifar10"], "dataset cifar10 (shape (3, 32, 32), 10 classes) does not fit"),
        (["--split", "val"], "unknown split 'val'"),
        (["--limit", "0"], "limit must be >= 1 or null (the whole split), got 0"),
        (["--pgd-steps", "-1"], "pgd_steps must be >= 0 (0 skips the attack)"),
        (["--eps-max", "1.5"], "eps_max must lie in (0, 1]"),
    ],
)
def test_certify_options_are_checked_before_the_work(run, argv, message, capsys):
    assert message in one_line_error(["certify", str(run), *argv], capsys)


def copy_of(run, folder):
    """The run's config and checkpoints in another folder."""
    (folder / "checkpoints").mkdir(parents=True)
    for name in ("config.yaml", "checkpoints/last.pt", "checkpoints/best.pt"):
        (folder / name).write_bytes((run / name).read_bytes())
    return folder


@pytest.mark.train
@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("{}\n", "config.yaml lacks"),
        ("", "config.yaml lacks"),
        ("eps_max: 0.4\n", "config.yaml lacks"),
    ],
)
def test_certify_a_run_whose_config_is_not_resolved(run, tmp_path, capsys, config, message):
    """A config.yaml of {} crashed `acert certify` comparing its null eps_max."""
    copy = copy_of(run, tmp_path / "copy")
    (copy / "config.yaml").write_text(config)
    err = one_line_error(["certify", str(copy)], capsys)
    assert message in err and "not the resolved config" in err and "Traceback" not in err
    assert not (copy / "certify_ibp.json").exists()


@pytest.mark.train
def test_certify_a_run_whose_config_caps_above_one(run, tmp_path, capsys):
    """The run's own eps_max, out of range, is named as the config key, not as --eps-max."""
    copy = copy_of(run, tmp_path / "copy")
    text = (copy / "config.yaml").read_text()
    assert "eps_max: 0.4\n" in text
    (copy / "config.yaml").write_text(text.replace("eps_max: 0.4\n", "eps_max: 5.0\n"))
    err = one_line_error(["certify", str(copy)], capsys)
    assert "config.yaml: eps_max must lie in (0, 1] pixel units, got 5.0" in err


@pytest.mark.train
def test_certify_out_is_checked_before_the_work(run, tmp_path, capsys):
    assert "is a folder; --out takes a file name" in one_line_error(
        ["certify", str(run), "--out", str(tmp_path)], capsys
    )
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert "cannot create folder" in one_line_error(
        ["certify", str(run), "--out", str(a_file / "m.json")], capsys
    )


@pytest.mark.train
def test_certify_elsewhere_keeps_the_runs_own_certificate(run, capsys):
    """A certification on another cap is written beside, not over, certify_ibp.json."""
    common = ["certify", str(run), "--limit", "20", "--pgd-steps", "0", "--quiet"]
    assert main(common) == 0
    own = json.loads((run / "certify_ibp.json").read_text())
    assert main([*common, "--eps-max", "0.2", "--eps", "0.1"]) == 0
    assert json.loads((run / "certify_ibp.json").read_text()) == own
    other = json.loads((run / "certify_ibp_epsmax0.2.json").read_text())
    assert other["eps_max"] == 0.2 and own["eps_max"] == 0.4
    assert "written:" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--shape", "a,b,c"], "--shape must be C,H,W in whole numbers"),
        (["--batch", "5"], "--batch must be >= 10"),
        (["--step-batch", "1"], "--step-batch must be >= 2"),
        (["--device", "npu"], "unknown device 'npu'"),
    ],
)
def test_bench_settings_are_checked_before_measuring(argv, message, capsys):
    assert message in one_line_error(["bench", *argv], capsys)


def test_bench_json_target_is_checked_before_measuring(tmp_path, capsys):
    assert "is a folder; --json takes a file name" in one_line_error(
        ["bench", "--json", str(tmp_path)], capsys
    )


@pytest.mark.train
def test_paths_of_the_wrong_kind_for_sweep_plot_and_download(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert "choose another --study" in one_line_error(
        ["sweep", "--study", str(a_file), "--epochs", "1"], capsys
    )
    assert "is a file, not a study folder" in one_line_error(["plot", str(a_file)], capsys)
    assert "unknown bound 'foo'" in one_line_error(
        ["plot", str(tmp_path), "--bound", "foo"], capsys
    )
    assert "choose another --data-dir" in one_line_error(
        ["download", "mnist", "--data-dir", str(a_file)], capsys
    )


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as done:
        main(["trian"])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'trian'" in err and "--help" in err


@pytest.mark.train
def test_a_diverged_run_before_any_checkpoint_promises_none(tmp_path, capsys):
    out = tmp_path / "run"
    err = one_line_error(["train", *TINY, "--lr", "1e30", "--out", str(out)], capsys)
    assert "the loss became nan at epoch 1, step 1; lower --lr or check the data" in err
    assert "keeps" not in err and not RunDir(out).has_checkpoint("last")


def test_a_run_of_data_given_from_python_asks_for_a_dataset_to_certify_or_export(tmp_path, capsys):
    import torch

    import acert
    from acert.models import create_model

    torch.manual_seed(0)
    images, labels = torch.rand(40, 1, 28, 28), torch.randint(0, 10, (40,))
    model = create_model("mlp-small", (1, 28, 28), 10, [0.1307], [0.3081])
    out = tmp_path / "fit"
    acert.fit(model, (images, labels), out=out, epochs=1, eps_max=0.1, progress=False)
    export = ["export", str(out), "--onnx", str(tmp_path / "n.onnx")]
    for argv in (
        ["certify", str(out)],
        [*export, "--vnnlib", str(tmp_path / "v"), "--eps", "0.1", "--n", "2"],
    ):
        err = one_line_error(argv, capsys)
        assert "data given from Python and has no files to read" in err and "--dataset" in err
