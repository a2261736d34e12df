"""Peak tensor memory of a block of code, on CPU as on GPU.

On CUDA the caching allocator's counters are exact and cheap. On CPU there is no such
counter (process RSS mixes in the allocator's caching, libraries and the interpreter), so
tensor bytes are accounted exactly by PyTorch's dispatch-level ``MemTracker``
(torch.distributed._tools), which sees every tensor storage created and freed.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch


@dataclass
class PeakMemory:
    """Filled in when the ``track_peak`` block exits: peak bytes above what was live at entry."""

    peak_bytes: int = 0
    method: str = ""

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20


@contextlib.contextmanager
def track_peak(*live: torch.Tensor, device: Optional[torch.device] = None) -> Iterator[PeakMemory]:
    """Measure the peak extra tensor memory of the block on ``device`` (default: CPU).

    On CPU, pass the tensors that already exist and that the block reads (``live``): the
    tracker sees a tensor when an op first touches it, so without this an input would be
    counted as if the block had allocated it. (CUDA counts from the allocator's state at entry.)

    Example:
        >>> with track_peak() as mem:
        ...     y = torch.randn(1024, 1024) @ torch.randn(1024, 1024)
        >>> mem.peak_mib   # about 12 MiB: two inputs and the output
    """
    result = PeakMemory()
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result.peak_bytes = torch.cuda.max_memory_allocated(device) - base
        result.method = "cuda caching allocator"
        return
    from torch.distributed._tools.mem_tracker import MemTracker

    def total(kind: str) -> int:
        snapshot = tracker.get_tracker_snapshot(kind)
        return int(sum(v.get("Total", 0) for d, v in snapshot.items() if torch.device(d).type == device.type))

    tracker = MemTracker()
    with tracker:
        if live:
            tracker.track_external(*live)
        base = total("current")
        yield result
    result.peak_bytes = total("peak") - base
    result.method = "dispatch-level tensor accounting (MemTracker)"
