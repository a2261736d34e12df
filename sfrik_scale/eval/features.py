"""Frozen-backbone features of a dataset, sharded over ranks, with an optional on-disk cache.

Distributed: rank r encodes the contiguous block `shard_range(len(dataset), r, world)`;
every rank runs the same number of forward passes (blocks padded, the padding dropped),
so backbones whose forward holds collectives (ZeRO-3, SyncBatchNorm) cannot hang. No
collective here; `common.gather_rows` assembles the blocks in dataset order when a caller
needs them all.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .common import ProgressBar, padded_shard


@torch.no_grad()
def extract_features(backbone: nn.Module, dataset: Dataset, *, batch_size: int, device: torch.device,
                     rank: int = 0, world: int = 1, num_workers: int = 0, console: Any = None,
                     progress: bool = True, description: str = "features",
                     input_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features (n_local, D) float32, targets (n_local,))`` of this rank's block, on ``device``.

    ``dataset`` yields ``(image tensor (3, S, S), target)``; the target is whatever the
    dataset returns (a label, or an index). The backbone runs in eval mode (its mode is
    restored afterwards); inputs are cast to ``input_dtype`` (default: the dtype of its
    first parameter, e.g. bf16 under DeepSpeed bf16).
    """
    indices, valid = padded_shard(len(dataset), rank, world)
    if input_dtype is None:
        first = next(backbone.parameters(), None)
        input_dtype = first.dtype if first is not None else torch.float32
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    was_training = backbone.training
    backbone.eval()
    feats, targets = [], []
    try:
        with ProgressBar(console, description, len(loader), enabled=progress) as bar:
            for images, target in loader:
                out = backbone(images.to(device, input_dtype, non_blocking=True))
                feats.append(out.float())
                targets.append(torch.as_tensor(target).to(device))
                bar.advance()
    finally:
        backbone.train(was_training)
    if not feats:  # an empty dataset
        return torch.zeros(0, 0, device=device), torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat(feats)[:valid], torch.cat(targets)[:valid]


def cached(path: Path, fingerprint: dict, compute: Callable[[], dict]) -> dict:
    """``compute()`` (a dict of tensors), stored at ``path`` with ``fingerprint`` and reused by a
    later call with the same fingerprint (an interrupted evaluation resumes after its extraction).

    The file is written by the process that computed it (a per-rank path for per-rank data).
    """
    key = json.dumps(fingerprint, sort_keys=True, default=str)
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("fingerprint") == key:
                return {k: v for k, v in saved.items() if k != "fingerprint"}
        except Exception:  # a torn or foreign file: recompute
            pass
    data = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save({**{k: v.cpu() for k, v in data.items()}, "fingerprint": key}, tmp)
    os.replace(tmp, path)
    return data
