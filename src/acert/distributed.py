"""Training on several processes: ``torchrun --nproc_per_node N -m acert train ...``.

A run on N processes reproduces the run of one process, up to the order of floating-point
reductions:

- the global batch (``batch_size``) of step s is the batch one process would train on at step
  s (same epoch permutation, same augmentation draws); each process takes a contiguous 1/N of
  it (:func:`shard`);
- train-mode batch-norm normalises with the statistics of the *global* batch
  (:func:`batch_moments`, called by :func:`acert.bounds.clean_forward`), and so do the bounds;
- gradients are averaged by ``DistributedDataParallel`` wrapped around the whole loss of a
  method (:func:`distributed_loss`), so the reducer sees every pass the method makes over the
  layers, not only ``model(x)``;
- epoch metrics are means over all processes (:func:`mean_metrics`); evaluations are sharded by
  whole evaluation batches and summed (:func:`evaluate_sharded`).

Nothing here needs ``torch.distributed`` when one process runs: every helper is the identity.
Every collective is issued by every process in the same order; a method must therefore build
the same computation (no branches on values of its own shard) on every process.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from acert.errors import ConfigError

if TYPE_CHECKING:  # acert.bounds imports this module: no acert imports at run time
    from acert.evaluate import Evaluation
    from acert.methods import Batch, LossTerms, Step, TrainingMethod

__all__ = [
    "World",
    "active",
    "barrier",
    "batch_moments",
    "broadcast_object",
    "check_last_batch",
    "distributed_loss",
    "evaluate_sharded",
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


# ---------------------------------------------------------------------------------- training
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


class _MethodLoss(nn.Module):
    """A method's loss as the forward pass of a module that owns the model's parameters."""

    def __init__(self, model: nn.Sequential, method: TrainingMethod) -> None:
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, batch: Batch, step: Step) -> LossTerms:
        return self.method.loss(self.model, batch, step)


def distributed_loss(
    model: nn.Sequential, method: TrainingMethod, world: World
) -> Callable[[Batch, Step], LossTerms]:
    """``loss(batch, step) -> LossTerms``; across processes, one that averages the gradients.

    ``DistributedDataParallel`` prepares its gradient reducer in its forward pass, and a method
    runs the model layer by layer (clean pass, bound passes), not through ``model(x)``; so the
    whole ``method.loss`` is the forward pass of the wrapped module, and every parameter the
    loss touches, in any pass, is reduced. The model is used, not copied.
    """
    if not world.enabled:
        return functools.partial(method.loss, model)
    # device_ids=None: the batches are already on the model's device (cpu or cuda:LOCAL_RANK)
    return nn.parallel.DistributedDataParallel(_MethodLoss(model, method), device_ids=None)


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


# -------------------------------------------------------------------------------- evaluation
def _rows(n: int, chunk: int, world: World) -> slice:
    """A contiguous share of whole evaluation batches, the first shares the larger ones (so
    each batch is one a single process evaluates and gives the same per-sample results)."""
    chunks = math.ceil(n / chunk)
    lo = math.ceil(chunks * world.rank / world.world_size) * chunk
    hi = math.ceil(chunks * (world.rank + 1) / world.world_size) * chunk
    return slice(min(lo, n), min(hi, n))


def _counts(part: Evaluation, size: int) -> Tensor:
    """[bound evaluations, correct, certified per ε, PGD-robust per ε] of ``size`` samples."""
    fractions = [
        part.clean_accuracy,
        *part.certified_accuracy.values(),
        *part.pgd_accuracy.values(),
    ]
    counts = [part.radius_evaluations * size, *(round(f * size) for f in fractions)]
    return torch.tensor(counts, dtype=torch.float64)


def evaluate_sharded(
    model: nn.Sequential,
    x: Tensor,
    y: Tensor,
    eps_max: float,
    world: World,
    cert_eps: Sequence[float] = (),
    bound: str = "ibp",
    pgd_eps: Sequence[float] | None = None,
    batch_size: int = 256,
    **kwargs: Any,
) -> Evaluation:
    """:func:`acert.evaluate.evaluate` with the samples shared out among the processes.

    Each process evaluates a contiguous run of whole ``batch_size`` batches; the counts and
    the per-sample radii are summed, so every process returns the evaluation of all samples.
    Clean and certified accuracy and the radii are one process's; PGD starts are drawn per
    process, so PGD accuracy can differ by the luck of the random starts.

    Args:
        model, x, y, eps_max, cert_eps, bound, pgd_eps, batch_size: as for ``evaluate``.
        world: the processes.
        **kwargs: further ``evaluate`` arguments (pgd_steps, device, progress).
    """
    from acert.evaluate import (  # see the TYPE_CHECKING imports
        Evaluation,
        acceps,
        attacked_radii,
        evaluate,
    )

    cert_eps = list(dict.fromkeys(cert_eps))
    pgd_eps = attacked_radii(cert_eps, pgd_eps, kwargs.get("pgd_steps", 20))
    run = functools.partial(
        evaluate,
        eps_max=eps_max,
        cert_eps=cert_eps,
        bound=bound,
        pgd_eps=pgd_eps,
        batch_size=batch_size,
        **kwargs,
    )
    if not world.enabled:
        return run(model, x, y)
    n, rows = x.shape[0], _rows(x.shape[0], batch_size, world)
    head = 2 + len(cert_eps) + len(pgd_eps)
    totals = torch.zeros(head + n, dtype=torch.float64)
    if rows.stop > rows.start:
        part = run(model, x[rows], y[rows])
        totals[:head] = _counts(part, rows.stop - rows.start)
        totals[head:][rows] = part.radii.double()
    totals = sum_over_processes(totals)
    correct, certified = totals[1].item(), totals[2 : 2 + len(cert_eps)].tolist()
    robust, radii = totals[2 + len(cert_eps) : head].tolist(), totals[head:].float()
    clean, acr = correct / n, radii.mean().item()
    return Evaluation(
        n=n,
        bound=bound,
        eps_max=eps_max,
        clean_accuracy=clean,
        acr=acr,
        acceps=acceps(acr, eps_max, clean),
        certified_accuracy={e: c / n for e, c in zip(cert_eps, certified, strict=True)},
        pgd_accuracy={e: c / n for e, c in zip(pgd_eps, robust, strict=True)},
        radius_evaluations=totals[0].item() / n,
        radii=radii,
    )
