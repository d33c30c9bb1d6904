"""The text table ``acert bench`` prints from :func:`acert.workflows.bench.run.bench`'s results."""

from __future__ import annotations

from typing import Any

__all__ = ["format_table"]


def _waiting(settings: dict[str, str]) -> str:
    return " ".join(f"{key}={value}" for key, value in settings.items()) or "OpenMP's default"


def format_table(results: dict[str, Any]) -> str:
    """The results as an aligned text table."""
    raw = results["raw"]
    rows = [
        (
            "IBP bounds / clean forward",
            f"{results['ibp_over_forward']:.2f}x",
            f"{1e3 * raw['ibp_seconds']:.1f} / {1e3 * raw['forward_seconds']:.1f} ms",
        ),
        (
            "CROWN-IBP / IBP",
            f"{results['crown_ibp_over_ibp']:.2f}x",
            f"{1e3 * raw['crown-ibp_seconds']:.1f} / {1e3 * raw['ibp_small_batch_seconds']:.1f} ms",
        ),
        (
            "CROWN / IBP",
            f"{results['crown_over_ibp']:.2f}x",
            f"{1e3 * raw['crown_seconds']:.1f} ms",
        ),
        ("radius evals / sample, brent", f"{results['radius_evals_per_sample']:.2f}", ""),
        (
            "radius evals / sample, bisection",
            f"{results['radius_evals_per_sample_bisection']:.2f}",
            "",
        ),
        ("radius evals / sample, brent warm", f"{results['radius_evals_per_sample_warm']:.2f}", ""),
        (
            "ACERT step / IBP step",
            f"{results['acert_step_over_ibp_step']:.2f}x",
            f"{1e3 * raw['acert_step_seconds']:.1f} / {1e3 * raw['ibp_step_seconds']:.1f} ms",
        ),
        (
            "ACERT step, cold search / IBP step",
            f"{results['acert_cold_step_over_ibp_step']:.2f}x",
            f"{1e3 * raw['acert_cold_step_seconds']:.1f} ms",
        ),
        (
            "ACERT step, cap checked by the training pass / IBP step",
            f"{results['acert_training_pass_step_over_ibp_step']:.2f}x",
            f"{1e3 * raw['acert_training_pass_step_seconds']:.1f} ms",
        ),
        (
            "IBP step / standard step",
            f"{results['ibp_step_over_standard_step']:.2f}x",
            f"{1e3 * raw['standard_step_seconds']:.1f} ms standard",
        ),
        (
            "IBP step, channels-last / contiguous",
            f"{results['ibp_step_channels_last_over_contiguous']:.2f}x",
            f"{1e3 * raw['ibp_channels_last_step_seconds']:.1f} ms channels-last",
        ),
        (
            "ACERT step, channels-last / contiguous",
            f"{results['acert_step_channels_last_over_contiguous']:.2f}x",
            f"{1e3 * raw['acert_channels_last_step_seconds']:.1f} ms channels-last",
        ),
        (
            "ACERT step, a neighbour comes later / alone",
            f"{raw['acert_started_alone_busy_step_over_alone_step']:.2f}x",
            f"{1e3 * raw['acert_started_alone_busy_step_seconds']:.1f} / "
            f"{1e3 * raw['acert_started_alone_alone_step_seconds']:.1f} ms",
        ),
        ("training throughput", f"{results['train_samples_per_second']:.0f} samples/s", ""),
    ]
    if results["busy_step_over_alone_step"] is not None:  # measured on the CPU
        waiting = results["machine"]["throughput_waiting"]
        rows += [
            (
                "training throughput, spinning threads",
                f"{results['train_samples_per_second_spinning']:.0f} samples/s",
                f"alone / spinning {raw['train_alone_over_spinning']:.2f}x",
            ),
            (
                "training step started beside a busy process / alone",
                f"{results['busy_step_over_alone_step']:.2f}x",
                f"waiting alone {_waiting(waiting['alone'])}, busy {_waiting(waiting['busy'])}",
            ),
        ]
    memory = [
        (f"peak memory, {name}", f"{raw[f'{key}_peak_bytes'] / 2**20:.1f} MiB", "")
        for name, key in [
            ("forward", "forward"),
            ("IBP", "ibp"),
            ("CROWN-IBP", "crown-ibp"),
            ("CROWN", "crown"),
            ("standard step", "standard_step"),
            ("IBP step", "ibp_step"),
            ("ACERT step", "acert_step"),
            ("ACERT step, cold search", "acert_cold_step"),
        ]
    ]
    width = max(len(name) for name, _, _ in rows + memory)
    return "\n".join(
        f"  {name:<{width}}  {value:>16}  {note}" for name, value, note in rows + memory
    )
