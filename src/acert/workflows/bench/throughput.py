"""Training throughput of the default ``acert train``, and what OpenMP's waiting does to it.

OpenMP reads its wait policy and spin count once, when torch loads it, so each waiting setting
is measured in a process of its own (this module run as ``python -m``), in alternating rounds:

- *alone*: the setting the ``acert`` command chooses on a machine no one else is using
  (``acert.foundation.threads.quiet_waiting``; a setting of the user's is kept);
- *spinning*: ``OMP_WAIT_POLICY=ACTIVE``, idle threads that never sleep, the fastest alone;
- *busy*: a process started beside a second CPU-bound process, with the setting the command
  chooses there (docs/PERFORMANCE.md, "A busy machine").

Every process trains the same steps from the same weights on the same digits.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from acert.foundation.errors import AcertError
from acert.foundation.threads import SPIN_COUNT, WAIT_POLICY, quiet_waiting

__all__ = ["SAMPLES", "throughput_by_waiting", "train_samples_per_second"]

SAMPLES = 1024
"""Training digits of a throughput measurement (the default loop's batches over them)."""

WAITINGS = ("alone", "spinning", "busy")


def train_samples_per_second(state: dict | None, device: Any, samples: int = SAMPLES) -> float:
    """Samples per second of the default ACERT training loop (after the ramp, no validation),
    from the weights ``state`` (None: the default model's initialisation)."""
    import torch
    from torch import nn

    from acert.config import TrainConfig, resolve
    from acert.data import BatchLoader, load_imageset, stratified_subset
    from acert.methods import Batch, Step, create_method
    from acert.records.runs import build_model
    from acert.workflows.bench.timing import synchronise

    default = resolve(TrainConfig(device=str(device)))
    method = create_method(default)
    data = stratified_subset(load_imageset("mnist5k", "train"), samples, seed=0)
    loader = BatchLoader(data, default.batch_size, shuffle=True, drop_last=True, device=device)
    trained = build_model(default).to(device)
    if state is not None:
        trained.load_state_dict(state)
    trained.train()
    optimizer = torch.optim.Adam(trained.parameters(), lr=1e-4)
    step = Step(index=10_000, epoch=50, eps=default.eps_max, eps_max=default.eps_max, warmup=False)
    start, seen = time.perf_counter(), 0
    for x, y, idx in loader:
        loss = method.loss(trained, Batch(x, y, idx), step).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(trained.parameters(), default.grad_clip)
        optimizer.step()
        seen += x.shape[0]
    synchronise(device)
    return seen / (time.perf_counter() - start)


def _environment(waiting: str) -> dict[str, str]:
    env = dict(os.environ)
    if waiting == "spinning":
        env.pop(SPIN_COUNT, None)
        env[WAIT_POLICY] = "ACTIVE"
    return env


def _measure_in_child(waiting: str, request: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "acert.workflows.bench.throughput", str(request)],
        env=_environment(waiting),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise AcertError(f"bench: the {waiting} throughput process failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def throughput_by_waiting(
    state: dict | None, repeats: int, samples: int = SAMPLES
) -> dict[str, Any]:
    """Samples per second of the default training loop on the CPU alone, spinning and busy
    (the module docstring), ``repeats`` alternating rounds of one process each; the medians,
    the median ratios of the rounds, and the waiting setting each process ran with."""
    import torch

    from acert.workflows.bench.timing import busy_process

    rates: dict[str, list[float]] = {waiting: [] for waiting in WAITINGS}
    settings: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="acert-bench-") as folder:
        request = Path(folder) / "request.pt"
        torch.save({"state": state, "samples": samples}, request)
        for _ in range(repeats):
            for waiting in WAITINGS:
                beside = busy_process() if waiting == "busy" else contextlib.nullcontext()
                with beside:
                    answer = _measure_in_child(waiting, request)
                rates[waiting].append(answer["samples_per_second"])
                settings[waiting] = answer["waiting"]
    alone, spinning, busy = (rates[waiting] for waiting in WAITINGS)
    return {
        "train_samples_per_second": statistics.median(alone),
        "train_samples_per_second_spinning": statistics.median(spinning),
        "train_samples_per_second_busy": statistics.median(busy),
        "train_alone_over_spinning": statistics.median(
            a / s for a, s in zip(alone, spinning, strict=True)
        ),
        "busy_step_over_alone_step": statistics.median(
            a / b for a, b in zip(alone, busy, strict=True)
        ),
        "waiting": settings,
    }


def main(argv: list[str] | None = None) -> int:
    """One throughput measurement on the CPU, its JSON on the last line of stdout."""
    waiting = quiet_waiting()  # as the acert command does, before torch loads OpenMP
    import torch

    args = sys.argv[1:] if argv is None else argv
    request = torch.load(args[0], weights_only=True)
    rate = train_samples_per_second(request["state"], torch.device("cpu"), request["samples"])
    print(json.dumps({"samples_per_second": rate, "waiting": waiting}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
