"""`acert bench` measures every figure issue 4 asks for, as finite positive numbers."""

import contextlib
import json
import math
import subprocess

import pytest
import torch

from acert.cli import main
from acert.config import TrainConfig
from acert.workflows.bench.run import BenchSettings, bench, format_table
from acert.workflows.bench.timing import busy_process, busy_ratio
from acert.workflows.train.run import run
from tests.kit import tiny_run

CPU = torch.device("cpu")

KEYS = (
    "ibp_over_forward",
    "crown_ibp_over_ibp",
    "crown_over_ibp",
    "radius_evals_per_sample",
    "radius_evals_per_sample_bisection",
    "acert_step_over_ibp_step",
    "acert_cold_step_over_ibp_step",
    "acert_training_pass_step_over_ibp_step",
    "ibp_step_over_standard_step",
    "ibp_step_channels_last_over_contiguous",
    "acert_step_channels_last_over_contiguous",
    "busy_step_over_alone_step",
    "train_samples_per_second",
    "train_samples_per_second_spinning",
)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "run"
    config = tiny_run(
        val_size=0,
        stn_epochs=TrainConfig.stn_epochs,
        eval_limit=50,
        eval_pgd_steps=0,
        cert_eps=[0.4],
        lr=None,
    )
    run(config, out=out, progress=False, log=lambda _: None)
    return out


@pytest.mark.train
def test_bench_reports_every_ratio(trained_run):
    settings = BenchSettings(
        model="mlp-small",
        batch=32,
        crown_batch=2,
        step_batch=16,
        radius_samples=64,
        repeats=1,
        run=str(trained_run),
        throughput_samples=64,
    )
    results = bench(settings, log=lambda _: None)
    for key in KEYS:
        assert isinstance(results[key], float) and math.isfinite(results[key]) and results[key] > 0
    # plain bisection needs about log2(1e4) evaluations; Brent far fewer
    assert results["radius_evals_per_sample_bisection"] > results["radius_evals_per_sample"]
    assert results["raw"]["ibp_peak_bytes"] > 0 and results["raw"]["acert_step_peak_bytes"] > 0
    # each waiting setting ran in a process of its own, with the setting it names
    waiting = results["machine"]["throughput_waiting"]
    assert waiting["spinning"] == {"OMP_WAIT_POLICY": "ACTIVE"}
    assert waiting["busy"] in ({"GOMP_SPINCOUNT": "500"}, waiting["alone"])  # or the user's
    table = format_table(results)
    assert "IBP bounds / clean forward" in table and "peak memory, CROWN" in table
    assert "training step started beside a busy process / alone" in table


@pytest.mark.train
def test_bench_command_writes_json(trained_run, tmp_path, capsys):
    target = tmp_path / "bench.json"
    argv = [
        "bench",
        "--model",
        "mlp-small",
        "--batch",
        "16",
        "--crown-batch",
        "2",
        "--step-batch",
        "8",
        "--radius-samples",
        "32",
        "--repeats",
        "1",
        "--run",
        str(trained_run),
        "--throughput-samples",
        "64",
        "--json",
        str(target),
    ]
    assert main(argv) == 0
    written = json.loads(target.read_text())
    assert all(key in written for key in KEYS)
    assert "training throughput" in capsys.readouterr().out
    assert main(["bench", "--shape", "1,28"]) == 2


@pytest.mark.train
def test_a_given_run_warm_starts_the_acert_step_from_its_saved_radius_memory(
    trained_run, monkeypatch
):
    """Not from radii the model itself just gave the batch, which would hand the search its
    own answers: the run's memory holds the radii of its last epoch, as the next epoch sees."""
    import acert.workflows.bench.run as bench_module
    from acert.records.runs import RunDir

    reference = bench_module._reference_runs(BenchSettings(run=str(trained_run)), "cpu")
    saved = RunDir(trained_run).load_checkpoint("last")["method"]["radius_memory"]["radius"]
    remembered = reference.saved_method["radius_memory"]["radius"]
    assert torch.equal(remembered.nan_to_num(-1), saved.nan_to_num(-1))
    assert (remembered > 0).any()

    def primed_from_the_model(*args):
        raise AssertionError("the step primed its memory from the model itself")

    monkeypatch.setattr(bench_module, "_primed_radius_memory", primed_from_the_model)
    settings = BenchSettings(step_batch=8, repeats=1, run=str(trained_run))
    out = bench_module._step_times(reference, settings, torch.device("cpu"))
    assert out["acert_step_over_ibp_step"] > 0


def test_the_busy_process_runs_during_the_block_and_is_gone_after_it():
    with busy_process() as process:
        assert process.poll() is None
    assert process.returncode is not None
    with pytest.raises(KeyError), busy_process() as failing:
        raise KeyError
    assert failing.returncode is not None


def test_busy_ratio_times_the_step_alone_and_beside_the_busy_process(monkeypatch):
    """The step runs once untimed, then `steps` times in each alone and busy round; the busy
    rounds run while the second process is alive."""
    import acert.workflows.bench.timing as timing

    live: list[subprocess.Popen] = []
    seen: list[bool] = []
    real = timing.busy_process

    @contextlib.contextmanager
    def tracked(seconds: float = 600.0):
        with real(seconds) as process:
            live.append(process)
            yield process
            live.clear()

    monkeypatch.setattr(timing, "busy_process", tracked)
    out = busy_ratio(lambda: seen.append(any(p.poll() is None for p in live)), CPU, 2, steps=3)
    assert seen == [False] + ([False] * 3 + [True] * 3) * 2
    assert out["busy_step_over_alone_step"] > 0 and out["alone_step_seconds"] > 0


def test_the_machine_names_its_processor(tmp_path):
    from acert.workflows.bench.run import processor_name

    info = tmp_path / "cpuinfo"
    block = "processor\t: {n}\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
    block += "model name\t: AMD EPYC 9B14\nflags\t\t: fpu avx512f\n\n"
    info.write_text(block.format(n=0) + block.format(n=1).replace("9B14", "other"))
    assert processor_name(str(info)) == "AMD EPYC 9B14 (family 25, model 17)"
    assert processor_name(str(tmp_path / "missing"))  # the platform's name, never empty
