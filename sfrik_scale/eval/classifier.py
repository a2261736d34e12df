"""Linear probe and semi-supervised fine-tuning: one data-parallel classifier loop.

Recipes (VICReg / SFRIK evaluation scripts; the defaults of the commands):
- ``sfrik-scale linear-eval``: the backbone is frozen and kept in eval mode (BatchNorm uses
  its pretraining statistics); a linear head initialised N(0, 0.01) with zero bias is
  trained with SGD (momentum 0.9), cosine decay over 100 epochs (per epoch, to 0), batch
  256, lr 0.4 (VICReg's recipe uses 0.02: ``--lr 0.02``), weight decay 1e-6. Training crops
  RandomResizedCrop + horizontal flip (not on digits); validation resize 256/224 x size
  (whole image up to 64 px) + center crop.
- ``sfrik-scale finetune``: the backbone is trained too, in train mode; 20 epochs, batch
  256, weight decay 0; with 1 % of the labels backbone lr 0.004 and head lr 1.0, with 10 %
  0.02 and 0.1 (`finetune_learning_rates`).
Top-1/top-5 are reported for the last epoch and as the best over the evaluated epochs
(each maximised separately, as VICReg's script does), in percent.

Distributed: data parallel. Every rank holds the same model (same weights, same seeded
head) and trains on its share of each global batch (`ShardedSampler`, padded so that all
ranks take the same number of equal-sized steps); after ``backward`` the gradients are
averaged over ranks with one all-reduce (`common.average_gradients`), so every rank takes
the single-process step on the global batch. Fine-tuning keeps per-rank BatchNorm batch
statistics (like DDP without SyncBatchNorm); the running statistics are averaged over
ranks before each validation. Validation: each rank scores its block of the val set and the
sums are all-reduced. One process: no collective.

Resumable: ``OUT/checkpoint.pt`` (head or whole model, optimiser, history) is written after
every epoch; a rerun with the same settings continues after the last finished epoch.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from .. import comm
from ..data import EpochIndexSampler, ShardedSampler, mirror_invariant, mix_seed
from .common import (average_floating_state, average_gradients, base_result, finish_result, save_state,
                     shard_range, sum_over_ranks, topk_correct)
from .data import SeededAugmentDataset, classifier_train_transform, eval_view
from .session import EvalSetup

CHECKPOINT_FILE = "checkpoint.pt"
_LOADER_STREAM = 0x7C1A

#: Semi-supervised learning rates (backbone, head) by labelled fraction (the issue's recipes).
FINETUNE_RECIPES = {0.01: (0.004, 1.0), 0.1: (0.02, 0.1)}


def finetune_learning_rates(fraction: float) -> Tuple[float, float]:
    """(backbone lr, head lr) of the published recipe nearest to ``fraction`` (the 1 % one up to 3 %)."""
    return FINETUNE_RECIPES[0.01] if fraction <= 0.03 else FINETUNE_RECIPES[0.1]


@dataclass
class ClassifierHParams:
    """Hyper-parameters of one classifier run (all exposed as command-line options)."""

    epochs: int
    head_lr: float
    weight_decay: float
    backbone_lr: float = 0.0          # fine-tuning only
    finetune: bool = False            # False: frozen backbone in eval mode
    batch_size: int = 256             # global, over all ranks
    momentum: float = 0.9
    crop_scale: Tuple[float, float] = (0.08, 1.0)
    seed: int = 0                     # head init, shuffling, augmentations
    eval_every: int = 1               # validate every k epochs (and after the last)
    eval_batch_size: int = 256        # per rank
    num_workers: int = 0              # DataLoader workers per rank

    def check(self, world_size: int) -> None:
        if self.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size < world_size or self.batch_size % world_size:
            raise ValueError(f"--batch-size {self.batch_size} must be a positive multiple of the world size "
                             f"{world_size}")
        for name in ("head_lr", "backbone_lr", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("eval_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"--momentum must be in [0, 1), got {self.momentum}")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"--crop-scale must satisfy 0 < low <= high <= 1, got {list(self.crop_scale)}")

    def fingerprint(self) -> dict:
        """What a resumed run must share with the saved one."""
        d = asdict(self)
        for k in ("eval_batch_size", "num_workers", "eval_every"):
            d.pop(k)
        d["crop_scale"] = list(d["crop_scale"])
        return d


class Classifier(nn.Module):
    """Backbone + linear head; the head starts N(0, 0.01) with zero bias.

    Shapes: (batch, 3, S, S) -> (batch, num_classes) logits.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, frozen: bool) -> None:
        super().__init__()
        self.backbone, self.frozen = backbone, frozen
        self.head = nn.Linear(feature_dim, num_classes)
        nn.init.normal_(self.head.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.head.bias)
        if frozen:
            self.backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> "Classifier":
        super().train(mode)
        if self.frozen:
            self.backbone.eval()  # frozen: BatchNorm keeps its pretraining statistics
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            with torch.no_grad():
                h = self.backbone(x)
        else:
            h = self.backbone(x)
        return self.head(h)


