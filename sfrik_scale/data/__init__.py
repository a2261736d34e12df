"""Data for pretraining: datasets, two-view augmentations, sharded sampling, the loader.

The torchvision pipeline (the DALI one is ``sfrik_scale.data.dali``, imported lazily
by whoever needs it). Typical use by the trainer::

    ds = build_pretrain_dataset("synthetic", augmentations="sfrik", image_size=32, seed=0)
    loader = build_loader(ds, micro_batch_size=64, global_batch_size=256, rank=r, world_size=w,
                          seed=0, num_workers=4)
    loader.set_position(epoch, samples_seen_global)   # only when resuming
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)
        for view1, view2, labels in loader: ...      # (micro, 3, S, S) float32 x2, (micro,) int64
        log(len(loader.bad_files), loader.bad_files.as_dict())

Reproducibility: the augmentations of sample i in epoch e are drawn from torch's
generator seeded with a hash of (seed, e, i) (`TwoViewDataset`), so they do not depend
on the rank, the number of workers, the worker that serves the sample, or where a
run was resumed: a resumed run sees exactly the views an uninterrupted one would.
The sampler yields ``(epoch, index)`` keys so that persistent workers know the epoch.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from sfrik_scale.data.folder import (
    IMG_EXTENSIONS, BadFileLog, BadImageError, FileListDataset, ImageFolderDataset, check_dataset_size, pil_loader,
)
from sfrik_scale.data.datasets import (
    DATASETS, DEFAULT_DATASET, TransformedDataset, build_dataset, build_eval_dataset, mirror_invariant,
)
from sfrik_scale.data.sampler import SamplerPositionMixin, ShardedSampler
from sfrik_scale.data.synthetic import SyntheticShapes
from sfrik_scale.data.transforms import (
    AUGMENTATIONS, IMAGENET_MEAN, IMAGENET_STD, TwoViewTransform, ViewAugmentation, build_eval_transform,
    build_two_view_transform, build_view_transform,
)

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (order matters): independent streams per tuple."""
    h = 0
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h >> 1


_AUGMENT_STREAM = 0x5F31  # keeps augmentation seeds apart from other users of mix_seed(seed, ...)
_WORKER_STREAM = 0x3A77
_LOADER_STREAM = 0x1D0C


# ---------------------------------------------------------------------------------
# Two views per sample, with per-sample seeding.
# ---------------------------------------------------------------------------------
class TwoViewDataset(Dataset):
    """``key -> (view1, view2, label)`` over an ``(image, label)`` dataset.

    ``key`` is an index (epoch 0) or an ``(epoch, index)`` pair, as yielded by the
    loader's sampler. The augmentations are drawn from torch's generator seeded with
    ``mix_seed(seed, epoch, index)`` inside ``torch.random.fork_rng``, so they are a
    function of (seed, epoch, index) only and the caller's RNG state is untouched.

    ``bad_files`` is the base dataset's `BadFileLog` (an empty one for datasets
    without files).
    """

    def __init__(self, base: Dataset, transform: TwoViewTransform, seed: int = 0) -> None:
        self.base, self.transform, self.seed = base, transform, int(seed)
        self._empty_log = BadFileLog()

    def __len__(self) -> int:
        return len(self.base)

    @property
    def bad_files(self) -> BadFileLog:
        return getattr(self.base, "bad_files", self._empty_log)

    def __getitem__(self, key: Union[int, Tuple[int, int]]) -> Tuple[torch.Tensor, torch.Tensor, int]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        with torch.random.fork_rng(devices=[]):
            # CPU generator only: torch.manual_seed also queues CUDA seeding, costing ~1 ms per call.
            torch.default_generator.manual_seed(mix_seed(self.seed, _AUGMENT_STREAM, epoch, index))
            img, label = self.base[index]
            view1, view2 = self.transform(img)
        return view1, view2, int(label)

    def __repr__(self) -> str:
        return f"TwoViewDataset({self.base!r}, seed={self.seed})"


