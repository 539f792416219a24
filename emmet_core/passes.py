"""How many facts share one pass of the value optimisation.

A pass keeps, for the backward, the activations of every layer above the insertion point
for all its rows: about rows × suffix tokens × layers × (a few d + a few d_ff) bytes.
On a CPU the fastest size was measured (about 128 prompt rows, :class:`values.ValueConfig`).
On a GPU the limit is memory: on GPT-2 XL 128 rows leave an H200 mostly idle and 2,048 do
not fit in its 139 GiB. So on CUDA the first pass runs at the CPU size while its peak
memory is measured, and every later pass takes as many facts as fit a share of the free
memory at the measured bytes per row-token. A pass that runs out of memory anyway is
retried at half the size; only a single fact that does not fit is an error.

:func:`facts_that_fit` is the arithmetic; :class:`PassSizer` measures and remembers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

import torch

from .errors import EditError

log = logging.getLogger(__name__)

T = TypeVar("T")

CPU_ROWS = 128  # the measured best on a 2-core CPU (values.ValueConfig)
MEMORY_SHARE = 0.6  # of the free device memory one pass may take; the rest is headroom
MAX_ROWS = 8192  # beyond this a GPU gains nothing and progress reports become rare


class DeviceMemoryError(EditError):
    """Even one fact's value pass does not fit in the device's free memory."""


class Memory(Protocol):
    """What the sizer needs to know about one device's memory (bytes)."""

    def free(self, device: torch.device) -> int: ...
    def start(self, device: torch.device) -> None: ...
    def peak_since_start(self, device: torch.device) -> int: ...
    def release(self) -> None: ...


_high_water: dict[torch.device, int] = {}  # peaks from before the sizer's resets


def peak_allocated(device: torch.device) -> int:
    """Most CUDA memory allocated on ``device`` since :func:`reset_peak` (PyTorch's own
    peak counter is reset by every measured value pass; this one is not)."""
    return max(_high_water.get(device, 0), torch.cuda.max_memory_allocated(device))


def reset_peak(device: torch.device) -> None:
    _high_water.pop(device, None)
    torch.cuda.reset_peak_memory_stats(device)


class CudaMemory:
    """:class:`Memory` from PyTorch's CUDA caching allocator."""

    def __init__(self) -> None:
        self._base: dict[torch.device, int] = {}

    def free(self, device: torch.device) -> int:
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + cached  # memory the allocator keeps but does not use counts as free

    def start(self, device: torch.device) -> None:
        _high_water[device] = peak_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        self._base[device] = torch.cuda.memory_allocated(device)

    def peak_since_start(self, device: torch.device) -> int:
        return torch.cuda.max_memory_allocated(device) - self._base.get(device, 0)

    def release(self) -> None:
        torch.cuda.empty_cache()


def out_of_memory(error: BaseException) -> bool:
    """PyTorch's own out-of-memory error, or a CUDA library's failure to allocate."""
    text = str(error)
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and ("CUBLAS_STATUS_ALLOC_FAILED" in text or "out of memory" in text))


def facts_that_fit(budget: Sequence[float], bytes_per_row_token: Sequence[float], rows_per_fact: int,
                   suffix_tokens: Sequence[int], max_rows: int = MAX_ROWS) -> int:
    """How many of the next facts (``suffix_tokens`` ascending, as the values sort them)
    fit one pass: n facts cost n · rows_per_fact · suffix_tokens[n-1] row-tokens on every
    device, each at its own bytes per row-token and within its own budget. At least one."""
    fits = 1
    for n in range(2, min(len(suffix_tokens), max_rows // rows_per_fact) + 1):
        row_tokens = n * rows_per_fact * suffix_tokens[n - 1]
        if any(row_tokens * cost > limit for cost, limit in zip(bytes_per_row_token, budget)):
            break
        fits = n
    return fits


class PassSizer:
    """Hands out pass sizes for one :func:`values.compute_values` call.

    ``fixed_rows`` (a user's ``rows_per_pass``) gives passes of that many rows, as does a
    model with no CUDA device (:data:`CPU_ROWS`); otherwise sizes come from ``memory``.
    """

    def __init__(self, rows_per_fact: int, devices: Sequence[torch.device], fixed_rows: int | None = None,
                 memory: Memory | None = None, share: float = MEMORY_SHARE) -> None:
        self.rows_per_fact = rows_per_fact
        if memory is None:  # the real thing: CUDA devices only
            self.devices = [d for d in devices if d.type == "cuda"]
            memory = CudaMemory() if self.devices else None
        else:
            self.devices = list(devices)
        self.memory = memory
        self.fixed_rows = CPU_ROWS if memory is None and fixed_rows is None else fixed_rows
        self.share = share
        # The largest pass so far, per device: (row-tokens, peak bytes). Its ratio is the cost
        # of a row-token; the largest pass carries the least of the fixed costs (bfloat16
        # weight copies, v_init) in it, so its ratio is the closest to the margin.
        self.largest: dict[torch.device, tuple[int, int]] = {}
        self.cap = MAX_ROWS // rows_per_fact  # facts; halved after running out of memory

    @property
    def cost(self) -> dict[torch.device, float]:
        """Bytes per row-token on each device, as measured."""
        return {d: peak / row_tokens for d, (row_tokens, peak) in self.largest.items()}

    @property
    def by_memory(self) -> bool:
        return self.fixed_rows is None

    def next_size(self, suffix_tokens: Sequence[int]) -> int:
        """Facts in the next pass, given the suffix tokens of the facts still to do."""
        if not self.by_memory:
            return max(self.fixed_rows // self.rows_per_fact, 1)
        if not self.cost:  # nothing measured yet: start at the CPU size
            return min(max(CPU_ROWS // self.rows_per_fact, 1), self.cap)
        budget = [self.share * self.memory.free(d) for d in self.devices]
        costs = [self.cost.get(d, 0.0) for d in self.devices]
        return min(facts_that_fit(budget, costs, self.rows_per_fact, suffix_tokens), self.cap)

    def run(self, work: Callable[[], T], facts: int, suffix_tokens: int) -> T | None:
        """``work()`` for a pass of ``facts`` facts whose longest suffix has
        ``suffix_tokens`` tokens; None if it ran out of memory (ask :meth:`next_size` again)."""
        if not self.by_memory:
            return work()
        for device in self.devices:
            self.memory.start(device)
        try:
            result = work()
        except RuntimeError as exc:  # torch.OutOfMemoryError is one
            if not out_of_memory(exc):
                raise
            result = None
        if result is None:  # outside the handler: the failed pass's tensors are gone now
            self.memory.release()
            if facts == 1:
                raise DeviceMemoryError(
                    "one fact's value optimisation does not fit in the free GPU memory; try "
                    "value_precision=bfloat16, fewer context templates or a device map over more GPUs")
            self.cap = max(facts // 2, 1)
            log.info("a value pass of %d facts ran out of memory; passes now hold at most %d", facts, self.cap)
            return None
        row_tokens = facts * self.rows_per_fact * suffix_tokens
        for device in self.devices:
            peak = self.memory.peak_since_start(device)
            if row_tokens >= self.largest.get(device, (0, 0))[0]:
                self.largest[device] = (row_tokens, peak)
            log.info("value pass of %d facts (%d row-tokens) took %.2f GiB on %s", facts, row_tokens, peak / 2**30,
                     device)
        return result
