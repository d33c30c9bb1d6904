"""Timing helpers of ``acert bench``: functions timed in turns, peak memory, and a training step
beside a second busy process.

The busy process is one Python loop on one core that ends by itself (after ten minutes at most)
whatever happens to the bench; it is started for each busy round and killed after it. The
ratio of a step's time beside it to its time alone, in alternating rounds of one run, is what
docs/PERFORMANCE.md ("A busy machine") sets a target for.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = [
    "busy_process",
    "busy_ratio",
    "median_ratio",
    "peak_memory",
    "round_robin",
    "synchronise",
]


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def round_robin(
    fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int
) -> dict[str, list[float]]:
    """Seconds of every call, the functions taking turns (one warm-up round first), so that a
    slow spell of the machine hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            synchronise(device)
            if round_:
                times[name].append(time.perf_counter() - start)
    return times


def median_ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """Median over rounds of ``numerator / denominator`` timed in the same round."""
    ratios = [a / b for a, b in zip(times[numerator], times[denominator], strict=True)]
    return statistics.median(ratios)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the profiler's native start/stop lines on file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes of tensor memory allocated while ``fn`` runs (above what was live before)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - baseline
    from torch.profiler import ProfilerActivity, profile

    with (
        _quiet_stderr(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler,
    ):
        fn()
    records = sorted(
        (event.time_range.start, event.self_cpu_memory_usage)
        for event in profiler.events()
        if event.self_cpu_memory_usage
    )
    live = peak = 0
    for _, change in records:
        live += change
        peak = max(peak, live)
    return peak


BUSY_LOOP = (
    "import time\n"
    "end = time.monotonic() + {seconds}\n"
    "print('busy', flush=True)\n"
    "while time.monotonic() < end:\n"
    "    pass\n"
)


@contextlib.contextmanager
def busy_process(seconds: float = 600.0) -> Iterator[subprocess.Popen]:
    """A second CPU-bound process, running by the time the block starts and killed when it
    ends; it stops by itself after ``seconds`` should the bench die first."""
    process = subprocess.Popen(
        [sys.executable, "-c", BUSY_LOOP.format(seconds=seconds)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        process.stdout.readline()  # its loop has started
        yield process
    finally:
        process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()


def busy_ratio(
    step: Callable[[], Any], device: torch.device, repeats: int, steps: int = 4
) -> dict[str, float]:
    """Seconds per call of ``step`` alone and beside :func:`busy_process`, in alternating
    rounds of ``steps`` calls after one untimed call; the median of the rounds' ratios."""

    def seconds_per_step() -> float:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        synchronise(device)
        return (time.perf_counter() - start) / steps

    step()
    alone, busy = [], []
    for _ in range(repeats):
        alone.append(seconds_per_step())
        with busy_process():
            busy.append(seconds_per_step())
    ratios = [b / a for a, b in zip(alone, busy, strict=True)]
    return {
        "busy_step_over_alone_step": statistics.median(ratios),
        "alone_step_seconds": statistics.median(alone),
        "busy_step_seconds": statistics.median(busy),
    }
