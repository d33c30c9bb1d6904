"""CPU threads that hold up on a busy machine (docs/PERFORMANCE.md, "A busy machine").

PyTorch's CPU build runs its intra-op parallel regions on an OpenMP team (GNU OpenMP in the
Linux wheels, which MKL and oneDNN share). A thread of the team that runs out of work spins
before it sleeps, and every parallel region waits for its slowest thread. Beside another
CPU-bound process each region then waits for a thread the kernel has put off the core, while
the spinning threads take the cores the others need: training steps took 6-20x their time alone
on two cores. Not spinning at all (``OMP_WAIT_POLICY=PASSIVE``) holds beside a busy process
(1.3x) but halves the speed of a machine that is not busy (every region pays a wake-up);
spinning for a bounded count (``GOMP_SPINCOUNT=2000``, a few microseconds) keeps about three
quarters of the idle speed and stays near 2x beside a busy process (``acert bench``, two runs
each).

OpenMP reads these once, when the library loads, i.e. at ``import torch``: the ``acert``
command sets the spin count before anything imports torch (:func:`quiet_waiting`), and a sweep
hands it to every job it starts (:func:`job_environment`). A wait policy or spin count the user
set is kept. This module imports nothing but the standard library, so that it can run first.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

__all__ = [
    "BOUNDED_SPIN",
    "SPIN_COUNT",
    "WAIT_POLICY",
    "job_environment",
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
"""The spin count acert sets by default (docs/PERFORMANCE.md, "A busy machine")."""

_WAITING = (WAIT_POLICY, SPIN_COUNT)


def quiet_waiting(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Bound the spinning of OpenMP's idle threads (``GOMP_SPINCOUNT=2000``) unless the user
    set a wait policy or a spin count; return the settings in force.

    Takes effect in this process only if torch has not been imported yet, and in every
    process started from it afterwards.
    """
    environ = os.environ if environ is None else environ
    if not any(key in environ for key in _WAITING):
        environ[SPIN_COUNT] = BOUNDED_SPIN
    return {key: environ[key] for key in _WAITING if key in environ}


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a SLURM allocation)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def thread_share(jobs: int, cores: int | None = None) -> int:
    """Threads for each of ``jobs`` processes sharing the cores: at least one."""
    return max(1, (usable_cores() if cores is None else cores) // max(jobs, 1))


def job_environment(threads: int | None) -> dict[str, str]:
    """Environment variables for a process that computes beside others: the waiting settings in
    force here (the bounded spin by default) and, when given, its thread count for OpenMP and
    MKL."""
    extra = quiet_waiting(dict(os.environ))
    if threads is not None:
        extra.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return extra
