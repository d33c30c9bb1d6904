"""The floating-point arithmetic a certificate covers, and the global modes that would change it.

The rounding allowances (:mod:`acert.bounds.spec`) assume IEEE arithmetic in the model's dtype:
round to nearest, unit roundoff ``eps/2``, gradual underflow (subnormal results off by at most
half the smallest subnormal). Global switches of PyTorch change that for every operation:

- TF32 (Ampere and newer GPUs: ``torch.backends.cudnn.allow_tf32``, on by default for
  convolutions, ``torch.backends.cuda.matmul.allow_tf32``, ``set_float32_matmul_precision``)
  rounds products to 10 bits; ``set_float32_matmul_precision("medium")`` also lets oneDNN run
  CPU matmuls in bfloat16; autocast runs layers in float16/bfloat16. :func:`ieee_arithmetic`
  turns them off for the bound passes and the forward pass whose prediction is certified, and
  restores them afterwards.
- Flush-to-zero (``torch.set_flush_denormal(True)``: subnormal results and operands read as 0,
  errors up to 2^-126 instead of 2^-149, and relative to the other factor for an operand). It
  has no getter; :func:`flushes_subnormals` computes a subnormal product on the device, and
  :func:`ieee_arithmetic` refuses to certify under it (one line naming the fix).

:func:`arithmetic_record` says what a certificate covers (dtype, device, IEEE, no flushing).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from acert.foundation.errors import AcertError

__all__ = ["FloatModeError", "arithmetic_record", "flushes_subnormals", "ieee_arithmetic"]


class FloatModeError(AcertError):
    """A global float mode makes the model compute in another arithmetic than the one the
    certificates cover."""


_PRECISION_LEAVES = (
    "",
    "cuda.matmul",
    "cudnn",
    "cudnn.conv",
    "cudnn.rnn",
    "mkldnn",
    "mkldnn.matmul",
    "mkldnn.conv",
    "mkldnn.rnn",
)
"""The backends whose ``fp32_precision`` (PyTorch >= 2.9) says how float32 is computed."""


def _backend(path: str) -> Any:
    backend: Any = torch.backends
    for name in filter(None, path.split(".")):
        backend = getattr(backend, name)
    return backend


def _precision_leaves() -> list[Any]:
    leaves = []
    for path in _PRECISION_LEAVES:
        try:
            backend = _backend(path)
        except AttributeError:
            continue
        if hasattr(backend, "fp32_precision"):
            leaves.append(backend)
    return leaves


@contextlib.contextmanager
def _ieee_precision() -> Iterator[None]:
    """Every float32 precision switch at IEEE, restored afterwards (even on error)."""
    leaves = _precision_leaves()
    if leaves:  # the current API; its legacy views would mix the two
        saved = [leaf.fp32_precision for leaf in leaves]
        try:
            for leaf in leaves:
                leaf.fp32_precision = "ieee"
            yield
        finally:
            for leaf, value in zip(leaves, saved, strict=True):
                leaf.fp32_precision = value
        return
    matmul = torch.get_float32_matmul_precision()
    cuda_tf32, cudnn_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cuda.matmul.allow_tf32 = cuda_tf32
        torch.backends.cudnn.allow_tf32 = cudnn_tf32


def flushes_subnormals(
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> bool:
    """Whether arithmetic in ``dtype`` on ``device`` flushes subnormal results or operands to
    zero (``torch.set_flush_denormal(True)``, which PyTorch cannot report): half the smallest
    normal number, and a subnormal operand scaled back to the normal range, must not be 0."""
    tiny = torch.finfo(dtype).tiny
    normal = torch.full((1,), tiny, dtype=dtype, device=device)
    subnormal = normal * 2.0**-10
    restored = subnormal * 2.0**10
    return bool((subnormal == 0).any() or (restored == 0).any())


@contextlib.contextmanager
def ieee_arithmetic(
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Iterator[None]:
    """Run a certification in the arithmetic its allowances assume: TF32 and reduced-precision
    float32 (cuBLAS, cuDNN, oneDNN) off and autocast off inside the block, every switch as it
    was afterwards; a one-line :class:`FloatModeError` under flush-to-zero."""
    if flushes_subnormals(dtype, device):
        raise FloatModeError(
            f"{dtype} arithmetic on {torch.device(device)} flushes subnormal numbers to zero "
            "(torch.set_flush_denormal(True)), which the rounding allowances do not cover; "
            "call torch.set_flush_denormal(False) before certifying"
        )
    with contextlib.ExitStack() as stack:
        stack.enter_context(_ieee_precision())
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if torch.cuda.is_available():
            stack.enter_context(torch.autocast("cuda", enabled=False))
        yield


def arithmetic_record(dtype: torch.dtype, device: str | torch.device) -> dict[str, Any]:
    """What a certificate computed under :func:`ieee_arithmetic` covers: the model computing
    in ``dtype`` on ``device`` in IEEE arithmetic (no TF32 or bfloat16 for float32, no
    autocast) with gradual underflow (no flush-to-zero)."""
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "device": torch.device(device).type,
        "ieee": True,
        "tf32": False,
        "autocast": False,
        "flush_to_zero": False,
    }
