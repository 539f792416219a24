"""Value passes sized from device memory (emmet_core.passes).

The arithmetic is checked on numbers; the sizer against a stand-in for a GPU's memory
that behaves like one (it has a capacity, a pass takes memory in proportion to its
row-tokens, and a pass that does not fit raises PyTorch's out-of-memory error), since
CI has no GPU to ask. The grouping itself never changes a fact's v* (test_caches).
"""

from __future__ import annotations

import pytest
import torch

from emmet_core.passes import CPU_ROWS, MAX_ROWS, DeviceMemoryError, PassSizer, facts_that_fit

GPU = torch.device("cuda:0")


def test_facts_that_fit_fills_the_budget_with_the_longest_suffix_counted():
    # 7 rows per fact, 1 kB per row-token, 70 kB budget: 10 row-tokens per fact at length 1.
    assert facts_that_fit([70_000], [1_000], 7, [1] * 20) == 10
    assert facts_that_fit([70_000], [1_000], 7, [1, 1, 1, 1, 5, 5]) == 4  # a 5th pads every row to 5: 175 kB
    assert facts_that_fit([70_000], [1_000], 7, [100]) == 1  # never fewer than one
    assert facts_that_fit([70_000, 35_000], [1_000, 1_000], 7, [1] * 20) == 5  # the tighter device decides
    assert facts_that_fit([1e15], [1.0], 7, [1] * 10_000) == MAX_ROWS // 7  # capped


class FakeGpuMemory:
    """A device with ``capacity`` bytes, ``used`` of them held; a pass of r row-tokens
    takes ``cost`` bytes each at its peak and raises OutOfMemoryError beyond capacity."""

    def __init__(self, capacity: int, used: int, cost: int) -> None:
        self.capacity, self.used, self.cost = capacity, used, cost
        self.peak = 0
        self.released = 0

    def free(self, device: torch.device) -> int:
        return self.capacity - self.used

    def start(self, device: torch.device) -> None:
        self.peak = 0

    def peak_since_start(self, device: torch.device) -> int:
        return self.peak

    def release(self) -> None:
        self.released += 1

    def work(self, facts: int, rows_per_fact: int, suffix: int):
        def run() -> int:
            need = facts * rows_per_fact * suffix * self.cost
            if need > self.capacity - self.used:
                raise torch.OutOfMemoryError("CUDA out of memory")
            self.peak = need
            return facts
        return run


def test_first_pass_is_the_cpu_size_then_passes_fill_the_free_memory():
    memory = FakeGpuMemory(capacity=100_000_000, used=20_000_000, cost=1000)
    sizer = PassSizer(rows_per_fact=6, devices=[GPU], memory=memory, share=0.5)
    first = sizer.next_size([10] * 10_000)
    assert first == CPU_ROWS // 6
    assert sizer.run(memory.work(first, 6, 10), first, 10) == first
    assert sizer.cost[GPU] == pytest.approx(1000)  # learnt bytes per row-token
    # 0.5 · 80 MB / (1000 B · 6 rows · 10 tokens) = 666 facts
    assert sizer.next_size([10] * 10_000) == 666
    assert sizer.next_size([10] * 100 + [40] * 10_000) == 166  # longer suffixes, fewer facts


def test_a_pass_that_runs_out_of_memory_is_retried_at_half_the_size():
    memory = FakeGpuMemory(capacity=100_000_000, used=0, cost=1000)
    sizer = PassSizer(rows_per_fact=6, devices=[GPU], memory=memory, share=0.5)
    sizer.run(memory.work(21, 6, 10), 21, 10)
    memory.used = 95_000_000  # something else took the memory meanwhile, after it was asked
    size = 800
    assert sizer.run(memory.work(size, 6, 10), size, 10) is None
    assert memory.released == 1 and sizer.cap == 400
    assert sizer.next_size([10] * 10_000) <= 400
    done, attempts = 0, 0
    while done < 1000:  # the loop compute_values runs: shrink until passes fit, never fail
        size = sizer.next_size([10] * (1000 - done))
        result = sizer.run(memory.work(size, 6, 10), size, 10)
        attempts += 1
        done += result or 0
    assert done == 1000 and attempts < 60


def test_one_fact_that_does_not_fit_is_a_readable_error():
    memory = FakeGpuMemory(capacity=1000, used=0, cost=1000)
    sizer = PassSizer(rows_per_fact=6, devices=[GPU], memory=memory)
    with pytest.raises(DeviceMemoryError, match="does not fit in the free GPU memory"):
        sizer.run(memory.work(1, 6, 10), 1, 10)


def test_cpu_and_explicit_sizes_are_fixed():
    cpu = PassSizer(rows_per_fact=6, devices=[torch.device("cpu")])
    assert not cpu.by_memory and cpu.next_size([10] * 1000) == CPU_ROWS // 6
    assert cpu.run(lambda: "ran", 21, 10) == "ran"
    chosen = PassSizer(rows_per_fact=6, devices=[GPU], fixed_rows=60, memory=FakeGpuMemory(10**9, 0, 1))
    assert not chosen.by_memory and chosen.next_size([10] * 1000) == 10


def test_library_allocation_failures_count_as_out_of_memory_and_other_errors_pass_through():
    memory = FakeGpuMemory(capacity=10**9, used=0, cost=1)
    sizer = PassSizer(rows_per_fact=6, devices=[GPU], memory=memory)

    def cublas() -> None:
        raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")

    def broken() -> None:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    assert sizer.run(cublas, 40, 10) is None and sizer.cap == 20
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        sizer.run(broken, 10, 10)


def test_the_largest_pass_sets_the_cost():
    memory = FakeGpuMemory(capacity=10**12, used=0, cost=1000)
    sizer = PassSizer(rows_per_fact=6, devices=[GPU], memory=memory)

    def taking(peak: int):
        def run() -> int:
            memory.peak = peak
            return 1
        return run

    fixed, slope = 2_000_000, 1000  # bytes, and bytes per row-token
    sizer.run(taking(fixed + slope * 6 * 10 * 21), 21, 10)
    first = sizer.cost[GPU]
    sizer.run(taking(fixed + slope * 6 * 10 * 210), 210, 10)
    assert first > sizer.cost[GPU] > slope  # the fixed part weighs less in the larger pass
    sizer.run(taking(fixed + slope * 6 * 10 * 21), 21, 10)
    assert sizer.cost[GPU] == pytest.approx((fixed + slope * 12_600) / 12_600)  # a smaller pass changes nothing
