"""CPU threads that hold up on a busy machine (docs/PERFORMANCE.md, "A busy machine").

PyTorch's CPU build runs its intra-op parallel regions on an OpenMP team (GNU OpenMP in the
Linux wheels, which MKL and oneDNN share). A thread of the team that runs out of work spins
before it sleeps, and every parallel region waits for its slowest thread. Beside another
CPU-bound process each region then waits for a thread the kernel has put off the core, while
the spinning threads take the cores the others need: training steps took 6-20x their time alone
on two cores. Not spinning at all (``OMP_WAIT_POLICY=PASSIVE``) holds beside a busy process
(1.3x) but halves the speed of a machine that is not busy (every region pays a wake-up);
spinning for a bounded count (``GOMP_SPINCOUNT=500`` to ``2000``, microseconds) keeps 70-90% of
the idle speed and stays near 2x beside a busy process, while OpenMP's own default spin keeps all
of the idle speed and takes 3-4x beside one (``acert bench``).

OpenMP reads these once, when the library loads, i.e. at ``import torch``, so the choice is
made then, from what the machine is doing: the ``acert`` command bounds the spin when other
processes keep the cores busy as it starts and leaves OpenMP's default on an idle machine
(:func:`quiet_waiting`, :func:`others_busy`); a sweep bounds it for jobs that run beside each
other (:func:`job_environment`). A wait policy or spin count the user set is kept. The choice
changes speed only, never a number. This module imports nothing but the standard library, so
that it can run first.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, MutableMapping

__all__ = [
    "BOUNDED_SPIN",
    "BUSY_CORES",
    "BUSY_SPIN",
    "SPIN_COUNT",
    "WAIT_POLICY",
    "job_environment",
    "others_busy",
    "quiet_waiting",
    "thread_share",
    "usable_cores",
]

WAIT_POLICY = "OMP_WAIT_POLICY"
"""OpenMP's environment variable for what an idle thread does: ACTIVE spins, PASSIVE sleeps."""

SPIN_COUNT = "GOMP_SPINCOUNT"
"""GNU OpenMP's environment variable for how long an idle thread spins before it sleeps (used
when no wait policy is set)."""

BOUNDED_SPIN = "2000"
"""The spin count of a sweep's jobs that run beside each other (docs/PERFORMANCE.md, "A busy
machine"): near the idle speed on cores of their own, near 2x beside a busy process."""

BUSY_SPIN = "500"
"""The spin count of a process that starts on a busy machine: a third more throughput there
than :data:`BOUNDED_SPIN` (docs/PERFORMANCE.md, "A busy machine")."""

BUSY_CORES = 0.5
"""Cores' worth of work by other processes from which the machine counts as busy."""

_WAITING = (WAIT_POLICY, SPIN_COUNT)
_PROC_STAT = "/proc/stat"


def _waiting_in(environ: MutableMapping[str, str]) -> dict[str, str]:
    """The wait policy and spin count set in ``environ``."""
    return {key: environ[key] for key in _WAITING if key in environ}


def _cpu_times(cores: set[int], path: str = _PROC_STAT) -> tuple[int, int]:
    """(busy, total) clock ticks so far, summed over ``cores``, from Linux's ``/proc/stat``."""
    busy = total = 0
    with open(path, encoding="ascii") as stat:
        for line in stat:
            name, *fields = line.split()
            if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores):
                continue
            # user, nice, system, idle, iowait, irq, softirq, steal
            ticks = [int(value) for value in fields[:8]]
            total += sum(ticks)
            busy += sum(ticks) - ticks[3] - ticks[4]
    return busy, total


def others_busy(window: float = 0.1, path: str = _PROC_STAT) -> bool:
    """Whether other processes keep at least :data:`BUSY_CORES` of this process's cores busy,
    measured over ``window`` seconds while this process sleeps (the 1-minute load average where
    ``/proc/stat`` is missing)."""
    cores = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set()
    try:
        busy_before, total_before = _cpu_times(cores, path)
        time.sleep(window)
        busy_after, total_after = _cpu_times(cores, path)
    except (OSError, ValueError):
        try:
            return os.getloadavg()[0] >= BUSY_CORES
        except (AttributeError, OSError):
            return False
    elapsed = total_after - total_before
    if elapsed <= 0:
        return False
    return (busy_after - busy_before) / elapsed * len(cores) >= BUSY_CORES


def quiet_waiting(
    environ: MutableMapping[str, str] | None = None, busy: Callable[[], bool] | None = None
) -> dict[str, str]:
    """Bound the spinning of OpenMP's idle threads (``GOMP_SPINCOUNT=500``) when the machine
    is busy as this process starts, unless the user set a wait policy or a spin count; return
    the settings in force (empty: OpenMP's default).

    Takes effect in this process only if torch has not been imported yet, and in every
    process started from it afterwards.
    """
    environ = os.environ if environ is None else environ
    if not any(key in environ for key in _WAITING) and (busy or others_busy)():
        environ[SPIN_COUNT] = BUSY_SPIN
    return _waiting_in(environ)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a SLURM allocation)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def thread_share(jobs: int, cores: int | None = None) -> int:
    """Threads for each of ``jobs`` processes sharing the cores: at least one."""
    return max(1, (usable_cores() if cores is None else cores) // max(jobs, 1))


def job_environment(threads: int | None, beside_others: bool = True) -> dict[str, str]:
    """Environment variables for a job of a sweep: the waiting settings in force here (the
    bounded spin for jobs ``beside_others``; a lone job chooses as it starts) and, when given,
    its thread count for OpenMP and MKL."""
    extra = _waiting_in(os.environ)
    if not extra and beside_others:
        extra[SPIN_COUNT] = BOUNDED_SPIN
    if threads is not None:
        extra.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return extra
