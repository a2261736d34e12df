"""Run a function on several real gloo ranks (spawned local processes) and collect results.

Used by the multi-process tests and the benchmarks, with no launcher: in the tests every rank
gets DIFFERENT data (its own rows of a batch drawn from a shared seed) and the parent compares
with one process on the concatenated batch. A rank that hangs fails after ``timeout``
seconds instead of blocking CI.
"""
from __future__ import annotations

import os
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch.multiprocessing as mp

from sfrik_scale.topology import free_port


def _entry(fn: Callable, rank: int, world: int, port: int, queue, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
        result = fn(rank, world, *args)
        queue.put((rank, "ok", result))
    except BaseException:  # report everything, including assertion errors, to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 180.0) -> list:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; return the results by rank.

    ``fn`` must be a module-level function and its result picklable (numpy arrays, floats,
    strings, or CPU tensors).
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, queue, args), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world):
            try:
                rank, status, payload = queue.get(timeout=timeout)
            except Exception:
                raise AssertionError(f"ranks {sorted(set(range(world)) - set(results))} did not "
                                     f"report within {timeout} s (hang?)") from None
            if status == "ok":
                results[rank] = payload
            else:
                errors.append(f"rank {rank}:\n{payload}")
                results[rank] = None
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world)]
