"""sfrik_scale.checkpoint_policy alone: when a run saves and how many checkpoints it keeps, with a
stand-in for the DeepSpeed engine (no DeepSpeed, no process group)."""
from __future__ import annotations

from pathlib import Path

import torch

from sfrik_scale import checkpoint as ckpt
from sfrik_scale.checkpoint_policy import CheckpointPolicy


class _Engine:
    """DeepSpeed's ``save_checkpoint`` as the checkpoint code calls it: one file per tag."""

    def __init__(self):
        self.module = torch.nn.Linear(2, 2)
        self.saved = []

    def save_checkpoint(self, root, tag, client_state, save_latest):
        (Path(root) / tag).mkdir(parents=True, exist_ok=True)
        (Path(root) / tag / "mp_rank_00_model_states.pt").write_bytes(b"weights")
        self.saved.append((tag, client_state, save_latest))


def _run(policy: CheckpointPolicy, engine: _Engine, steps: int) -> list[int]:
    """The trainer's use of the policy: a periodic save when due, and one at the end."""
    for step in range(1, steps + 1):
        if policy.due(step):
            policy.save(engine, step, {"step": step})
    if policy.due_at_end(steps):
        policy.save(engine, steps, {"step": steps})
    return [ckpt.step_of(tag) for tag, _, _ in engine.saved]


def test_periodic_checkpoints_and_one_at_the_end(tmp_path):
    engine = _Engine()
    assert _run(CheckpointPolicy(tmp_path, 0, every_steps=3, keep_last=10), engine, 8) == [3, 6, 8]
    assert engine.saved[-1][1] == {"step": 8} and engine.saved[-1][2] is False  # the client state, as given


def test_the_end_is_not_saved_twice_when_it_falls_on_a_period(tmp_path):
    assert _run(CheckpointPolicy(tmp_path, 0, every_steps=4, keep_last=10), _Engine(), 8) == [4, 8]


def test_no_periodic_checkpoint_when_every_steps_is_zero_or_none(tmp_path):
    for every in (0, None):
        policy = CheckpointPolicy(tmp_path / str(every), 0, every_steps=every, keep_last=2)
        assert not any(policy.due(step) for step in range(1, 100))
        assert _run(policy, _Engine(), 5) == [5]


def test_only_the_newest_keep_last_checkpoints_stay(tmp_path):
    policy = CheckpointPolicy(tmp_path, 0, every_steps=1, keep_last=2)
    _run(policy, _Engine(), 5)
    assert ckpt.complete_tags(tmp_path) == [ckpt.tag_for(4), ckpt.tag_for(5)]
    assert ckpt.latest_complete(tmp_path) == ckpt.tag_for(5)
    assert policy.last_saved_step == 5 and not policy.due_at_end(5) and policy.due_at_end(6)


def test_the_writer_gets_run_dir_rank_and_keep_last(tmp_path):
    calls = []
    policy = CheckpointPolicy(tmp_path, 3, every_steps=2, keep_last=7,
                              save=lambda *args: calls.append(args) or "tag")
    assert policy.save("engine", 12, {"a": 1}) == "tag"
    assert calls == [("engine", tmp_path, 12, {"a": 1}, 3, 7)]
