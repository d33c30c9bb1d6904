"""acert sweep --jobs N and --launcher: points in processes of their own or submitit jobs,
resumable as in one process, the same study table; one line for every launcher problem."""

import json
import shutil
import sys
from pathlib import Path

import pytest

import acert.workflows.sweep.jobs as jobs_module
from acert.cli import main
from acert.foundation.errors import AcertError
from acert.foundation.threads import thread_share
from acert.records.study import study_table
from acert.workflows.sweep.jobs import Job, make_launcher, parse_slurm_options, run_jobs
from acert.workflows.sweep.run import run_state, sweep
from tests.kit import InterruptError, quiet
from tests.workflows.sweep.test_sweep import TINY_FLAGS, tiny

TIMES = ("train_seconds", "time")


def without_times(rows):
    return [{k: v for k, v in row.items() if k not in TIMES} for row in rows]


@pytest.mark.train
def test_two_jobs_give_the_study_one_process_gives(tmp_path):
    grid = {"kappa": [0, 0.5]}
    options = dict(bounds=["ibp"], certify_limit=30)
    sweep(tiny(threads=1), grid, tmp_path / "one", log=quiet, **options)
    lines: list[str] = []
    runs = sweep(tiny(threads=1), grid, tmp_path / "two", log=lines.append, jobs=2, **options)
    assert [run.name for run in runs] == ["acert-kappa0", "acert-kappa0.5"]
    assert without_times(study_table(tmp_path / "two")) == without_times(
        study_table(tmp_path / "one")
    )
    for run in runs:
        assert run_state(run) == "finished" and (run / "certify_ibp.json").is_file()
        assert "epoch 2/2" in (run / "sweep.log").read_text()
        assert f"  {run.name}: epoch 2/2" in "\n".join(lines)  # relayed as the job runs
        assert f"{run.name}: done in" in "\n".join(lines)
    assert "2 points, 2 at once" in "\n".join(lines)


@pytest.mark.train
def test_jobs_skip_finished_points_and_resume_an_interrupted_one(tmp_path):
    folder = tmp_path / "study"
    sweep(tiny("standard"), {"seed": [0]}, folder, bounds=["ibp"], log=quiet)

    def stop_after_first_epoch(line: str) -> None:
        if line.startswith("epoch 1/2"):
            raise InterruptError

    with pytest.raises(InterruptError):
        sweep(tiny("standard"), {"seed": [1]}, folder, bounds=["ibp"], log=stop_after_first_epoch)
    assert run_state(folder / "standard-seed1") == "interrupted"
    lines: list[str] = []
    sweep(tiny("standard"), {"seed": [0, 1]}, folder, bounds=["ibp"], log=lines.append, jobs=2)
    text = "\n".join(lines)
    assert "standard-seed0: finished, skipped" in text
    assert f"standard-seed1: resuming in a processes job (--threads {thread_share(1)})" in text
    assert "standard-seed0: done" not in text
    metrics = json.loads((folder / "standard-seed1" / "test_metrics.json").read_text())
    assert metrics["epochs"] == 2
    assert [row["run"] for row in study_table(folder)] == ["standard-seed0", "standard-seed1"]


@pytest.mark.train
def test_a_failing_point_is_one_line_naming_the_point_and_its_log(tmp_path):
    nowhere = str(tmp_path / "nowhere")
    config = tiny("standard", dataset="fashion-mnist", data_dir=nowhere, cert_eps=[0.1])
    with pytest.raises(AcertError) as err:
        sweep(config, {}, tmp_path / "study", bounds=["ibp"], log=quiet, jobs=2)
    message = str(err.value)
    assert message.startswith("1 of 1 sweep points failed; standard: fashion-mnist train data")
    assert f"(log: {tmp_path / 'study' / 'standard' / 'sweep.log'})" in message
    assert "run the same acert sweep to continue" in message and "\n" not in message


class FakeHandle:
    def __init__(self, outcome: str, events: list[str], name: str) -> None:
        self.outcome, self.events, self.name = outcome, events, name

    def poll(self) -> str | None:
        return self.outcome

    def cancel(self) -> None:
        self.events.append(f"cancel {self.name}")


