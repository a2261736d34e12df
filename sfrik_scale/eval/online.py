"""Online evaluation during pretraining: a detached linear head and a kNN monitor.

Two signals, logged to TensorBoard (``online/*``) at the end of every ``every_epochs``-th epoch:
- a linear head trained alongside the SSL model on the DETACHED backbone features of the
  training batches (both views, their labels): no gradient reaches the backbone, so the
  pretraining is unchanged; it is scored on a held-out split (top-1/top-5), its running
  training accuracy is logged too;
- a weighted kNN (k = 20, T = 0.07; `sfrik_scale.eval.knn`) whose bank is a fixed,
  per-class balanced set of labelled training images, re-encoded with the current backbone
  (eval transform, eval mode), queried by the held-out split.

Held-out split: the "val" split of the synthetic and digits datasets; for image_folder and
file_list data the folder or list ``online_eval.val_path`` (e.g. ImageNet val). At most
``val_size`` of its images are scored (a per-class balanced subset).

Wiring (the trainer's side; ``settings`` is ``cfg.online_eval``)::

    self.online = OnlineEvaluator.from_config(cfg, topo, self.monitor, self.engine.module)
    ...  # per micro-step, after train_step:
    self.online.on_step(labels, skip=result["nonfinite"])
    ...  # after an epoch:
    record.update(self.online.on_epoch_end(self.engine.module, st.epoch, st.step))
    ...  # checkpoint client state / resume:
    client["online_eval"] = self.online.state_dict()
    self.online.load_state_dict(client.get("online_eval"))

`from_config` returns a `NullOnlineEvaluator` (every method a no-op) when the section is
missing or disabled, so the loop never branches. The features come from a forward hook on
``model.backbone`` that keeps the detached output of every training-mode forward; nothing
is recomputed.

Distributed: every rank trains its own copy of the head on its own micro-batches with no
per-step communication; at the end of an epoch the copies (weights and momentum) are
averaged with one all-reduce (model averaging), so the ranks agree again. The held-out and
bank images are encoded in per-rank blocks with equal numbers of forward passes (ZeRO-3
safe); kNN merges the per-rank candidates (`knn_votes`), and the metric sums are
all-reduced, so every rank returns the same numbers. Each rank encodes with its own
BatchNorm running statistics (identical under SyncBatchNorm; per rank otherwise, e.g. on
CPU); the monitor never modifies the model. Every rank must call `on_epoch_end` (it holds
collectives). One process: no collective.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import comm
from ..data.datasets import reads_path
from ..topology import Topology
from .common import average_floating_state, gather_rows, sum_over_ranks, topk_correct
from .data import EvalDataSpec, eval_view, num_classes_of
from ..hooks import TrainerHook
from .features import extract_features
from .knn import knn_votes
from .subsets import balanced_subset, dataset_labels

DEFAULT_SYNTHETIC_VAL_SIZE = 2000


class NullOnlineEvaluator(TrainerHook):
    """Online evaluation switched off: every hook does nothing."""

    key = "online_eval"


class OnlineEvaluator(NullOnlineEvaluator):
    """Detached linear head + kNN monitor (see the module docstring).

    Args:
        settings: the ``online_eval`` config section (every_epochs, val_path, val_size,
            bank_per_class, knn_k, knn_temperature, head_lr, batch_size).
        data: the ``data`` config section (dataset, path, num_classes, image_size, synthetic_size).
        seed: the run's seed (synthetic images, the bank's choice, the head's init).
        topo, monitor: the trainer's.
        model: the SSL model (``backbone`` attribute, ``feature_dim``); the hook is attached to it.
    """

    enabled = True

    def __init__(self, settings: Any, data: Any, seed: int, topo: Topology, monitor: Any, model: nn.Module) -> None:
        self.settings, self.topo, self.monitor = settings, topo, monitor
        s = settings
        for name, low in (("every_epochs", 1), ("bank_per_class", 1), ("knn_k", 1), ("batch_size", 1)):
            if getattr(s, name) < low:
                raise ValueError(f"online_eval.{name} must be >= {low}, got {getattr(s, name)}")
        if s.knn_temperature <= 0 or s.head_lr <= 0:
            raise ValueError("online_eval.knn_temperature and online_eval.head_lr must be > 0")
        if reads_path(data.dataset) and not s.val_path:
            raise ValueError(f"online_eval.val_path: required with data.dataset={data.dataset} "
                             "(a held-out folder or list, e.g. ImageNet val)")
        spec = EvalDataSpec(dataset=data.dataset, train_path=data.path, val_path=s.val_path,
                            image_size=data.image_size, num_classes=getattr(data, "num_classes", 10),
                            synthetic_size=getattr(data, "synthetic_size", 4096),
                            synthetic_val_size=s.val_size or DEFAULT_SYNTHETIC_VAL_SIZE, seed=seed)
        train, val = spec.build("train"), spec.build("val")
        train_labels = dataset_labels(train)
        self.num_classes = num_classes_of(train, train_labels)
        bank = balanced_subset(train_labels, per_class=s.bank_per_class, seed=seed)
        self.bank_set = eval_view(train, spec.image_size, bank)
        val_idx = None
        if s.val_size is not None and s.val_size < len(val):
            per_class = max(1, s.val_size // self.num_classes)
            val_idx = balanced_subset(dataset_labels(val), per_class=per_class, seed=seed)
        self.val_set = eval_view(val, spec.image_size, val_idx)
        feature_dim = int(getattr(model, "feature_dim"))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.head = nn.Linear(feature_dim, self.num_classes).to(topo.device)
        nn.init.normal_(self.head.weight, 0.0, 0.01)
        nn.init.zeros_(self.head.bias)
        self.optimizer = torch.optim.SGD(self.head.parameters(), lr=s.head_lr, momentum=0.9)
        self._sums = torch.zeros(3, dtype=torch.float64, device=topo.device)  # loss x n, correct, n
        self._captured: list[torch.Tensor] = []
        self._hook = model.backbone.register_forward_hook(self._capture)

    @classmethod
    def from_config(cls, cfg: Any, topo: Topology, monitor: Any, model: nn.Module) -> NullOnlineEvaluator:
        """The evaluator of ``cfg.online_eval``, or a no-op one when it is absent or disabled."""
        settings = getattr(cfg, "online_eval", None)
        if settings is None or not settings.enabled:
            return NullOnlineEvaluator()
        return cls(settings, cfg.data, cfg.train.seed, topo, monitor, model)

    # ------------------------------------------------------------------ per step
    def _capture(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if module.training and torch.is_grad_enabled():  # training forwards only, not our own encoding
            self._captured.append(output.detach())

    def on_step(self, labels: torch.Tensor, skip: bool = False) -> None:
        """One SGD step of the head on the features captured since the last call (all views).

        ``skip=True`` (a step the trainer skipped as non-finite) drops them instead.
        """
        if skip or not self._captured:
            self._captured.clear()
            return
        feats = torch.cat([f.float() for f in self._captured])
        views = len(self._captured)
        self._captured.clear()
        y = labels.to(feats.device, non_blocking=True).repeat(views)
        if y.shape[0] != feats.shape[0]:
            raise ValueError(f"online_eval: {feats.shape[0]} captured feature rows but {y.shape[0]} labels "
                             f"({views} forwards of the backbone since the last step)")
        with torch.enable_grad():
            logits = self.head(feats)
            loss = F.cross_entropy(logits, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        with torch.no_grad():  # accumulated on the device: no host sync per step
            self._sums += torch.stack([loss.detach().double() * len(y), (logits.argmax(1) == y).sum().double(),
                                       torch.tensor(float(len(y)), dtype=torch.float64, device=y.device)])

    # ------------------------------------------------------------------ per epoch
    def on_epoch_end(self, model: nn.Module, epoch: int, step: int) -> dict:
        """Average the heads, encode bank and held-out images, log and return ``online/*`` metrics.

        Collective: every rank must call it. Returns {} on epochs that are skipped.
        """
        s, topo = self.settings, self.topo
        if (epoch + 1) % s.every_epochs:
            return {}
        self._captured.clear()
        while isinstance(getattr(model, "module", None), nn.Module) and not hasattr(model, "backbone"):
            model = model.module  # a DeepSpeed engine or DDP wrapper
        state = list(self.head.parameters()) + [st["momentum_buffer"] for st in self.optimizer.state.values()
                                                if st.get("momentum_buffer") is not None]
        average_floating_state(state)  # model averaging of the per-rank heads
        encode = dict(batch_size=s.batch_size, device=topo.device, rank=topo.rank, world=topo.world_size,
                      progress=False)
        bank_f, bank_y = extract_features(model.backbone, self.bank_set, **encode)
        val_f, val_y = extract_features(model.backbone, self.val_set, **encode)
        with torch.no_grad():
            votes = knn_votes(bank_f, bank_y, gather_rows(val_f), self.num_classes, ks=(s.knn_k,),
                              temperature=s.knn_temperature)[s.knn_k]
            knn1, knn5 = topk_correct(votes, gather_rows(val_y), (1, 5))
            logits = self.head(val_f)
            lin1, lin5 = topk_correct(logits, val_y, (1, 5))
        totals = sum_over_ranks([float(lin1), float(lin5)], topo.device)  # host sync: once per evaluation
        train = comm.all_reduce_(self._sums.clone()).tolist()  # host sync: once per evaluation
        self._sums.zero_()
        n_val = max(len(self.val_set), 1)
        values = {"knn_top1": 100.0 * float(knn1) / n_val, "knn_top5": 100.0 * float(knn5) / n_val,
                  "linear_top1": 100.0 * totals[0] / n_val, "linear_top5": 100.0 * totals[1] / n_val,
                  "linear_train_top1": 100.0 * train[1] / train[2] if train[2] else math.nan,
                  "linear_train_loss": train[0] / train[2] if train[2] else math.nan}
        self.monitor.scalars(step, values, prefix="online")
        self.monitor.print(f"online eval after epoch {epoch + 1}: linear top-1 {values['linear_top1']:.2f} %, "
                           f"kNN (k={s.knn_k}) top-1 {values['knn_top1']:.2f} %")
        return {f"online_{k}": v for k, v in values.items()}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Head and optimizer state, for the trainer's checkpoint client state."""
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Optional[dict]) -> None:
        """Restore `state_dict` (None or {} — a checkpoint without online state — is ignored)."""
        if state:
            self.head.load_state_dict(state["head"])
            self.optimizer.load_state_dict(state["optimizer"])

    def close(self) -> None:
        """Remove the forward hook."""
        self._hook.remove()