def build_pretrain_dataset(
    dataset: str = DEFAULT_DATASET,
    *,
    augmentations: str = "sfrik",
    image_size: int = 32,
    seed: int = 0,
    view1: Optional[Union[ViewAugmentation, Dict[str, Any]]] = None,
    view2: Optional[Union[ViewAugmentation, Dict[str, Any]]] = None,
    flip: Optional[bool] = None,
    **dataset_kwargs: Any,
) -> TwoViewDataset:
    """The two-view pretraining dataset.

    Args:
        dataset: a `DATASETS` name: "synthetic" (default, no download), "image_folder", "file_list".
        augmentations: an `AUGMENTATIONS` name: "sfrik"/"vicreg", "simclr", "alignment_uniformity",
            "small".
        image_size: side of the views (and of the synthetic images).
        seed: seeds the synthetic images and the per-sample augmentations.
        view1, view2: optional full descriptions replacing the named set's views (taken as given).
        flip: the named set's horizontal flips. None: the set's own, except on a dataset whose
            mirror images are other classes (`mirror_invariant` false: digits), where the views
            do not flip; True: probability 0.5; False: never.
        **dataset_kwargs: passed to the dataset factory (see `build_dataset`).
    """
    base = build_dataset(dataset, image_size=image_size, seed=seed, **dataset_kwargs)
    desc1, desc2 = AUGMENTATIONS.get(augmentations)(image_size)
    flip_p = None if flip is None and mirror_invariant(dataset) else 0.5 if flip else 0.0
    if flip_p is not None:
        desc1, desc2 = (dataclasses.replace(d, flip_p=flip_p) for d in (desc1, desc2))
    transform = TwoViewTransform(view1 if view1 is not None else desc1, view2 if view2 is not None else desc2)
    return TwoViewDataset(base, transform, seed=seed)


