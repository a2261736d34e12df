"""Trainer hooks: what plugs into the training loop without the trainer knowing it.

A hook factory ``make(cfg, topo, monitor, model) -> TrainerHook`` is given to
``Trainer(cfg, topo, hooks=[make, ...])``; ``sfrik_scale.pretrain`` passes the online
evaluation (`sfrik_scale.eval.online.OnlineEvaluator.from_config`). The trainer calls, on
every rank:

* ``on_step(labels, skip)`` after each micro-step (``skip``: the step was dropped as non-finite);
* ``on_epoch_end(model, epoch, step) -> dict`` at the end of each epoch (and of the run); the
  values join the epoch record of ``summary.json``; collectives are allowed here;
* ``state_dict()`` / ``load_state_dict(state)`` with each checkpoint, under the key ``key``
  of the checkpoint's client state (``None`` when the checkpoint has none);
* ``close()`` once, at the end.
"""
from __future__ import annotations

from typing import Any, Callable, Optional


class TrainerHook:
    """A hook that does nothing; subclasses override what they need."""

    #: key of this hook's state in the checkpoint's client state
    key = "hook"
    enabled = False

    def on_step(self, labels: Any, skip: bool = False) -> None:
        pass

    def on_epoch_end(self, model: Any, epoch: int, step: int) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Optional[dict]) -> None:
        pass

    def close(self) -> None:
        pass


#: ``make(cfg, topo, monitor, model) -> TrainerHook``
HookFactory = Callable[[Any, Any, Any, Any], TrainerHook]
