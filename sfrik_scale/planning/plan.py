"""``sfrik-scale plan``: the largest per-GPU batch that fits a GPU, and where the memory goes.

:func:`plan` searches the per-GPU batch with the simulator (:func:`~.simulate.simulate`):
doubling until a batch no longer fits, then bisecting, so about 2 log2(batch) simulations,
each a few seconds for ResNet-50. The answer is the largest per-GPU batch ``b`` whose
simulated steady-state peak is at most the memory budget while ``b + 1`` (or the next
multiple) exceeds it. Because the simulated peak grows with the batch, the answer grows
with the memory size.

Example:
    >>> p = plan(32e9, Scenario(method="sfrik", world_size=8, zero_stage=2, precision="bf16"))
    >>> p.per_gpu_batch, p.global_batch, p.estimate.grouped()
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

from .simulate import MemoryEstimate, Scenario, simulate

#: the smallest per-GPU batch the trainer can run (BatchNorm statistics in training mode)
MIN_BATCH = 2


@dataclass
class Plan:
    """The answer of :func:`plan`.

    Attributes:
        memory_bytes: the budget per GPU.
        per_gpu_batch: largest per-GPU batch that fits (0: not even the smallest, 2 or ``multiple``).
        global_batch: per_gpu_batch x world size.
        estimate: the simulation at ``per_gpu_batch`` (None when nothing fits).
        over: the simulation at the next batch, which does not fit (None at ``max_batch``).
        simulations: how many simulations the search ran.
    """

    memory_bytes: float
    per_gpu_batch: int
    global_batch: int
    estimate: Optional[MemoryEstimate]
    over: Optional[MemoryEstimate]
    simulations: int

    def to_dict(self) -> dict:
        return {"memory_bytes": self.memory_bytes, "per_gpu_batch": self.per_gpu_batch,
                "global_batch": self.global_batch, "simulations": self.simulations,
                "estimate": self.estimate.to_dict() if self.estimate else None,
                "over": self.over.to_dict() if self.over else None}


def plan(memory_bytes: float, template: Scenario, multiple: int = 1, max_batch: int = 1 << 16,
         simulator: Callable[[Scenario], MemoryEstimate] = simulate) -> Plan:
    """Largest per-GPU batch (a multiple of ``multiple``, at most ``max_batch``) whose
    simulated peak fits ``memory_bytes``, for ``template`` (its ``global_batch`` is ignored).

    Raises ValueError for a non-positive budget or multiple.
    """
    if memory_bytes <= 0:
        raise ValueError(f"memory must be positive, got {memory_bytes}")
    if multiple < 1 or max_batch < multiple:
        raise ValueError(f"need 1 <= multiple <= max_batch, got multiple={multiple}, max_batch={max_batch}")
    cache: dict[int, MemoryEstimate] = {}

    def at(units: int) -> MemoryEstimate:  # batch = units x multiple per GPU
        if units not in cache:
            b = units * multiple
            cache[units] = simulator(dataclasses.replace(template, global_batch=b * template.world_size))
        return cache[units]

    def fits(units: int) -> bool:
        return at(units).peak_bytes <= memory_bytes

    top = max_batch // multiple
    first = -(-MIN_BATCH // multiple)  # BatchNorm in training needs 2 samples per GPU
    if first > top or not fits(first):
        return Plan(memory_bytes, 0, 0, None, at(first) if first <= top else None, len(cache))
    lo, hi = first, 2 * first
    while hi <= top and fits(hi):  # lo fits; hi is the first doubling that does not
        lo, hi = hi, hi * 2
    if hi > top:
        if fits(top):
            return Plan(memory_bytes, top * multiple, top * multiple * template.world_size, at(top), None, len(cache))
        hi = top
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    b = lo * multiple
    return Plan(memory_bytes, b, b * template.world_size, at(lo), at(hi), len(cache))
