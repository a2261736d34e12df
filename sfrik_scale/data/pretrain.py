"""The pretraining data a run asks for: the dataset by name, the loader backend by choice.

`build_pretrain_loader` takes a run's data settings (an object with the ``data`` section's
attributes: dataset, path, augmentations, image_size, loader, ...; this package never imports
the config) and gives the dataset and a `TwoViewLoader`, from DALI or from torchvision
worker processes, which yield the same samples in the same order from the same view
descriptions. ``loader="auto"`` takes DALI when it is installed and runs, else torchvision with
a one-line notice; ``"dali"`` is DALI or a ValueError saying why not.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Protocol, Tuple

import torch

from sfrik_scale.data.datasets import pretrain_options
from sfrik_scale.data.folder import BadFileLog
from sfrik_scale.data.sampler import ShardedSampler


#: the loader backends (``data.loader`` names one, or "auto": DALI when it works, else torchvision)
TORCHVISION, DALI = "torchvision", "dali"
BACKENDS = (TORCHVISION, DALI)
AUTO = "auto"
LOADER_CHOICES = (AUTO, *BACKENDS)


class TwoViewLoader(Protocol):
    """What the trainer needs from a pretraining loader (both backends implement it)."""

    sharded_sampler: ShardedSampler

    @property
    def bad_files(self) -> BadFileLog: ...

    def set_epoch(self, epoch: int) -> None: ...

    def set_position(self, epoch: int, samples_seen: int) -> None: ...

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]: ...


@dataclass
class PretrainData:
    dataset: Any            # the TwoViewDataset (its view descriptions, files, seed, bad-file log)
    loader: TwoViewLoader
    backend: str            # one of BACKENDS


def choose_backend(choice: str, announce: Optional[Callable[[str], None]] = None) -> str:
    """``loader`` setting (a `LOADER_CHOICES` name) -> one of `BACKENDS` (see the module docstring)."""
    if choice == TORCHVISION:
        return choice
    from sfrik_scale.data.dali import dali_available

    ok, reason = dali_available()  # cached; imports DALI and runs a tiny CPU pipeline once
    if ok:
        return DALI
    if choice == DALI:
        raise ValueError(f"data.loader=dali but DALI does not work here ({reason}); "
                         "use data.loader=torchvision or auto")
    if announce is not None:
        announce(f"data.loader=auto: DALI unavailable ({reason}); using torchvision")
    return TORCHVISION


def build_pretrain_loader(settings: Any, *, rank: int, world_size: int, device: torch.device,
                          micro_batch_size: int, global_batch_size: int, seed: int,
                          announce: Optional[Callable[[str], None]] = None) -> PretrainData:
    """The dataset ``settings.dataset`` with its two-view augmentations, and this rank's loader.

    ``announce``: where one-line notices go (rank 0's console; None elsewhere).
    """
    from sfrik_scale.data import build_loader, build_pretrain_dataset

    dataset = build_pretrain_dataset(settings.dataset, augmentations=settings.augmentations,
                                     image_size=settings.image_size, seed=seed, flip=getattr(settings, "flip", None),
                                     **pretrain_options(settings.dataset, settings))
    batches = dict(micro_batch_size=micro_batch_size, global_batch_size=global_batch_size, rank=rank,
                   world_size=world_size, seed=seed)
    backend = choose_backend(settings.loader, announce)
    if backend == DALI:
        from sfrik_scale.data.dali import build_dali_loader

        on_gpu = device.type == "cuda"
        # the same dataset object: DALI reads its view descriptions, files, seed and bad-file log
        loader = build_dali_loader(dataset, num_threads=settings.num_threads, strict=not settings.skip_bad_files,
                                   device="gpu" if on_gpu else "cpu", device_id=device.index if on_gpu else None,
                                   **batches)
    else:
        loader = build_loader(dataset, num_workers=settings.num_workers, **batches)
    return PretrainData(dataset, loader, backend)