class FakeLauncher:
    kind = "fake"

    def __init__(self, outcomes: dict[str, str]) -> None:
        self.outcomes, self.events = outcomes, []

    def start(self, job: Job) -> FakeHandle:
        self.events.append(f"start {job.name}")
        with open(job.log, "a") as stream:
            stream.write("started\n")
        return FakeHandle(self.outcomes[job.name], self.events, job.name)


def fake_jobs(tmp_path: Path, names: str) -> list[Job]:
    return [Job(name, [], {}, tmp_path / f"{name}.log") for name in names]


def test_after_a_failure_no_further_job_starts(tmp_path):
    launcher = FakeLauncher({"a": "", "b": "broken", "c": "", "d": ""})
    finished: list[str] = []
    failures, unstarted = run_jobs(
        launcher, fake_jobs(tmp_path, "abcd"), 2, quiet, lambda job: finished.append(job.name), 0
    )
    assert launcher.events == ["start a", "start b"] and finished == ["a"]
    assert [(job.name, why) for job, why in failures] == [("b", "broken")]
    assert [job.name for job in unstarted] == ["c", "d"]


def test_an_interrupt_cancels_the_running_jobs(tmp_path):
    launcher = FakeLauncher({"a": None, "b": None, "c": None})

    def interrupt(_line: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_jobs(launcher, fake_jobs(tmp_path, "abc"), 2, interrupt, quiet, 0)
    assert launcher.events == ["start a", "start b", "cancel a", "cancel b"]


@pytest.mark.train
def test_the_local_launcher_runs_the_points_as_submitit_jobs(tmp_path, capsys):
    pytest.importorskip("submitit")
    folder = tmp_path / "study"
    argv = ["sweep", *TINY_FLAGS, "--grid", "kappa=0.5", "--study", str(folder)]
    argv += ["--bounds", "ibp", "--certify-limit", "30", "--launcher", "local", "--jobs", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "acert-kappa0.5: training in a local job" in out and "acert-kappa0.5: done in" in out
    assert [row["run"] for row in study_table(folder)] == ["acert-kappa0.5"]
    assert any((folder / "submitit").glob("*_log.out"))  # submitit's own job records


@pytest.mark.train
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--jobs", "0"], "--jobs must be >= 1, got 0"),
        (["--slurm-partition", "gpu"], "the --slurm options need --launcher slurm (or local)"),
        (["--launcher", "local", "--slurm", "colour=red"], "unknown --slurm key 'colour'"),
        (["--launcher", "local", "--slurm", "mem_gb"], "--slurm 'mem_gb' must look like KEY="),
        (["--launcher", "slurm"], "--launcher slurm needs SLURM's sbatch on PATH"),
    ],
)
def test_launcher_errors_are_one_line_and_run_nothing(flags, message, tmp_path, capsys):
    pytest.importorskip("submitit")
    if shutil.which("sbatch") is not None and "slurm" in flags:
        pytest.skip("this machine has SLURM")
    study = tmp_path / "study"
    assert main(["sweep", *TINY_FLAGS, "--study", str(study), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("acert: error: ") and message in err and err.count("\n") == 1
    assert not study.exists()


@pytest.mark.train
def test_without_submitit_the_launcher_names_the_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit fails
    study = tmp_path / "study"
    assert main(["sweep", *TINY_FLAGS, "--study", str(study), "--launcher", "slurm"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "acert: error: --launcher slurm needs the submitit package; install it with "
        "pip install 'acert[slurm]' (or pip install submitit)"
    )
    assert not study.exists()


def test_the_slurm_options_become_the_jobs_sbatch_parameters(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setattr(jobs_module.shutil, "which", lambda name: f"/usr/bin/{name}")
    options = parse_slurm_options(["mem_gb=16", "account=abc", "qos=high"], "gpu", 90, 8, 1)
    launcher = make_launcher("slurm", tmp_path / "submitit", options)
    assert launcher.executor._executor.parameters == {
        "job_name": "acert-sweep",
        "partition": "gpu",
        "time": 90,
        "cpus_per_task": 8,
        "gpus_per_node": 1,
        "mem": "16GB",
        "account": "abc",
        "qos": "high",
    }
    default = make_launcher("slurm", tmp_path / "submitit", {})
    assert default.executor._executor.parameters["time"] == jobs_module.SLURM_TIME_MIN
