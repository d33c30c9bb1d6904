"""Where the points of ``acert sweep --jobs N`` run: processes on this machine, or jobs of
submitit (Meta's launcher library: SLURM, or its local stand-in that runs the same jobs here).

Every launcher runs the same command for a point, a fresh ``python -m acert.workflows.sweep.point``
that trains, resumes or skips the point and certifies it, writing its output to the point's
``sweep.log``. The sweep starts at most N at once, relays their lines and rewrites the study
table as each one ends. This module imports only the standard library at its top: submitit's
jobs unpickle :func:`run_command` from it without loading torch.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from acert.foundation.errors import ConfigError

__all__ = [
    "LAUNCHERS",
    "Job",
    "Launcher",
    "ProcessLauncher",
    "SubmititLauncher",
    "add_launcher_flags",
    "launcher_options",
    "make_launcher",
    "run_command",
    "run_jobs",
]

LAUNCHERS = ("processes", "local", "slurm")
"""``processes``: child processes (``--jobs 1``: the sweep's own process); ``local``: submitit's
LocalExecutor; ``slurm``: one SLURM job per point through submitit."""

SLURM_TIME_MIN = 240
"""Time limit of a SLURM job when none is given (submitit's own default is 5 minutes); a point
cut off by it is resumed from its last epoch by the next ``acert sweep``."""


@dataclass
class Job:
    """One point's command: ``argv`` run with ``env`` added to the environment, its output
    appended to ``log``."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    started: float = field(default=0.0, compare=False)


class Handle(Protocol):
    def poll(self) -> str | None:
        """None while running, ``""`` once done, else why it failed (one line)."""
        ...

    def cancel(self) -> None: ...


class Launcher(Protocol):
    kind: str

    def start(self, job: Job) -> Handle: ...


def last_line(log: Path) -> str:
    """The line that says why a point failed: its ``acert: error:`` line, else its last one."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [line for line in lines if line]
    errors = [line for line in lines if line.startswith("acert: error:")]
    return (errors or lines or [""])[-1].removeprefix("acert: error: ")


def run_command(argv: list[str], env: Mapping[str, str], log: str) -> None:
    """Run a point's command, its output appended to ``log``; raise if it fails (what a
    submitit job runs, on the cluster's node or here)."""
    with open(log, "ab") as stream:
        status = subprocess.run(
            argv,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=stream,
            stderr=subprocess.STDOUT,
            check=False,
        ).returncode
    if status:
        raise RuntimeError(last_line(Path(log)) or f"exited with status {status}")


class _ProcessHandle:
    def __init__(self, job: Job) -> None:
        self.log = job.log
        self.stream = open(job.log, "ab")  # noqa: SIM115 (closed when the process ends)
        self.process = subprocess.Popen(
            job.argv,
            env={**os.environ, **job.env},
            stdin=subprocess.DEVNULL,
            stdout=self.stream,
            stderr=subprocess.STDOUT,
        )

    def poll(self) -> str | None:
        status = self.process.poll()
        if status is None:
            return None
        self.stream.close()
        return "" if status == 0 else last_line(self.log) or f"exited with status {status}"

    def cancel(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.stream.close()


class ProcessLauncher:
    """Each point in a child process of this one."""

    kind = "processes"

    def start(self, job: Job) -> Handle:
        return _ProcessHandle(job)


class _SubmititHandle:
    def __init__(self, job: Any, log: Path) -> None:
        self.job, self.log = job, log

    def poll(self) -> str | None:
        if not self.job.done():
            return None
        try:
            self.job.result()
        except Exception as err:  # the job's own error, or SLURM's (time-out, cancelled)
            lines = [line for line in str(err).splitlines() if line.strip()]
            return last_line(self.log) or (lines[-1] if lines else type(err).__name__)
        return ""

    def cancel(self) -> None:
        self.job.cancel(check=False)


def _submitit(cluster: str) -> Any:
    try:
        import submitit
    except ImportError:
        raise ConfigError(
            f"--launcher {cluster} needs the submitit package; install it with "
            "pip install 'acert[slurm]' (or pip install submitit)"
        ) from None
    if cluster == "slurm" and shutil.which("sbatch") is None:
        raise ConfigError(
            "--launcher slurm needs SLURM's sbatch on PATH: run acert sweep on a SLURM login "
            "node (module load slurm, where clusters use modules), or try the same jobs on "
            "this machine with --launcher local"
        )
    return submitit


def _typed(text: str) -> Any:
    import yaml

    value = yaml.safe_load(text) if text else None
    return value if isinstance(value, int | float | str | bool) else text


class SubmititLauncher:
    """Each point a submitit job: on SLURM (``cluster="slurm"``) or as a local process
    (``"local"``, submitit's LocalExecutor: the same pickled job, run here).

    Args:
        cluster: ``slurm`` or ``local``.
        folder: where submitit keeps its job files and logs.
        options: submitit parameters: its generic ones (timeout_min, cpus_per_task,
            gpus_per_node, mem_gb, ...) or SLURM's (partition, account, qos, mem, ...).
    """

    def __init__(self, cluster: str, folder: Path, options: Mapping[str, Any]) -> None:
        submitit = _submitit(cluster)
        self.kind = cluster
        generic = set(submitit.AutoExecutor._valid_parameters())
        specific = set(submitit.SlurmExecutor._valid_parameters())
        parameters: dict[str, Any] = {"name": "acert-sweep"}
        if cluster == "slurm":
            parameters["timeout_min"] = SLURM_TIME_MIN
        for key, value in options.items():
            if key not in generic | specific:
                known = ", ".join(sorted(generic | specific))
                raise ConfigError(f"unknown --slurm key {key!r}; use one of {known}")
            parameters[key if key in generic else f"slurm_{key}"] = value
        self.executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
        try:
            self.executor.update_parameters(**parameters)
        except (AssertionError, NameError, TypeError, ValueError) as err:
            first = next((line for line in str(err).splitlines() if line.strip()), str(err))
            raise ConfigError(f"submitit refused the --slurm options: {first}") from None
        self.parameters = parameters

    def start(self, job: Job) -> Handle:
        submitted = self.executor.submit(run_command, job.argv, job.env, str(job.log))
        return _SubmititHandle(submitted, job.log)


def add_launcher_flags(sweep: argparse.ArgumentParser) -> None:
    """``acert sweep``'s options of where and how many points run at once."""
    jobs = sweep.add_argument_group("points at once (docs/PERFORMANCE.md, 'Sweeps')")
    jobs.add_argument(
        "--jobs",
        type=int,
        metavar="N",
        help="points run at once, each a process with its share of the cores as --threads "
        "(default 1, in this process; with --launcher slurm: all)",
    )
    jobs.add_argument(
        "--launcher",
        default="processes",
        choices=("processes", "local", "slurm"),
        help="processes on this machine; slurm: one SLURM job per point (submitit); local: "
        "the same submitit jobs run here",
    )
    jobs.add_argument("--slurm-partition", metavar="NAME", help="SLURM partition")
    jobs.add_argument(
        "--slurm-time", type=int, metavar="MIN", help="time limit per point (default 240)"
    )
    jobs.add_argument("--slurm-cpus", type=int, metavar="N", help="CPUs (and threads) per point")
    jobs.add_argument("--slurm-gpus", type=int, metavar="N", help="GPUs per point")
    jobs.add_argument(
        "--slurm",
        action="append",
        metavar="KEY=VALUE",
        help="any other submitit/SLURM parameter, e.g. mem_gb=16, account=abc, qos=high",
    )


def launcher_options(args: argparse.Namespace) -> dict[str, Any]:
    """The submitit parameters of the parsed ``--slurm*`` flags."""
    return parse_slurm_options(
        args.slurm, args.slurm_partition, args.slurm_time, args.slurm_cpus, args.slurm_gpus
    )


def parse_slurm_options(
    pairs: list[str] | None,
    partition: str | None,
    minutes: int | None,
    cpus: int | None,
    gpus: int | None,
) -> dict[str, Any]:
    """The submitit parameters of ``--slurm KEY=VALUE`` and the ``--slurm-*`` flags."""
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--slurm {pair!r} must look like KEY=VALUE (e.g. mem_gb=16)")
        options[key.strip().replace("-", "_")] = _typed(value.strip())
    for key, value in (
        ("partition", partition),
        ("timeout_min", minutes),
        ("cpus_per_task", cpus),
        ("gpus_per_node", gpus),
    ):
        if value is not None:
            options[key] = value
    return options


def make_launcher(kind: str, folder: Path, options: Mapping[str, Any]) -> Launcher:
    """The launcher named ``kind`` (see :data:`LAUNCHERS`), checked before anything runs."""
    if kind not in LAUNCHERS:
        raise ConfigError(f"unknown launcher {kind!r}; choose one of {', '.join(LAUNCHERS)}")
    if kind == "processes":
        if options:
            raise ConfigError("the --slurm options need --launcher slurm (or local)")
        return ProcessLauncher()
    return SubmititLauncher(kind, folder, options)


def _relay(job: Job, offsets: dict[str, int], log: Callable[[str], None]) -> None:
    """Pass on the lines a job appended to its log since the last call, named by its point."""
    try:
        with open(job.log, "rb") as stream:
            stream.seek(offsets.get(job.name, 0))
            data = stream.read()
    except OSError:
        return
    complete = data[: data.rfind(b"\n") + 1]
    offsets[job.name] = offsets.get(job.name, 0) + len(complete)
    for line in complete.decode(errors="replace").splitlines():
        if line.strip():
            log("  " + (line if line.startswith(f"{job.name}: ") else f"{job.name}: {line}"))


def run_jobs(
    launcher: Launcher,
    jobs: list[Job],
    slots: int,
    log: Callable[[str], None],
    done: Callable[[Job], None],
    poll_seconds: float = 0.5,
) -> tuple[list[tuple[Job, str]], list[Job]]:
    """Run ``jobs``, at most ``slots`` at once, calling ``done(job)`` as each succeeds.

    After a failure no further job starts; the running ones finish (their work is kept).
    On an interrupt (Ctrl-C) the running jobs are cancelled; their last epochs are on disk.

    Returns:
        The failed jobs with their reasons, and the jobs never started.
    """
    pending, running = list(jobs), {}
    failures: list[tuple[Job, str]] = []
    offsets = {job.name: job.log.stat().st_size if job.log.is_file() else 0 for job in jobs}
    try:
        while running or (pending and not failures):
            while pending and not failures and len(running) < slots:
                job = pending.pop(0)
                job.started = time.perf_counter()
                running[job.name] = (job, launcher.start(job))
            time.sleep(poll_seconds)
            for name, (job, handle) in list(running.items()):
                outcome = handle.poll()
                _relay(job, offsets, log)
                if outcome is None:
                    continue
                del running[name]
                if outcome:
                    failures.append((job, outcome))
                    log(f"{name}: failed: {outcome}")
                else:
                    log(f"{name}: done in {time.perf_counter() - job.started:.0f} s")
                    done(job)
    except BaseException:
        for _, handle in running.values():
            handle.cancel()
        raise
    return failures, pending


def point_command(spec: str) -> list[str]:
    """The command of one point: this Python, the point's JSON spec."""
    return [sys.executable, "-m", "acert.workflows.sweep.point", spec]
