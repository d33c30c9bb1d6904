"""``acert bench``: what certified training costs, as ratios measured side by side in one process.

Absolute times depend on the machine; the ratios are medians over rounds in which the compared
passes take turns (so a slow spell of a shared machine hits them alike), and they are what the
targets in docs/PERFORMANCE.md refer to.

- bound passes: IBP margin bounds / clean forward; CROWN-IBP / IBP; CROWN / IBP (same inputs);
- radius search: mean bound evaluations per correctly classified sample to reach 1e-4·ε_max,
  for every search strategy, cold and warm-started from the previous epoch's radii;
- training steps: ACERT / IBP / standard, same batch, backward included;
- the ACERT step beside a second CPU-bound process / alone (docs/PERFORMANCE.md, "A busy
  machine");
- peak memory of each (PyTorch's allocator statistics on CUDA; the profiler's allocation
  records on the CPU);
- training throughput of the default ``acert train`` in samples per second.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import platform
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from acert.bounds import clean_forward, input_box, margin_bounds_on_box
from acert.config import BENCH_RUN, TrainConfig, available_device, resolve, tiny_run
from acert.data import load_imageset, stratified_subset
from acert.foundation.errors import AcertError
from acert.foundation.layout import in_layout, model_in_layout
from acert.methods import ACERT, Batch, Step, create_method
from acert.models import create_model
from acert.radius import SEARCHES, KnownBatch, SearchSettings, radius_search
from acert.records.runs import RunDir, build_model, model_from_checkpoint, run_checkpoint
from acert.workflows.bench.table import format_table
from acert.workflows.bench.throughput import (
    SAMPLES,
    throughput_by_waiting,
    train_samples_per_second,
)
from acert.workflows.bench.timing import (
    busy_ratio,
    median_ratio,
    peak_memory,
    round_robin,
)
from acert.workflows.train.run import run as train_run
from acert.workflows.train.run import training_sets

__all__ = ["BenchSettings", "bench", "format_table"]


@dataclass
class BenchSettings:
    """What ``acert bench`` measures on.

    Attributes:
        model: registry name of the model for the bound and step timings.
        shape: input shape (C, H, W) for the bound timings (MNIST size by default).
        batch: batch of the IBP / forward timing (256).
        crown_batch: batch of the CROWN / CROWN-IBP / IBP comparison.
        step_batch: batch of the training-step timings.
        radius_samples: test inputs of the radius-search count.
        repeats: timed rounds (the median ratio over rounds is kept).
        run: a trained run for the radius and step parts; None trains a short reference run.
            The step's warm start is then the radius memory the run saved (its training radii
            of its last epoch), the batch one of its training batches; the radius count has no
            model of one epoch earlier and warm-starts from the model's own radii, which
            flatters it (the short reference run keeps its previous epoch for both).
        device: where to compute.
        throughput_samples: training digits of each throughput measurement (at most 5
            rounds of them, one process per OpenMP waiting setting in each on the CPU).
    """

    model: str = "cnn7-tiny"
    shape: tuple[int, int, int] = (1, 28, 28)
    batch: int = 256
    crown_batch: int = 4
    step_batch: int = 64
    radius_samples: int = 512
    repeats: int = 7
    run: str | None = None
    device: str = "cpu"
    throughput_samples: int = SAMPLES

    def check(self) -> None:
        """An AcertError naming the first setting that cannot be measured on."""
        for flag, size in (("--batch", self.batch), ("--radius-samples", self.radius_samples)):
            if size < 10:
                raise AcertError(f"{flag} must be >= 10 (a digit of every class), got {size}")
        if not 1 <= self.crown_batch <= self.batch:
            raise AcertError(f"--crown-batch must lie in 1..--batch, got {self.crown_batch}")
        if self.step_batch < 2:
            raise AcertError(f"--step-batch must be >= 2 (batch-norm), got {self.step_batch}")
        if self.throughput_samples < 64:
            raise AcertError(
                f"--throughput-samples must be >= 64 (a batch), got {self.throughput_samples}"
            )
        if self.repeats < 1:
            raise AcertError(f"--repeats must be >= 1, got {self.repeats}")
        if len(self.shape) != 3 or min(self.shape) <= 0:
            raise AcertError(f"--shape must be C,H,W with positive sizes, got {self.shape}")
        available_device(self.device)


def _bound_inputs(
    settings: BenchSettings, reference: nn.Sequential, config: TrainConfig, device: torch.device
) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor, float]:
    """Model, inputs, labels and ε of the bound timings.

    At MNIST size: the trained reference model on test digits at ε_max / 4 (how many ReLUs are
    unstable, which sets CROWN's cost, depends on training). At any other shape: the model at
    its IBP initialisation on uniform noise at ε = 1/255.
    """
    if tuple(settings.shape) == (1, 28, 28):
        test = stratified_subset(load_imageset("mnist5k", "test"), settings.batch, seed=1)
        x, y = test.floats().to(device), test.labels.to(device)
        return reference, x, y, config.eps_max / 4
    channels = settings.shape[0]
    model = create_model(settings.model, settings.shape, 10, (0.5,) * channels, (0.25,) * channels)
    model = model.to(device).eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(settings.batch, *settings.shape, generator=generator).to(device)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y, 1 / 255


def _bound_passes(
    settings: BenchSettings, reference: nn.Sequential, config: TrainConfig, device: torch.device
) -> dict[str, float]:
    model, x, y, eps = _bound_inputs(settings, reference, config, device)

    def bounds(method: str, rows: slice) -> Callable[[], Any]:
        return lambda: margin_bounds_on_box(model, input_box(x[rows], eps), y[rows], method)

    every, few = slice(None), slice(0, settings.crown_batch)
    fast: dict[str, Callable[[], Any]] = {
        "forward": lambda: model(x),
        "ibp": bounds("ibp", every),
        "ibp_small_batch": bounds("ibp", few),
        "crown-ibp": bounds("crown-ibp", few),
    }
    out: dict[str, float] = {"bound_eps": eps}
    with torch.no_grad():
        times = round_robin(fast, device, settings.repeats)
        # CROWN is orders of magnitude slower: timed once, against the median IBP time
        times["crown"] = round_robin({"crown": bounds("crown", few)}, device, 1)["crown"]
        out["ibp_over_forward"] = median_ratio(times, "ibp", "forward")
        out["crown_ibp_over_ibp"] = median_ratio(times, "crown-ibp", "ibp_small_batch")
        out["crown_over_ibp"] = times["crown"][0] / statistics.median(times["ibp_small_batch"])
        for name, fn in {**fast, "crown": bounds("crown", few)}.items():
            out[f"{name}_seconds"] = statistics.median(times[name])
            out[f"{name}_peak_bytes"] = peak_memory(fn, device)
    return out


@dataclass
class _Reference:
    """What the radius and step parts measure on.

    Attributes:
        model: the trained model (eval mode).
        earlier: its state one epoch earlier (the model itself for a given run).
        config: their training config.
        saved_method: a given run's saved method state (its radius memory), else None.
    """

    model: nn.Sequential
    earlier: nn.Sequential
    config: TrainConfig
    saved_method: dict | None = None


def _reference_runs(settings: BenchSettings, device: torch.device) -> _Reference:
    """The given run, or a short ACERT run on mnist5k and its model one epoch earlier."""
    if settings.run is not None:
        from acert.workflows.certify.runs import run_config

        payload = run_checkpoint(settings.run)
        model = model_from_checkpoint(payload, settings.run).to(device)
        saved = payload.get("method", {})
        memory = saved if "radius_memory" in saved else None
        return _Reference(model, model, resolve(run_config(settings.run)), memory)
    config = tiny_run(BENCH_RUN, model=settings.model, device=settings.device)
    snapshots: list[dict] = []
    with tempfile.TemporaryDirectory() as folder:
        run_dir = RunDir(folder)

        def keep_epoch(_line: str) -> None:
            snapshots.append(run_dir.load_checkpoint("last")["model"])

        result = train_run(config, out=folder, progress=False, log=keep_epoch)
    earlier = build_model(result.config).to(device)
    earlier.load_state_dict(snapshots[-2])
    return _Reference(result.model.to(device).eval(), earlier.eval(), result.config)


def _radius_counts(reference: _Reference, settings: BenchSettings, device) -> dict[str, float]:
    model, earlier, config = reference.model, reference.earlier, reference.config
    test = load_imageset(config.dataset, "test", config.data_dir)
    test = stratified_subset(test, min(settings.radius_samples, len(test)), seed=0)
    x, y = test.floats().to(device), test.labels.to(device)
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    x, y = x[correct], y[correct]
    tol = 1e-4 * config.eps_max
    out: dict[str, float] = {"radius_samples": int(correct.sum())}
    for name in SEARCHES:
        search = SearchSettings(strategy=name, xtol=tol)
        result = radius_search(model, x, y, config.eps_max, "ibp", search)
        out[f"radius_evals_per_sample_{name}"] = result.mean_evaluations
    brent = SearchSettings(xtol=tol)
    previous = radius_search(earlier, x, y, config.eps_max, "ibp", brent).radius
    warm_start = KnownBatch(guess=previous)
    warm = radius_search(model, x, y, config.eps_max, "ibp", brent, known=warm_start)
    out["radius_evals_per_sample_brent_warm"] = warm.mean_evaluations
    return out


def _step_times(
    reference: _Reference, settings: BenchSettings, device: torch.device
) -> dict[str, float]:
    """Standard, IBP and ACERT steps (loss + backward) on one training batch.

    The warm-started ACERT step starts every round from the radii the model of one epoch
    earlier gave this batch, or from a given run's saved radius memory, as in training
    (repeating the step on an unchanged model would otherwise hand the search its own
    answer); the cold step has no radius memory.
    """
    model, config = reference.model, reference.config
    train = training_sets(config)[0]
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[
        : settings.step_batch
    ]
    batch = Batch(train.floats(idx).to(device), train.labels[idx].to(device), idx.to(device))
    step = Step(index=10_000, epoch=50, eps=config.eps_max, eps_max=config.eps_max, warmup=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    methods = {
        name: create_method(dataclasses.replace(config, method=name, radius_warm_start=warm))
        for name, warm in (("standard", False), ("ibp", False), ("acert", True))
    }
    methods["acert_cold"] = create_method(
        dataclasses.replace(config, method="acert", radius_warm_start=False)
    )
    methods["acert_training_pass"] = create_method(  # the training pass checks the cap
        dataclasses.replace(config, method="acert", cap_check="training-pass")
    )
    primed = reference.saved_method or _primed_radius_memory(
        methods["acert"], reference.earlier, batch, step
    )
    trained = model.train()
    # the same steps with images and convolution weights channels-last (the layout key)
    nhwc = model_in_layout(copy.deepcopy(model), "channels-last").train()
    nhwc_batch = dataclasses.replace(batch, x=in_layout(batch.x, "channels-last"))
    for name in ("ibp", "acert"):
        methods[f"{name}_channels_last"] = create_method(
            dataclasses.replace(config, method=name, radius_warm_start=name == "acert")
        )
    steps: dict[str, Callable[[], Any]] = {}
    for name, method in methods.items():
        net, data = (nhwc, nhwc_batch) if name.endswith("channels_last") else (trained, batch)

        def one_step(method=method, net=net, data=data) -> None:
            if getattr(method, "memory", None) is not None and primed is not None:
                method.load_state_dict(primed)
            net.zero_grad(set_to_none=True)
            method.loss(net, data, step).loss.backward()

        steps[name] = one_step
    times = round_robin(steps, device, settings.repeats)
    busy = busy_ratio(steps["acert"], device, settings.repeats)  # a neighbour comes later
    out: dict[str, float] = {
        "acert_step_over_ibp_step": median_ratio(times, "acert", "ibp"),
        "acert_cold_step_over_ibp_step": median_ratio(times, "acert_cold", "ibp"),
        "ibp_step_over_standard_step": median_ratio(times, "ibp", "standard"),
        "acert_training_pass_step_over_ibp_step": median_ratio(times, "acert_training_pass", "ibp"),
        "ibp_step_channels_last_over_contiguous": median_ratio(times, "ibp_channels_last", "ibp"),
        "acert_step_channels_last_over_contiguous": median_ratio(
            times, "acert_channels_last", "acert"
        ),
        **{f"acert_started_alone_{key}": value for key, value in busy.items()},
    }
    for name, one_step in steps.items():
        out[f"{name}_step_seconds"] = statistics.median(times[name])
        out[f"{name}_step_peak_bytes"] = peak_memory(one_step, device)
    model.load_state_dict(state)
    model.eval()
    return out


def _primed_radius_memory(
    method: ACERT, earlier: nn.Sequential, batch: Batch, step: Step
) -> dict | None:
    """The ACERT method's state after one search with the earlier model (None: no memory)."""
    if method.memory is None:
        return None
    was_training = earlier.training
    with torch.no_grad():
        logits, stats = clean_forward(earlier.train(), batch.x)
        method.adaptive_radii(earlier, batch, step, logits, stats)
    earlier.train(was_training)
    return method.state_dict()


def _throughput(
    model: nn.Sequential, config: TrainConfig, settings: BenchSettings, device: torch.device
) -> dict[str, Any]:
    """Samples per second of the default ACERT training loop from the reference weights (when
    the reference is the default model): on the CPU alone, spinning and beside a busy process,
    each in a process of its own (:mod:`acert.workflows.bench.throughput`); on a GPU here."""
    default = resolve(TrainConfig(device=settings.device))
    state = model.state_dict() if default.model == config.model else None
    if device.type != "cpu":
        return {"train_samples_per_second": train_samples_per_second(state, device)}
    return throughput_by_waiting(state, min(settings.repeats, 5), settings.throughput_samples)


def processor_name(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The processor's model name with its family and model numbers (Linux), e.g. "AMD EPYC
    (family 25, model 17)"; the platform's name for it elsewhere."""
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as info:
            for line in info:
                key, _, value = line.partition(":")
                if not line.strip():
                    break  # the first processor's block is enough
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def bench(settings: BenchSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every measurement; return the JSON-ready results (ratios first, then raw numbers)."""
    settings.check()
    device = torch.device(settings.device)
    log(f"reference model ({settings.run or 'a short ACERT run on mnist5k'}) ...")
    reference = _reference_runs(settings, device)
    model, config = reference.model, reference.config
    log("bound passes ...")
    raw = _bound_passes(settings, model, config, device)
    log("radius search ...")
    raw.update(_radius_counts(reference, settings, device))
    log("training steps ...")
    raw.update(_step_times(reference, settings, device))
    log("training throughput ...")
    throughput = _throughput(model, config, settings, device)
    raw.update((key, value) for key, value in throughput.items() if key != "waiting")
    results = {
        "ibp_over_forward": raw["ibp_over_forward"],
        "crown_ibp_over_ibp": raw["crown_ibp_over_ibp"],
        "crown_over_ibp": raw["crown_over_ibp"],
        "radius_evals_per_sample": raw["radius_evals_per_sample_brent"],
        "radius_evals_per_sample_bisection": raw["radius_evals_per_sample_bisection"],
        "radius_evals_per_sample_warm": raw["radius_evals_per_sample_brent_warm"],
        "acert_step_over_ibp_step": raw["acert_step_over_ibp_step"],
        "acert_cold_step_over_ibp_step": raw["acert_cold_step_over_ibp_step"],
        "ibp_step_over_standard_step": raw["ibp_step_over_standard_step"],
        "acert_training_pass_step_over_ibp_step": raw["acert_training_pass_step_over_ibp_step"],
        "ibp_step_channels_last_over_contiguous": raw["ibp_step_channels_last_over_contiguous"],
        "acert_step_channels_last_over_contiguous": raw["acert_step_channels_last_over_contiguous"],
        "busy_step_over_alone_step": throughput.get("busy_step_over_alone_step"),
        "train_samples_per_second": throughput["train_samples_per_second"],
        "train_samples_per_second_spinning": throughput.get("train_samples_per_second_spinning"),
    }
    machine = {
        "device": str(device),
        "cpu": processor_name(),
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
        "throughput_waiting": throughput.get("waiting"),
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    # the radius and step parts (and the bound passes at MNIST size) run on the reference model
    used = {**dataclasses.asdict(settings), "reference_model": config.model}
    return {**results, "settings": used, "machine": machine, "raw": raw}
