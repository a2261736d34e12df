"""One epoch's accounting: running totals while it trains, and its summary record at the end.

The totals live in a plain dict (``TrainState.epoch_tally``) so that they ride in every
checkpoint: an epoch interrupted (preemption, a crash) and resumed is summarised whole,
its loss averaged over all its steps and its time counted over every run it was trained
in. A run resumed from a checkpoint that predates the totals starts counting mid-epoch
(``from_sample`` > 0), and that epoch's record says it is partial.

The record is what ``summary.json`` keeps per epoch and the summary table prints: epoch,
steps, partial, time_s, images_per_s, skipped_steps, bad_files, the mean of the loss and of
each component over the counted micro-steps, and the loss's regulariser term under the
common name "regulariser".
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional


def new_epoch_tally(from_sample: int = 0) -> dict:
    """Running totals of one epoch; ``from_sample`` > 0: counting started mid-epoch (a resume
    from a checkpoint that predates tallies), so the epoch's record is partial."""
    return {"sums": {}, "count": 0, "skipped": 0, "images": 0, "time_s": 0.0, "from_sample": from_sample}


class EpochTally:
    """Counts into ``totals`` (a `new_epoch_tally` dict, changed in place) and times the epoch.

    Args:
        totals: the epoch's running totals, new or carried over from a checkpoint.
        clock: seconds, monotonic (``time.perf_counter``; tests pass their own).
    """

    def __init__(self, totals: dict, clock: Callable[[], float] = time.perf_counter) -> None:
        self.totals = totals
        self._clock = clock
        self._before, self._start = float(totals["time_s"]), clock()  # seconds of earlier runs, and now

    @classmethod
    def resume_or_start(cls, saved: Optional[dict], samples_in_epoch: int,
                        clock: Callable[[], float] = time.perf_counter) -> "EpochTally":
        """The totals of an epoch resumed mid-way (``samples_in_epoch`` > 0 and ``saved`` totals),
        carried on; else new ones, counting from ``samples_in_epoch``."""
        totals = saved if (samples_in_epoch and saved) else new_epoch_tally(samples_in_epoch)
        return cls(totals, clock)

    def add(self, loss: float, components: dict) -> None:
        """A finite micro-step: its (rank-averaged) loss and this rank's loss components
        (detached 0-dim tensors or floats; the key "loss" among them is ignored)."""
        sums = self.totals["sums"]
        sums["loss"] = sums.get("loss", 0.0) + loss
        for k, v in components.items():
            if k != "loss":
                sums[k] = sums.get(k, 0.0) + float(v)
        self.totals["count"] += 1

    def skip(self) -> None:
        """A micro-step dropped as non-finite."""
        self.totals["skipped"] += 1

    def add_images(self, images: int) -> None:
        """An optimiser step's global batch."""
        self.totals["images"] += images

    def seconds(self) -> float:
        """Seconds spent in this epoch, over all the runs it was trained in."""
        return self._before + self._clock() - self._start

    def save_time(self) -> None:
        """Write the seconds so far into the totals (before they go into a checkpoint)."""
        self.totals["time_s"] = self.seconds()

    @property
    def counted_from_start(self) -> bool:
        """False when counting began mid-epoch (the record is partial however the epoch ends)."""
        return self.totals["from_sample"] == 0

    def record(self, epoch: int, steps: int, partial: bool, bad_files: int,
               regulariser_key: Optional[str]) -> dict[str, Any]:
        """The epoch's summary from its running totals (see the module docstring).

        ``steps``: optimiser steps done in the run; ``bad_files``: unreadable images so far;
        ``regulariser_key``: the loss component reported as "regulariser" (None: none).
        """
        elapsed, count = self.seconds(), self.totals["count"]
        record: dict[str, Any] = {
            "epoch": epoch, "steps": steps, "partial": partial, "time_s": elapsed,
            "images_per_s": self.totals["images"] / elapsed if elapsed > 0 else None,
            "skipped_steps": self.totals["skipped"], "bad_files": bad_files}
        record.update({k: v / count for k, v in self.totals["sums"].items()} if count else {})
        record["regulariser"] = record.get(regulariser_key) if regulariser_key else None
        return record


__all__ = ["EpochTally", "new_epoch_tally"]
