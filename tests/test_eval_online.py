"""Tests of sfrik_scale.eval.online: the detached linear head and the kNN monitor used during pretraining."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sfrik_scale.eval.online import NullOnlineEvaluator, OnlineEvaluator
from sfrik_scale.models import build_model
from sfrik_scale.topology import Topology

CLASSES, IMAGE = 4, 16


def settings(**over):
    base = dict(enabled=True, every_epochs=1, val_path=None, val_size=24, bank_per_class=5, knn_k=5,
                knn_temperature=0.07, head_lr=0.1, batch_size=16)
    base.update(over)
    return SimpleNamespace(**base)


DATA = SimpleNamespace(dataset="synthetic", path=None, num_classes=CLASSES, image_size=IMAGE, synthetic_size=40)


class RecordingMonitor:
    def __init__(self):
        self.logged, self.active = [], True

    def scalars(self, step, values, prefix="train"):
        self.logged.append((prefix, step, dict(values)))

    def print(self, *args):
        pass


def make(rank=0, world=1, **over):
    torch.manual_seed(0)
    model = build_model("tiny_cnn", "32-32-64")
    topo = Topology(rank, world, rank, torch.device("cpu"), "single")
    return model, OnlineEvaluator(settings(**over), DATA, 0, topo, RecordingMonitor(), model)


def training_step(model, evaluator, seed):
    """One SSL-like step: two forwards in train mode, then the evaluator's step."""
    g = torch.Generator().manual_seed(seed)
    v1, v2 = torch.randn(8, 3, IMAGE, IMAGE, generator=g), torch.randn(8, 3, IMAGE, IMAGE, generator=g)
    labels = torch.randint(0, CLASSES, (8,), generator=g)
    model.train()
    loss = (model(v1) - model(v2)).pow(2).mean()
    evaluator.on_step(labels)
    return loss


def test_missing_or_disabled_section_gives_the_no_op_evaluator():
    model = build_model("tiny_cnn", "32-32-64")
    topo = Topology(0, 1, 0, torch.device("cpu"), "single")
    cfg = SimpleNamespace(data=DATA, train=SimpleNamespace(seed=0))
    assert type(OnlineEvaluator.from_config(cfg, topo, None, model)) is NullOnlineEvaluator
    cfg.online_eval = settings(enabled=False)
    evaluator = OnlineEvaluator.from_config(cfg, topo, None, model)
    assert type(evaluator) is NullOnlineEvaluator and evaluator.on_epoch_end(model, 0, 1) == {}


def test_head_learns_from_both_views_without_touching_the_backbone():
    model, evaluator = make()
    before = evaluator.head.weight.detach().clone()
    loss = training_step(model, evaluator, seed=1)
    assert not torch.equal(before, evaluator.head.weight)
    assert all(p.grad is None for p in model.parameters())  # the head's backward stopped at the features
    loss.backward()  # the SSL graph is intact
    assert evaluator._sums[2].item() == 16  # 2 views x 8 images


def test_epoch_end_logs_linear_and_knn_scores_on_the_held_out_split():
    model, evaluator = make()
    for seed in range(3):
        training_step(model, evaluator, seed)
    values = evaluator.on_epoch_end(model, epoch=0, step=3)
    assert set(values) == {"online_knn_top1", "online_knn_top5", "online_linear_top1", "online_linear_top5",
                           "online_linear_train_top1", "online_linear_train_loss"}
    assert all(0 <= values[k] <= 100 for k in values if "loss" not in k)
    prefix, step, logged = evaluator.monitor.logged[-1]
    assert prefix == "online" and step == 3 and logged["knn_top1"] == values["online_knn_top1"]
    assert evaluator._captured == [] and model.training  # eval-mode encoding was not captured; mode restored
    assert len(evaluator.bank_set) == CLASSES * 5 and len(evaluator.val_set) == 24


def test_skipped_epochs_do_nothing():
    model, evaluator = make(every_epochs=2)
    assert evaluator.on_epoch_end(model, epoch=0, step=1) == {}


def test_state_dict_restores_the_head():
    model, evaluator = make()
    training_step(model, evaluator, seed=4)
    state = evaluator.state_dict()
    _, other = make()
    other.load_state_dict(state)
    torch.testing.assert_close(other.head.weight, evaluator.head.weight)
    other.load_state_dict({})  # a checkpoint without online state


def test_folder_data_without_a_held_out_path_is_refused():
    model = build_model("tiny_cnn", "32-32-64")
    data = SimpleNamespace(dataset="image_folder", path="/data/train", image_size=IMAGE)
    with pytest.raises(ValueError, match="online_eval.val_path"):
        OnlineEvaluator(settings(), data, 0, Topology(0, 1, 0, torch.device("cpu"), "single"), None, model)


def online_ranks_worker(rank: int, world: int) -> dict:
    """Run by the 2-rank spawn of tests/test_eval_commands.py (one spawn for every multi-process eval check)."""
    model, evaluator = make(rank, world)
    for step in range(2):
        training_step(model, evaluator, seed=100 * rank + step)  # different data on each rank
    local = [p.detach().clone().numpy() for p in evaluator.head.parameters()]
    values = evaluator.on_epoch_end(model, epoch=0, step=2)
    return {"local": local, "averaged": [p.detach().numpy() for p in evaluator.head.parameters()], "values": values}



def test_a_skipped_step_drops_its_features():
    model, evaluator = make()
    before = evaluator.head.weight.detach().clone()
    model.train()
    model(torch.randn(4, 3, IMAGE, IMAGE))
    evaluator.on_step(torch.zeros(4, dtype=torch.long), skip=True)
    assert evaluator._captured == [] and torch.equal(before, evaluator.head.weight)
