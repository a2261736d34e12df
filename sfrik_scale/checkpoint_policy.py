"""When a run writes a checkpoint, and how many it keeps.

A run saves:

* every ``every_steps`` optimiser steps (``train.checkpoint_every_steps``; 0 or None: never
  in between);
* at the end of the run, unless its last step was just saved;
* on a preemption request (`sfrik_scale.preemption`), at the step boundary where every
  rank saw it, before it exits for requeue.

How a checkpoint is written (on every rank, the ``COMPLETE`` marker, pruning to the newest
``keep_last``) is `sfrik_scale.checkpoint.save_checkpoint`; what goes into it (the engine,
the client state) is the trainer's. The policy only decides and remembers the last step
it saved, so it is tested without DeepSpeed (any object with DeepSpeed's
``save_checkpoint(root, tag, client_state, save_latest)`` does).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Union

from .checkpoint import save_checkpoint


class CheckpointPolicy:
    """Save every ``every_steps`` steps and at the end; keep the newest ``keep_last``.

    Args:
        run_dir: the run directory (checkpoints go to ``run_dir/checkpoints``).
        rank: this process's rank (every rank writes its own shards).
        every_steps: steps between periodic checkpoints; 0 or None: none.
        keep_last: complete checkpoints kept after each save (older ones are pruned).
        save: the writer, `checkpoint.save_checkpoint` (its signature).
    """

    def __init__(self, run_dir: Union[str, Path], rank: int, every_steps: Optional[int], keep_last: int,
                 save: Callable[..., str] = save_checkpoint) -> None:
        self.run_dir, self.rank = Path(run_dir), rank
        self.every_steps, self.keep_last = every_steps, keep_last
        self._save = save
        #: the step of the last checkpoint this process wrote (None: none yet)
        self.last_saved_step: Optional[int] = None

    def due(self, step: int) -> bool:
        """A periodic checkpoint falls on optimiser step ``step``."""
        return bool(self.every_steps) and step % self.every_steps == 0

    def due_at_end(self, step: int) -> bool:
        """The run ends at ``step``: save unless that step was just saved."""
        return self.last_saved_step != step

    def save(self, engine: Any, step: int, client_state: dict) -> str:
        """Write the checkpoint of ``step`` (collective: every rank calls it); returns its tag."""
        tag = self._save(engine, self.run_dir, step, client_state, self.rank, self.keep_last)
        self.last_saved_step = step
        return tag


__all__ = ["CheckpointPolicy"]
