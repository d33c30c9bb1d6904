"""Arithmetic over the processes of a run (``torchrun --nproc_per_node N -m acert train``).

A run on N processes reproduces the run of one process, up to the order of floating-point
reductions:

- the global batch (``batch_size``) of step s is the batch one process would train on at step
  s (same epoch permutation, same augmentation draws); each process takes a contiguous 1/N of
  it (:func:`shard`);
- train-mode batch-norm normalises with the statistics of the *global* batch
  (:func:`batch_moments`, called by :func:`acert.bounds.clean_forward`), and so do the bounds;
- loss terms that are nonlinear in batch means take them over all processes (:func:`global_sum`);
- epoch metrics are means over all processes (:func:`mean_metrics`).

The gradients are averaged by :func:`acert.workflows.train.ddp.distributed_loss`, evaluations are
shared out by :func:`acert.evaluation.sharded.evaluate_sharded`. This module sits below every
other (bounds, methods, evaluation and training use it) and imports only torch, numpy and
:mod:`acert.foundation.errors`.

Nothing here needs ``torch.distributed`` when one process runs: every helper is the identity.
Every collective is issued by every process in the same order; a method must therefore build
the same computation (no branches on values of its own shard) on every process.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from acert.foundation.errors import ConfigError

__all__ = [
    "World",
    "active",
    "barrier",
    "batch_moments",
    "broadcast_object",
    "check_last_batch",
    "global_sum",
    "launched_world",
    "local_batch_size",
    "mean_metrics",
    "process_device",
    "process_group",
    "seed_process",
    "shard",
    "sum_over_processes",
]

T = TypeVar("T")


# --------------------------------------------------------------------------------- processes
@dataclass(frozen=True)
class World:
    """The processes of a run.

    Attributes:
        rank: this process, 0 .. world_size - 1 (rank 0 writes the run folder).
        world_size: number of processes.
        local_rank: this process on its machine (its GPU under CUDA).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """True when more than one process trains."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes files, logs and progress bars."""
        return self.rank == 0


def active() -> bool:
    """True when a process group of more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def launched_world() -> World:
    """The processes this one belongs to: an initialised process group's, else those torchrun
    describes in ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``, else this process alone."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), local_rank)
    return World(
        int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), local_rank
    )


def local_batch_size(batch_size: int, world_size: int) -> int:
    """Each process's share of the global batch; ConfigError when it does not split evenly."""
    if batch_size % world_size:
        raise ConfigError(
            f"batch_size {batch_size} does not split evenly over {world_size} processes; "
            f"choose a multiple of {world_size} (it is the global batch, shared by all)"
        )
    return batch_size // world_size


def check_last_batch(n: int, batch_size: int, drop_last: bool, world: World) -> None:
    """ConfigError when an epoch's last, partial batch has fewer samples than processes."""
    last = 0 if drop_last else n % batch_size
    if world.enabled and 0 < last < world.world_size:
        raise ConfigError(
            f"the last batch of an epoch holds {last} of the {n} training images, too few for "
            f"{world.world_size} processes; change train_limit or batch_size"
        )


def process_device(device: str | torch.device, world: World) -> torch.device:
    """``cuda:LOCAL_RANK`` for a CUDA device in a run of several processes, else ``device``."""
    chosen = torch.device(device)
    if world.enabled and chosen.type == "cuda":
        return torch.device("cuda", world.local_rank)
    return chosen


