"""How float32 matrix products may run where a user allows a faster, rounder answer.

Three settings, shared by the covariance forward (``stats_precision``) and the value
optimisation (``value_precision``):

- ``float32``: exact float32 products (the default, and what results were measured with);
- ``tf32``: on CUDA, float32 products on TensorFloat-32 tensor cores (10-bit mantissa on
  the inputs, float32 accumulation); on a CPU this is the same as ``float32``;
- ``bfloat16``: autocast to bfloat16 (CPUs with AMX and every recent GPU).

The switches are process-wide in PyTorch, so they are set only for the length of a
``with`` block and put back after it, even on error.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .errors import InvalidRequestError

PRECISIONS = ("float32", "tf32", "bfloat16")


def check_precision(precision: str, what: str) -> None:
    if precision not in PRECISIONS:
        raise InvalidRequestError(f"{what} must be one of {', '.join(PRECISIONS)}, not {precision!r}")


_tf32_lock = threading.Lock()
_tf32_users = 0  # blocks inside tf32_matmuls, in every thread
_tf32_saved: object = None


@contextmanager
def tf32_matmuls() -> Iterator[None]:
    """CUDA float32 matrix products on TF32 tensor cores meanwhile (no effect on a CPU).

    PyTorch's switch is process-wide: while any thread is inside such a block, CUDA float32
    products of every thread may use TF32. Blocks count themselves, so overlapping ones (two
    app users on two models) put the setting back only when the last one leaves."""
    global _tf32_users, _tf32_saved
    with _tf32_lock:
        if _tf32_users == 0:
            _tf32_saved = _set_tf32(True)
        _tf32_users += 1
    try:
        yield
    finally:
        with _tf32_lock:
            _tf32_users -= 1
            if _tf32_users == 0:
                _set_tf32(_tf32_saved)


def _set_tf32(value: object) -> object:
    """Set PyTorch's TF32 switch for CUDA matrix products (True, or a value returned
    before); return what it was."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # PyTorch ≥ 2.9
        previous = matmul.fp32_precision
        matmul.fp32_precision = "tf32" if value is True else value
    else:
        previous = matmul.allow_tf32
        matmul.allow_tf32 = bool(value)
    return previous


@contextmanager
def forward_precision(precision: str, device: torch.device) -> Iterator[None]:
    """Run the forward passes of the block at ``precision`` on ``device``."""
    check_precision(precision, "precision")
    if precision == "tf32":
        with tf32_matmuls():
            yield
    elif precision == "bfloat16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    else:
        yield
