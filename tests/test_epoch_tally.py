"""sfrik_scale.epoch_tally alone: running totals of an epoch, carried across a resume, and its record."""
from __future__ import annotations

import json

import torch

from sfrik_scale.epoch_tally import EpochTally, new_epoch_tally


class _Clock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def _components(invariance: float, mmd: float) -> dict:
    return {"loss": torch.tensor(99.0), "invariance": torch.tensor(invariance), "mmd": torch.tensor(mmd)}


def test_the_record_averages_counted_steps_and_times_the_epoch():
    clock = _Clock()
    tally = EpochTally.resume_or_start({}, 0, clock)
    tally.add(4.0, _components(1.0, 3.0))
    tally.add(2.0, _components(3.0, 5.0))
    tally.skip()
    tally.add_images(64)
    tally.add_images(64)
    clock.now += 8.0
    record = tally.record(epoch=2, steps=7, partial=False, bad_files=1, regulariser_key="mmd")
    assert record == {"epoch": 2, "steps": 7, "partial": False, "time_s": 8.0, "images_per_s": 16.0,
                      "skipped_steps": 1, "bad_files": 1, "loss": 3.0, "invariance": 2.0, "mmd": 4.0,
                      "regulariser": 4.0}
    assert list(record)[:7] == ["epoch", "steps", "partial", "time_s", "images_per_s", "skipped_steps", "bad_files"]


def test_no_counted_step_gives_no_means_and_no_regulariser_key_gives_none():
    clock = _Clock()
    tally = EpochTally(new_epoch_tally(), clock)
    tally.skip()
    record = tally.record(epoch=0, steps=1, partial=True, bad_files=0, regulariser_key=None)
    assert "loss" not in record and record["regulariser"] is None and record["images_per_s"] is None
    tally.add(1.0, _components(0.5, 0.25))
    assert tally.record(0, 1, True, 0, None)["regulariser"] is None


def test_a_resumed_epoch_carries_its_totals_and_seconds_on():
    clock = _Clock()
    first = EpochTally.resume_or_start({}, 0, clock)
    first.add(6.0, _components(1.0, 1.0))
    first.add_images(32)
    clock.now += 5.0
    first.save_time()  # as before a checkpoint
    saved = json.loads(json.dumps(first.totals))  # what the checkpoint holds
    clock.now += 100.0  # the job waits in the queue
    second = EpochTally.resume_or_start(saved, 32, clock)
    assert second.totals is saved and second.counted_from_start
    second.add(2.0, _components(3.0, 3.0))
    second.add_images(32)
    clock.now += 3.0
    record = second.record(0, 2, partial=False, bad_files=0, regulariser_key="mmd")
    assert record["time_s"] == 8.0 and record["loss"] == 4.0 and record["invariance"] == 2.0
    assert record["images_per_s"] == 64 / 8.0


def test_saving_the_time_keeps_the_clock_running():
    clock = _Clock()
    tally = EpochTally.resume_or_start({}, 0, clock)
    clock.now += 2.0
    tally.save_time()
    clock.now += 3.0
    assert tally.totals["time_s"] == 2.0 and tally.seconds() == 5.0


def test_a_resume_without_saved_totals_counts_from_where_it_starts():
    tally = EpochTally.resume_or_start({}, 96, _Clock())
    assert tally.totals == new_epoch_tally(96) and not tally.counted_from_start
    fresh = EpochTally.resume_or_start({"sums": {"loss": 1.0}, "count": 1, "skipped": 0, "images": 32,
                                        "time_s": 1.0, "from_sample": 0}, 0, _Clock())
    assert fresh.totals == new_epoch_tally()  # position 0: a new epoch, whatever was saved
