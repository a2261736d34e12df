"""Per-rank sharding with a seeded per-epoch shuffle, aligned to the global batch, resumable mid-epoch."""
from __future__ import annotations

from typing import Any, Dict, Iterator, Optional

import torch
from torch.utils.data import Sampler


class ShardedSampler(Sampler[int]):
    """The indices of one rank for one epoch.

    Every rank draws the same permutation of ``range(dataset_len)`` (a ``torch.Generator``
    seeded with ``seed + epoch``), keeps its first ``epoch_length`` entries and takes
    every ``world_size``-th one starting at its ``rank``.

    - ``drop_last=True`` (training): ``epoch_length`` = the largest multiple of
      ``global_batch`` <= ``dataset_len``, so every rank yields the same number of
      samples, a whole number of its ``global_batch / world_size`` share per step, and
      the samples of global step k are exactly ``perm[k * global_batch:(k + 1) * global_batch]``
      for any world size (in a different order across ranks). The tail is dropped, a
      different one every epoch.
    - ``drop_last=False`` (evaluation): the permutation is padded by wrapping around to
      a multiple of ``world_size`` (as ``DistributedSampler`` does), so a few samples
      may be seen twice.

    Shards of different ranks are disjoint and together cover the epoch.

    Resuming: positions are counted in global samples (all ranks together), so a run
    may even resume on a different world size. ``set_position(epoch, samples_seen)``
    (from the checkpoint) makes the next iteration yield only the unseen samples of
    that epoch; ``len()`` shrinks accordingly. The sampler cannot know how many of the
    indices it yielded were consumed (a DataLoader prefetches), so the trainer passes
    the consumed count: ``state_dict(samples_seen)`` with ``samples_seen`` = steps
    taken in the epoch x ``global_batch``.

    Distributed: no communication; ranks agree because they share ``seed``, the epoch
    and ``dataset_len``. Without a process group use rank 0, world size 1.

    Example:
        >>> sampler = ShardedSampler(1000, rank=1, world_size=2, seed=0, global_batch=64)
        >>> sampler.set_epoch(3)
        >>> len(sampler)   # 960 // 2
        480
    """

    def __init__(
        self,
        dataset_len: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        global_batch: Optional[int] = None,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        global_batch = world_size if global_batch is None else int(global_batch)
        if global_batch < 1 or global_batch % world_size:
            raise ValueError(
                f"global_batch ({global_batch}) must be a positive multiple of world_size ({world_size})"
            )
        if dataset_len < 0:
            raise ValueError(f"dataset_len must be >= 0, got {dataset_len}")
        if drop_last and dataset_len < global_batch:
            raise ValueError(
                f"dataset of {dataset_len} samples is smaller than one global batch of {global_batch}"
            )
        self.dataset_len = int(dataset_len)
        self.rank, self.world_size = int(rank), int(world_size)
        self.seed, self.shuffle, self.drop_last = int(seed), bool(shuffle), bool(drop_last)
        self.global_batch = global_batch
        self.epoch = 0
        self.start = 0  # global samples of this epoch already consumed (resume position)

    @property
    def epoch_length(self) -> int:
        """Global samples per epoch, over all ranks."""
        if self.drop_last:
            return self.dataset_len // self.global_batch * self.global_batch
        return -(-self.dataset_len // self.world_size) * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per full epoch (the last partial step counts when not dropping)."""
        return -(-self.epoch_length // self.global_batch)

    def set_epoch(self, epoch: int) -> None:
        """Select ``epoch``'s permutation; a new epoch starts at its beginning.

        Calling it again with the current epoch keeps a position set by `set_position`,
        so ``set_position(e, s)`` followed by the loop's usual ``set_epoch(e)`` resumes.
        """
        if epoch != self.epoch:
            self.start = 0
        self.epoch = int(epoch)

    def set_position(self, epoch: int, samples_seen_global: int) -> None:
        """Resume inside ``epoch`` after ``samples_seen_global`` samples (all ranks together)."""
        if not 0 <= samples_seen_global <= self.epoch_length:
            raise ValueError(f"samples_seen_global must be in [0, {self.epoch_length}], got {samples_seen_global}")
        if samples_seen_global % self.world_size:
            raise ValueError(
                f"samples_seen_global ({samples_seen_global}) must be a multiple of world_size ({self.world_size})"
            )
        self.epoch, self.start = int(epoch), int(samples_seen_global)

    def global_indices(self) -> torch.Tensor:
        """This epoch's ``epoch_length`` indices in order, identical on every rank."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            perm = torch.randperm(self.dataset_len, generator=g)
        else:
            perm = torch.arange(self.dataset_len)
        n = self.epoch_length
        if n > self.dataset_len:  # padding (drop_last=False): wrap around
            perm = perm.repeat(-(-n // max(self.dataset_len, 1)))
        return perm[:n]

    def __iter__(self) -> Iterator[int]:
        indices = self.global_indices()[self.start + self.rank::self.world_size]
        return iter(indices.tolist())

    def __len__(self) -> int:
        return (self.epoch_length - self.start) // self.world_size

    def state_dict(self, samples_seen_global: Optional[int] = None) -> Dict[str, Any]:
        """Position to store in a checkpoint; ``samples_seen_global`` defaults to the resume start."""
        seen = self.start if samples_seen_global is None else int(samples_seen_global)
        return {"epoch": self.epoch, "samples_seen_global": seen, "seed": self.seed,
                "dataset_len": self.dataset_len, "shuffle": self.shuffle, "drop_last": self.drop_last}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a `state_dict`; the dataset, seed and shuffling must match the saved run."""
        for key in ("seed", "dataset_len", "shuffle", "drop_last"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume: checkpoint sampler has {key}={state[key]!r}, this run has {getattr(self, key)!r}"
                )
        self.set_position(state["epoch"], state["samples_seen_global"])

    def __repr__(self) -> str:
        return (f"ShardedSampler(dataset_len={self.dataset_len}, rank={self.rank}, world_size={self.world_size}, "
                f"seed={self.seed}, shuffle={self.shuffle}, drop_last={self.drop_last}, "
                f"global_batch={self.global_batch}, epoch={self.epoch}, start={self.start})")


class SamplerPositionMixin:
    """Epoch and resume-position controls for a loader that owns a ``sharded_sampler``
    (the torchvision and DALI loaders share them)."""

    sharded_sampler: ShardedSampler

    def set_epoch(self, epoch: int) -> None:
        self.sharded_sampler.set_epoch(epoch)

    def set_position(self, epoch: int, samples_seen_global: int) -> None:
        self.sharded_sampler.set_position(epoch, samples_seen_global)
