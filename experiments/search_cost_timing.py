"""ACERT epoch time over IBP epoch time for each training radius search, in one process.

Every setting trains two epochs at ε_max from the same weights (a finished ACERT run's), with
its own radius memory: the first fills the memory (warm starts come from the last epoch, as in
training), the second is timed. The settings take turns, ``--repeats`` rounds; each ratio is the
median over the rounds of (ACERT epoch) / (IBP epoch of the same round). Run it on an otherwise
idle machine.

usage: python experiments/search_cost_timing.py RUN [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from acert.config import resolve
from acert.methods import Batch, Step, create_method
from acert.records.runs import model_from_checkpoint, run_checkpoint
from acert.workflows.certify.runs import run_config
from acert.workflows.train.run import training_sets

SETTINGS = {
    "ibp": {"method": "ibp"},
    "specification": {"method": "acert"},
    "fast (rtol 1e-2, 4 evaluations)": {
        "method": "acert",
        "radius_rtol": 1e-2,
        "radius_max_iter": 4,
    },
    "one (1 evaluation)": {"method": "acert", "radius_max_iter": 1},
}


def epochs(run: str, changes: dict, start: dict, generator_seed: int) -> tuple[float, float]:
    """Seconds of the second of two epochs at ε_max, and its radius evaluations per sample."""
    config = resolve(dataclasses.replace(run_config(run), **changes))
    model = model_from_checkpoint(run_checkpoint(run), run)
    model.load_state_dict(start)
    model.train()
    method = create_method(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    train = training_sets(config)[0]
    seconds, evaluations = 0.0, []
    for epoch in range(2):
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(generator_seed))
        began = time.perf_counter()
        for i, rows in enumerate(order.split(config.batch_size)):
            batch = Batch(train.floats(rows), train.labels[rows], rows)
            step = Step(i, 20 + epoch, config.eps_max, config.eps_max, False)
            optimizer.zero_grad(set_to_none=True)
            terms = method.loss(model, batch, step)
            terms.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            if epoch == 1 and "radius_evals" in terms.metrics:
                evaluations.append(float(terms.metrics["radius_evals"]))
        seconds = time.perf_counter() - began
    return seconds, statistics.mean(evaluations) if evaluations else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a finished ACERT run folder")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = {
        k: v.clone()
        for k, v in model_from_checkpoint(run_checkpoint(args.run), args.run).state_dict().items()
    }
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    evals: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for round_ in range(args.repeats):
        for name, changes in SETTINGS.items():
            seconds, per_sample = epochs(args.run, changes, start, round_)
            times[name].append(seconds)
            evals[name].append(per_sample)
            print(f"round {round_ + 1}: {name}: {seconds:.2f} s, {per_sample:.2f} evaluations")
    print("\n| search | ACERT epoch / IBP epoch | epoch (s) | evaluations per sample |")
    print("|---|---:|---:|---:|")
    for name in SETTINGS:
        ratio = statistics.median(a / b for a, b in zip(times[name], times["ibp"], strict=True))
        print(
            f"| {name} | {ratio:.2f} | {statistics.median(times[name]):.2f} "
            f"| {statistics.mean(evals[name]):.2f} |"
        )


if __name__ == "__main__":
    main()
