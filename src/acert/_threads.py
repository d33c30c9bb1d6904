"""CPU threads that hold up on a busy machine (docs/PERFORMANCE.md, "A busy machine").

PyTorch's CPU build runs its intra-op parallel regions on an OpenMP team (GNU OpenMP in the
Linux wheels, which MKL and oneDNN share). By default a thread of the team that runs out of
work spins for a while before it sleeps, and every parallel region waits for its slowest
thread. Beside another CPU-bound process each region then waits for a thread the kernel has
put off the core, while the spinning threads take the cores the others need: training steps
took 6-20x their time alone on two cores. With ``OMP_WAIT_POLICY=PASSIVE`` an idle thread
sleeps at once and the same steps take 1.4-1.8x (measured with ``acert bench``).

OpenMP reads the policy once, when the library loads, i.e. at ``import torch``: the ``acert``
command sets it before anything imports torch (:func:`quiet_waiting`), and a sweep hands it to
every job it starts (:func:`job_environment`). A policy the user set is kept. This module
imports nothing but the standard library, so that it can run first.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

__all__ = ["WAIT_POLICY", "job_environment", "quiet_waiting", "thread_share", "usable_cores"]

WAIT_POLICY = "OMP_WAIT_POLICY"
"""OpenMP's environment variable for what an idle thread does: ACTIVE spins, PASSIVE sleeps."""


def quiet_waiting(environ: MutableMapping[str, str] | None = None) -> str:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless it is set already; return the policy in force.

    Takes effect in this process only if torch has not been imported yet, and in every
    process started from it afterwards.
    """
    environ = os.environ if environ is None else environ
    return environ.setdefault(WAIT_POLICY, "PASSIVE")


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
    """Environment variables for a process that computes beside others: the wait policy in
    force here (PASSIVE by default) and, when given, its thread count for OpenMP and MKL."""
    extra = {WAIT_POLICY: os.environ.get(WAIT_POLICY, "PASSIVE")}
    if threads is not None:
        extra.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return extra
