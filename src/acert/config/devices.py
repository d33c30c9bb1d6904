"""The config key ``device``: a torch device name, and whether this machine has it."""

from __future__ import annotations

import torch

from acert.foundation.errors import ConfigError

__all__ = ["available_device", "parse_device"]


def parse_device(name: str) -> torch.device:
    """The torch device ``name`` names (cpu, cuda, cuda:N), or a ConfigError."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from err
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r} is not supported; use cpu, cuda or cuda:N")
    return device


def available_device(name: str, fix: str = "use --device cpu") -> torch.device:
    """:func:`parse_device`, and a ConfigError when this machine does not have the device
    (``fix`` says how to ask for the CPU where the caller takes the device)."""
    device = parse_device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {name!r} asked for, but this PyTorch build or machine has no CUDA; {fix}"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s)"
            )
    return device
