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
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .common import ProgressBar, padded_shard

if TYPE_CHECKING:
    from .session import EvalSetup


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


def encoded_splits(setup: "EvalSetup", *, batch_size: int, num_workers: int, cache: bool) -> tuple[dict, dict]:
    """This rank's block of the labelled train split and of the val split through the frozen
    backbone: ``({"features", "labels"}, {"features", "labels"})``, cached per rank in
    ``OUT/cache`` when ``cache`` (keyed by the weights, the data and the world size)."""
    from .data import eval_view

    topo, s = setup.topo, setup
    progress = s.monitor.active and s.monitor.show_progress
    fingerprint = {"source": s.source.to_dict(), "data": s.data, "rank": topo.rank, "world": topo.world_size}

    def encode(dataset, what: str) -> dict:
        f, y = extract_features(s.backbone, dataset, batch_size=batch_size, device=topo.device, rank=topo.rank,
                                world=topo.world_size, num_workers=num_workers, console=s.console,
                                progress=progress, description=f"{what} features")
        return {"features": f, "labels": y}

    train_set = eval_view(s.train_base, s.spec.image_size, s.train_indices)
    val_set = eval_view(s.val_base, s.spec.image_size)
    if not cache:
        return encode(train_set, "train"), encode(val_set, "val")
    cache_dir = s.out_dir / "cache"
    tag = f"rank{topo.rank}of{topo.world_size}"
    train = cached(cache_dir / f"bank_{tag}.pt", {**fingerprint, "split": "train"}, lambda: encode(train_set, "train"))
    val = cached(cache_dir / f"val_{tag}.pt", {**fingerprint, "split": "val"}, lambda: encode(val_set, "val"))
    return train, val