# ---------------------------------------------------------------------------------
# Loader.
# ---------------------------------------------------------------------------------
class EpochIndexSampler(Sampler[Tuple[int, int]]):
    """Yields ``(epoch, index)`` from a `ShardedSampler`, so persistent workers know the epoch."""

    def __init__(self, sampler: ShardedSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        epoch = self.sampler.epoch
        return ((epoch, i) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class TwoViewCollate:
    """Stacks items into ``(view1 (B, 3, S, S), view2 (B, 3, S, S), labels (B,) int64, bad-file news)``.

    Inside a worker the last element carries the worker's bad-file records added since
    its previous batch, and how many items it replaced; `TwoViewDataLoader` merges them
    into the main process's log and yields only the first three.
    """

    def __call__(self, items: Sequence[Tuple[torch.Tensor, torch.Tensor, int]]):
        view1 = torch.stack([it[0] for it in items])
        view2 = torch.stack([it[1] for it in items])
        labels = torch.tensor([it[2] for it in items], dtype=torch.long)
        info = get_worker_info()
        news: Tuple[List[Tuple[str, str]], int] = ([], 0)
        if info is not None:  # in the main process the dataset's log is already the loader's
            news = info.dataset.bad_files.take_news()
        return view1, view2, labels, news


class WorkerSeeder:
    """``worker_init_fn`` seeding torch, numpy and random per (seed, rank, worker, epoch).

    The augmentations do not depend on it (they are seeded per sample); it makes any
    other randomness in a worker (e.g. a user transform calling numpy) reproducible.
    With persistent workers ``epoch`` is the one at the loader's creation.
    """

    def __init__(self, seed: int, rank: int, epoch: int = 0) -> None:
        self.seed, self.rank, self.epoch = seed, rank, epoch

    def __call__(self, worker_id: int) -> None:
        s = mix_seed(self.seed, _WORKER_STREAM, self.rank, worker_id, self.epoch)
        torch.manual_seed(s)
        np.random.seed(s % 2**32)
        random.seed(s)
        info = get_worker_info()
        if info is not None:  # news inherited from the parent's log are not this worker's to send
            info.dataset.bad_files.take_news()


class TwoViewDataLoader(SamplerPositionMixin, DataLoader):
    """A DataLoader yielding ``(view1, view2, labels)`` with a `ShardedSampler`.

    ``bad_files`` gathers the unusable files met by all workers (merged as batches
    arrive); ``set_epoch`` / ``set_position`` (`SamplerPositionMixin`) forward to ``sharded_sampler``.
    """

    def __init__(self, dataset: TwoViewDataset, sharded_sampler: ShardedSampler, **kwargs: Any) -> None:
        self.sharded_sampler = sharded_sampler
        super().__init__(dataset, sampler=EpochIndexSampler(sharded_sampler), collate_fn=TwoViewCollate(), **kwargs)

    @property
    def bad_files(self) -> BadFileLog:
        return self.dataset.bad_files

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:  # type: ignore[override]
        log = self.dataset.bad_files
        for view1, view2, labels, (records, replacements) in super().__iter__():
            if records or replacements:
                log.merge(records, replacements)
            yield view1, view2, labels


def build_loader(
    dataset: TwoViewDataset,
    *,
    micro_batch_size: int,
    global_batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
    num_workers: int = 0,
    pin_memory: Optional[bool] = None,
    persistent_workers: bool = True,
    prefetch_factor: Optional[int] = None,
) -> TwoViewDataLoader:
    """The per-rank loader of ``dataset`` for training with DeepSpeed's global batch.

    Args:
        micro_batch_size: samples per forward on this rank (DeepSpeed's train_micro_batch_size_per_gpu).
        global_batch_size: samples per optimizer step over all ranks
            (= micro x gradient accumulation x world size; DeepSpeed's train_batch_size).
        rank, world_size: global rank and number of ranks (0, 1 without a process group).
        seed: shuffling seed (the same on every rank); augmentations use the dataset's seed.
        shuffle, drop_last: see `ShardedSampler` (drop_last keeps whole global batches).
        num_workers: DataLoader worker processes (0: load in the main process).
        pin_memory: default: when CUDA is available.
        persistent_workers: keep workers alive between epochs (only with num_workers > 0).
        prefetch_factor: batches prefetched per worker (DataLoader default when None).

    Raises ValueError (before any worker starts) when the dataset cannot fill one global
    batch or the batch sizes are inconsistent.
    """
    if not isinstance(dataset, TwoViewDataset):
        raise TypeError(f"build_loader expects a TwoViewDataset (build_pretrain_dataset), got {type(dataset).__name__}")
    if micro_batch_size < 1 or global_batch_size % (micro_batch_size * world_size):
        raise ValueError(
            f"global_batch_size ({global_batch_size}) must be a multiple of micro_batch_size ({micro_batch_size}) "
            f"x world_size ({world_size})"
        )
    if drop_last:
        check_dataset_size(dataset, global_batch_size)
    sampler = ShardedSampler(len(dataset), rank=rank, world_size=world_size, seed=seed, shuffle=shuffle,
                             drop_last=drop_last, global_batch=global_batch_size)
    kwargs: Dict[str, Any] = dict(
        batch_size=micro_batch_size,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        worker_init_fn=WorkerSeeder(seed, rank) if num_workers > 0 else None,
        # DataLoader draws its workers' base seed from this generator at every epoch; a
        # private one leaves the trainer's global torch RNG stream untouched.
        generator=torch.Generator().manual_seed(mix_seed(seed, _LOADER_STREAM, rank)),
    )
    if num_workers > 0:
        kwargs["persistent_workers"] = persistent_workers
        if prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
    return TwoViewDataLoader(dataset, sampler, **kwargs)


__all__ = [
    "AUGMENTATIONS", "DATASETS", "IMAGENET_MEAN", "IMAGENET_STD", "IMG_EXTENSIONS",
    "BadFileLog", "BadImageError", "EpochIndexSampler", "FileListDataset", "ImageFolderDataset",
    "ShardedSampler", "SyntheticShapes", "TwoViewCollate", "TwoViewDataLoader", "TwoViewDataset",
    "TransformedDataset", "TwoViewTransform", "ViewAugmentation", "WorkerSeeder",
    "build_dataset", "build_eval_dataset", "build_eval_transform", "build_loader", "build_pretrain_dataset",
    "mirror_invariant",
    "build_two_view_transform", "build_view_transform", "check_dataset_size", "mix_seed", "pil_loader",
]
