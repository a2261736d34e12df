"""Evaluation loaders (resize to `eval_resize_size(S)`, centre crop S, no augmentation) on torchvision or DALI.

``build_eval_loader(dataset, batch_size=..., image_size=..., backend=...)`` takes an
``(image, label)`` dataset (``build_dataset(..., split="val")``, an ImageFolderDataset,
a FileListDataset) and yields ``(images (B, 3, S, S) float32, labels (B,) int64)`` in
index order, sharded by rank (``ShardedSampler(shuffle=False, drop_last=False)``: the
shards are padded by wrapping to a multiple of the world size, so with several ranks
a few samples appear twice), the last batch smaller. Both backends share the
geometry of ``build_eval_transform`` and the bad-file rules of the training loaders
(``bad_files``, ``strict``).
"""
from __future__ import annotations

from typing import Any, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, get_worker_info

from sfrik_scale.data.folder import BadFileLog
from sfrik_scale.data.sampler import ShardedSampler
from sfrik_scale.data.transforms import build_eval_transform


class _EvalCollate:
    """Stacks ``(image, label)`` items; inside a worker also carries its bad-file news to the main process."""

    def __call__(self, items: Sequence[Tuple[torch.Tensor, int]]):
        images = torch.stack([it[0] for it in items])
        labels = torch.tensor([int(it[1]) for it in items], dtype=torch.long)
        info = get_worker_info()
        news: Tuple[List[Tuple[str, str]], int] = ([], 0)
        if info is not None:
            news = info.dataset.bad_files.take_news()
        return images, labels, news


class TorchvisionEvalLoader(DataLoader):
    """DataLoader over ``TransformedDataset(dataset, build_eval_transform(S))`` yielding ``(images, labels)``."""

    def __init__(self, dataset, sharded_sampler: ShardedSampler, **kwargs: Any) -> None:
        self.sharded_sampler = sharded_sampler
        super().__init__(dataset, sampler=sharded_sampler, collate_fn=_EvalCollate(), **kwargs)

    @property
    def bad_files(self) -> BadFileLog:
        return self.dataset.bad_files

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:  # type: ignore[override]
        log = self.dataset.bad_files
        for images, labels, (records, replacements) in super().__iter__():
            if records or replacements:
                log.merge(records, replacements)
            yield images, labels


def build_eval_loader(
    dataset: Any,
    *,
    batch_size: int,
    image_size: int,
    backend: str = "torchvision",
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    num_threads: int = 4,
    strict: Optional[bool] = None,
    device: str = "auto",
    device_id: Optional[int] = None,
):
    """Evaluation loader of an ``(image, label)`` dataset; see the module docstring.

    Args:
        backend: "torchvision" (DataLoader with ``num_workers`` processes), "dali"
            (``num_threads`` DALI threads on ``device``), or "auto" (DALI when `dali_available`).
        strict: stop at the first bad file; default: the dataset's ``strict`` (torchvision
            reads it from the dataset, which must then be built with the wanted value).
    """
    if backend not in ("torchvision", "dali", "auto"):
        raise ValueError(f"backend must be 'torchvision', 'dali' or 'auto', got {backend!r}")
    if backend == "auto":
        from sfrik_scale.data.dali import dali_available

        backend = "dali" if dali_available()[0] else "torchvision"
    if backend == "dali":
        from sfrik_scale.data.dali import build_dali_eval_loader

        return build_dali_eval_loader(dataset, batch_size=batch_size, image_size=image_size, rank=rank,
                                      world_size=world_size, num_threads=num_threads, strict=strict,
                                      device=device, device_id=device_id)
    from sfrik_scale.data import TransformedDataset

    if len(dataset) == 0:
        raise ValueError(f"dataset {dataset!r} is empty: nothing to evaluate")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if strict is not None and hasattr(dataset, "strict"):
        dataset.strict = bool(strict)
    sampler = ShardedSampler(len(dataset), rank=rank, world_size=world_size, shuffle=False, drop_last=False)
    return TorchvisionEvalLoader(TransformedDataset(dataset, build_eval_transform(image_size)), sampler,
                                 batch_size=batch_size, num_workers=num_workers,
                                 pin_memory=torch.cuda.is_available())


__all__ = ["TorchvisionEvalLoader", "build_eval_loader"]