class ClassifierTraining:
    """``ClassifierTraining(setup, hp).run()`` trains, validates, checkpoints and writes the result."""

    def __init__(self, setup: EvalSetup, hp: ClassifierHParams, resume: bool = True,
                 kind: Optional[str] = None) -> None:
        hp.check(setup.topo.world_size)
        self.s, self.hp, self.resume_enabled = setup, hp, resume
        # "supervised": fine-tuning from a random initialisation on all labels (the upper bound)
        self.kind = kind or ("finetune" if hp.finetune else "linear")
        self.epoch = 0
        self.history: list[dict] = []
        self.best = {"top1": None, "top5": None, "epoch": None}

    # ------------------------------------------------------------------ build
    def build(self) -> "ClassifierTraining":
        s, hp, topo = self.s, self.hp, self.s.topo
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(hp.seed, 0x4EAD))  # the same head on every rank
            self.model = Classifier(s.backbone, s.feature_dim, s.num_classes, frozen=not hp.finetune).to(topo.device)
        groups = [{"params": list(self.model.head.parameters()), "base_lr": hp.head_lr, "name": "head"}]
        if hp.finetune:
            groups.append({"params": list(self.model.backbone.parameters()), "base_lr": hp.backbone_lr,
                           "name": "backbone"})
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.SGD(groups, lr=0.0, momentum=hp.momentum, weight_decay=hp.weight_decay)
        # no flips where a mirrored image is another class (digits), as in pretraining
        transform = classifier_train_transform(s.spec.image_size, hp.crop_scale, flip=mirror_invariant(s.spec.dataset))
        train_set = SeededAugmentDataset(s.train_base, transform, s.train_indices, seed=hp.seed)
        self.sampler = ShardedSampler(len(train_set), rank=topo.rank, world_size=topo.world_size, seed=hp.seed,
                                      shuffle=True, drop_last=False, global_batch=hp.batch_size)
        cuda = topo.device.type == "cuda"
        self.train_loader = DataLoader(
            train_set, batch_size=hp.batch_size // topo.world_size, sampler=EpochIndexSampler(self.sampler),
            num_workers=hp.num_workers, pin_memory=cuda, persistent_workers=hp.num_workers > 0,
            generator=torch.Generator().manual_seed(mix_seed(hp.seed, _LOADER_STREAM, topo.rank)))
        val_set = eval_view(s.val_base, s.spec.image_size)
        start, stop = shard_range(len(val_set), topo.rank, topo.world_size)
        self.val_size = len(val_set)
        self.val_loader = DataLoader(Subset(val_set, range(start, stop)), batch_size=hp.eval_batch_size,
                                     shuffle=False, num_workers=hp.num_workers, pin_memory=cuda)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        return self

    @property
    def checkpoint_path(self) -> Path:
        return self.s.out_dir / CHECKPOINT_FILE

    def fingerprint(self) -> dict:
        return {"kind": self.kind, "hp": self.hp.fingerprint(), "source": self.s.source.to_dict(),
                "data": {k: v for k, v in self.s.data.items() if k != "val_images"}}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        weights = self.model.state_dict() if self.hp.finetune else self.model.head.state_dict()
        return {"epoch": self.epoch, "model": weights, "optimizer": self.optimizer.state_dict(),
                "history": self.history, "best": self.best, "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") != self.fingerprint():
            raise ValueError(f"{self.checkpoint_path} belongs to a different evaluation (other source, data or "
                             "hyper-parameters); use another --out or --no-resume")
        (self.model if self.hp.finetune else self.model.head).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.history, self.best = state["epoch"], state["history"], state["best"]

    def resume(self) -> None:
        if not (self.resume_enabled and self.checkpoint_path.is_file()):
            return
        self.load_state_dict(torch.load(self.checkpoint_path, map_location=self.s.topo.device, weights_only=True))
        self.s.monitor.print(f"resumed from {self.checkpoint_path} after epoch {self.epoch}")

    # ------------------------------------------------------------------ one epoch
    def set_lr(self, epoch: int) -> float:
        """Cosine over the epochs, stepped per epoch (CosineAnnealingLR(T_max=epochs), eta_min 0)."""
        factor = 0.5 * (1.0 + math.cos(math.pi * epoch / self.hp.epochs))
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        return factor

    def train_epoch(self, epoch: int) -> dict:
        mon, dev = self.s.monitor, self.s.topo.device
        factor = self.set_lr(epoch)
        self.model.train()
        self.sampler.set_epoch(epoch)
        mon.start_epoch(epoch, self.hp.epochs, self.steps_per_epoch)
        sums = torch.zeros(3, dtype=torch.float64, device=dev)  # loss x n, correct, n (no per-step sync)
        start = time.perf_counter()
        for images, labels in self.train_loader:
            step_start = time.perf_counter()
            images, labels = images.to(dev, non_blocking=True), labels.to(dev, non_blocking=True)
            logits = self.model(images)
            loss = F.cross_entropy(logits, labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(self.params)
            self.optimizer.step()
            with torch.no_grad():
                sums += torch.stack([loss.detach().double() * len(labels),
                                     (logits.argmax(1) == labels).sum().double(),
                                     torch.tensor(float(len(labels)), dtype=torch.float64, device=dev)])
            if mon.active:  # rank 0's own loss for the progress bar: a host sync per step, rank 0 only
                mon.advance(float(loss.detach()), self.hp.batch_size / (time.perf_counter() - step_start))
        total = comm.all_reduce_(sums).tolist()  # host sync: once per epoch
        elapsed = time.perf_counter() - start
        return {"epoch": epoch, "lr_factor": factor, "train_loss": total[0] / max(total[2], 1),
                "train_top1": 100.0 * total[1] / max(total[2], 1), "time_s": elapsed,
                "images_per_s": total[2] / elapsed if elapsed > 0 else None}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Top-1/top-5 (%) and loss on the whole val set (blocks scored per rank, sums all-reduced)."""
        dev = self.s.topo.device
        if self.hp.finetune:
            average_floating_state(list(self.model.backbone.buffers()))  # per-rank BN statistics -> their mean
        self.model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        c1 = torch.zeros((), dtype=torch.float64, device=dev)
        c5 = torch.zeros((), dtype=torch.float64, device=dev)
        for images, labels in self.val_loader:
            images, labels = images.to(dev, non_blocking=True), labels.to(dev, non_blocking=True)
            logits = self.model(images)
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
            a, b = topk_correct(logits, labels, (1, 5))
            c1 += a.double()
            c5 += b.double()
        total = sum_over_ranks([float(loss_sum), float(c1), float(c5)], dev)  # host sync: once per evaluation
        n = max(self.val_size, 1)
        return {"val_loss": total[0] / n, "top1": 100.0 * total[1] / n, "top5": 100.0 * total[2] / n}

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        start = time.perf_counter()
        s, hp = self.s, self.hp
        self.build()
        self.resume()
        if self.epoch >= hp.epochs:
            s.monitor.print(f"nothing to do: {self.epoch} epochs already done")
        while self.epoch < hp.epochs:
            epoch = self.epoch
            record = self.train_epoch(epoch)
            if (epoch + 1) % hp.eval_every == 0 or epoch + 1 == hp.epochs:
                record.update(self.evaluate())
                for key in ("top1", "top5"):
                    if self.best[key] is None or record[key] > self.best[key]:
                        self.best[key] = record[key]
                        if key == "top1":
                            self.best["epoch"] = epoch
            s.monitor.end_epoch(record)
            s.monitor.scalars(epoch + 1, {k: v for k, v in record.items() if k != "epoch"}, prefix=self.kind)
            self.history.append(record)
            self.epoch = epoch + 1
            save_state(self.checkpoint_path, self.state_dict(), s.topo)
        last = next((r for r in reversed(self.history) if "top1" in r), {})
        hyper = asdict(self.hp)
        if self.kind == "linear":
            hyper["protocol"] = "sgd"
        result = base_result(self.kind, s.topo, s.source.to_dict(), s.data, hyper)
        result["metrics"] = {"top1": last.get("top1"), "top5": last.get("top5"),
                             "best_top1": self.best["top1"], "best_top5": self.best["top5"],
                             "best_epoch": self.best["epoch"], "epochs": self.epoch}
        result["history"] = self.history
        self._print_table(result["metrics"])
        s.monitor.close()
        return finish_result(result, s.out_dir, s.topo, start)

    def _print_table(self, m: dict) -> None:
        console = self.s.console
        if console is None:
            return
        from rich.table import Table

        table = Table(title=f"{self.kind}: {self.s.data['benchmark']}")
        for col in ("", "top-1 (%)", "top-5 (%)"):
            table.add_column(col, justify="right")
        table.add_row("last", _pct(m["top1"]), _pct(m["top5"]))
        table.add_row("best", _pct(m["best_top1"]), _pct(m["best_top5"]))
        console.print(table)


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}"