@contextlib.contextmanager
def process_group(world: World, device: torch.device) -> Iterator[None]:
    """Join torchrun's process group for the block (nccl on CUDA, gloo on CPU), then leave it.

    Does nothing for one process, or when the caller already initialised a group (which it
    then keeps). The rendezvous comes from torchrun's ``MASTER_ADDR``/``MASTER_PORT``.
    """
    owned = world.enabled and not (dist.is_available() and dist.is_initialized())
    if owned:
        if not dist.is_available():
            raise ConfigError("this PyTorch build has no torch.distributed; run one process")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
        if owned:
            dist.barrier()  # no process leaves while another still sends to it
    finally:
        if owned:
            # DDP's reducer sits in reference cycles; free it while the group still exists,
            # or gloo's threads may be torn down at interpreter exit (std::terminate, SIGABRT)
            gc.collect()
            dist.destroy_process_group()


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every process (nothing for one)."""
    if active():
        dist.barrier()


def broadcast_object(value: T) -> T:
    """Rank 0's ``value`` on every process (picklable values; ``value`` itself for one)."""
    if not active():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def seed_process(seed: int, epoch: int, world: World) -> None:
    """Seed the global torch RNG from (seed, epoch, rank) so that processes draw independent
    numbers (e.g. PGD starts) and a resumed run draws what the straight run drew."""
    if world.enabled:
        state = np.random.SeedSequence([seed, epoch, world.rank]).generate_state(1)
        torch.manual_seed(int(state[0]))


# ----------------------------------------------------------------------- global statistics
class _SumOverProcesses(torch.autograd.Function):
    """All-reduce (sum) whose gradient is the all-reduce of the output gradients."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total


def global_sum(tensor: Tensor) -> Tensor:
    """Element-wise sum over processes, differentiable; ``tensor`` itself for one process.

    Each process's loss then depends on every process's inputs; with gradients averaged over
    the processes, a term that is the same on every process gets its single-process gradient.
    """
    return _SumOverProcesses.apply(tensor) if active() else tensor


def batch_moments(h: Tensor, dims: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
    """Mean and biased variance over ``dims`` of the inputs of all processes together.

    Two passes (mean, then mean squared deviation) as a one-process variance would take, so
    no cancellation of ``E[x²] - E[x]²``; differentiable, two all-reduces.

    Args:
        h: (B, C, ...) this process's activations.
        dims: the dimensions reduced (all but the channel dimension 1).

    Returns:
        mean (C,), variance (C,) and the global count of values per channel (scalar tensor).
    """
    count = h.new_full((1,), h.numel() // h.shape[1])
    totals = global_sum(torch.cat([h.sum(dims), count]))
    n = totals[-1].detach()
    mean = totals[:-1] / n
    shape = (1, -1) + (1,) * (h.dim() - 2)
    var = global_sum(((h - mean.view(shape)) ** 2).sum(dims)) / n
    return mean, var, n


def sum_over_processes(values: Tensor) -> Tensor:
    """Element-wise sum over processes without gradient, on ``values``'s device."""
    if not active():
        return values
    total = values.detach().to(_comm_device(), copy=True)
    dist.all_reduce(total)
    return total.to(values.device)


# ------------------------------------------------------------------------------- batches
def shard(batch_size: int, world: World) -> tuple[slice, float]:
    """This process's rows of a global batch, and the weight of its loss.

    The rows are a contiguous, near-equal share; the weight ``world_size · share / batch``
    (1 for equal shares) makes the average of the processes' gradients that of the global
    batch's mean loss when a last, partial batch does not split evenly.
    """
    if not world.enabled:
        return slice(0, batch_size), 1.0
    lo = batch_size * world.rank // world.world_size
    hi = batch_size * (world.rank + 1) // world.world_size
    return slice(lo, hi), world.world_size * (hi - lo) / batch_size


def mean_metrics(totals: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Means of metrics from per-process ``(Σ value · batch, Σ batch)``, over all processes.

    Each metric is averaged over the samples of the steps that reported it (a method may
    report a metric only once ε > 0).
    """
    keys = sorted(totals)  # the same order on every process
    flat = torch.tensor([v for k in keys for v in totals[k]], dtype=torch.float64)
    flat = sum_over_processes(flat).view(-1, 2)
    means = {
        k: (s / n if n else float("nan")) for k, (s, n) in zip(keys, flat.tolist(), strict=True)
    }
    return {key: means[key] for key in totals}
