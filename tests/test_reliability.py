"""Crashes, rank failures, divergence and storage faults: nothing lost, nothing hangs.

Real processes and real signals on CPU. Counts that the README reports are module constants.
"""
from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sfrik_scale import checkpoint as ckpt
from sfrik_scale.spawn import free_port

from .test_train import TINY, _env, check_ok, pretrain, summary

KILL_TRIALS = 10         # SIGKILLs of a running 2-process run, checkpoint every step
KILL_AIMED = 5           # of which aimed at a checkpoint write (the others at a random moment)
KILL_STEPS = 80          # steps of the run being killed and resumed (enough that every kill finds it running)


def start_ranks(run_dir: Path, world: int, *overrides: str, port: int) -> list[subprocess.Popen]:
    """Start ranks the way srun/torchrun would: one process each, rank in the environment."""
    procs = []
    for rank in range(world):
        env = _env()
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-m", "sfrik_scale.pretrain", *TINY, f"train.run_dir={run_dir}",
                                       *overrides], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))
    return procs


def wait_for_training(run_dir: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not list((run_dir / "tensorboard").glob("events*")):
        time.sleep(0.3)


# ------------------------------------------------------------------ 1. crash safety
def check_checkpoints_consistent(run_dir: Path, world: int) -> None:
    """Every tag marked COMPLETE holds every rank's files; the pointer names a complete tag."""
    root = run_dir / "checkpoints"
    for tag in ckpt.complete_tags(run_dir):
        files = {p.name for p in (root / tag).iterdir()}
        assert "mp_rank_00_model_states.pt" in files, (tag, files)
        assert {f"rng_rank{r}.pt" for r in range(world)} <= files, (tag, files)
    pointer = root / ckpt.LATEST_POINTER
    if pointer.exists():
        assert (root / pointer.read_text().strip() / ckpt.COMPLETE_MARKER).is_file()


@pytest.mark.slow
@pytest.mark.distributed
def test_sigkill_at_random_moments_and_inside_checkpoint_writes_then_resume_loses_nothing(tmp_path):
    rng = random.Random(1234)
    reference, run = tmp_path / "reference", tmp_path / "killed"
    overrides = [f"train.max_steps={KILL_STEPS}", f"train.epochs={KILL_STEPS // 4}",  # 128 images, 32 a step
                 "train.checkpoint_every_steps=1", "train.keep_last=2", "train.peer_timeout_s=30"]
    check_ok(pretrain(reference, *overrides, procs=2))
    resumed_from, mid_write, aimed_mid_write, kills = [], 0, 0, 0
    for trial in range(KILL_TRIALS):
        aimed = trial % 2 == 1 and trial // 2 < KILL_AIMED
        before = ckpt.latest_complete(run)
        procs = start_ranks(run, 2, *overrides, port=free_port())
        deadline = time.time() + 120  # resumed and training: a checkpoint newer than the last one
        while time.time() < deadline and ckpt.latest_complete(run) == before and procs[0].poll() is None:
            time.sleep(0.05)
        if aimed:  # as soon as a checkpoint folder newer than the newest complete one has no marker yet
            latest = ckpt.latest_complete(run)
            newest = ckpt.step_of(latest) if latest else -1
            while time.time() < deadline and procs[0].poll() is None and not any(
                    p.is_dir() and p.name.startswith("step") and ckpt.step_of(p.name) > newest
                    and not (p / ckpt.COMPLETE_MARKER).exists() for p in (run / "checkpoints").iterdir()):
                time.sleep(0.002)
        else:
            time.sleep(rng.uniform(0.0, 1.0))  # anywhere: mid-step, mid-checkpoint, mid-prune
        kills += all(p.poll() is None for p in procs)  # both ranks still running: a real kill
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for p in procs:
            p.communicate(timeout=60)
        check_checkpoints_consistent(run, 2)
        root = run / "checkpoints"
        torn = [p.name for p in root.iterdir() if p.is_dir() and not (p / ckpt.COMPLETE_MARKER).exists()] \
            if root.is_dir() else []
        mid_write += bool(torn)
        aimed_mid_write += bool(torn) and aimed
        after = ckpt.latest_complete(run)
        if before is not None:  # progress is never lost: the newest complete checkpoint only moves forward
            assert after is not None and ckpt.step_of(after) >= ckpt.step_of(before)
        resumed_from.append(after)
    print(f"{kills} kills, {mid_write} inside a checkpoint write ({aimed_mid_write} of the {KILL_AIMED} aimed), "
          f"resume points {resumed_from}")
    assert kills == KILL_TRIALS  # every kill hit a running run (none came after the last step)
    assert aimed_mid_write >= 1  # the aimed kills do land inside a write (a torn, unmarked tag left)
    assert len({r for r in resumed_from if r}) >= 3  # the run made progress between kills
    check_ok(pretrain(run, *overrides, procs=2))
    a, b = summary(reference)["loss_history"], summary(run)["loss_history"]
    assert len(a) == len(b) == KILL_STEPS
    assert b == a  # bit-identical to the uninterrupted run (fp32, 2 CPU ranks)


def test_a_checkpoint_without_marker_is_never_resumed_from(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False)):
        folder = tmp_path / "checkpoints" / ckpt.tag_for(step)
        folder.mkdir(parents=True)
        if complete:
            (folder / ckpt.COMPLETE_MARKER).write_text("{}")
    assert ckpt.latest_complete(tmp_path) == "step000000004"
    ckpt.prune(tmp_path, keep_last=1)  # the torn step 6 is newer than the newest complete: kept for inspection
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step000000004", "step000000006"]


# ------------------------------------------------------------------ 2. rank failure
@pytest.mark.slow
@pytest.mark.distributed
def test_sigkill_of_one_rank_the_other_exits_in_bounded_time_naming_it(tmp_path):
    run = tmp_path / "kill1"
    procs = start_ranks(run, 2, "train.epochs=100", "train.peer_timeout_s=20", port=free_port())
    wait_for_training(run)
    time.sleep(2)
    os.killpg(procs[1].pid, signal.SIGKILL)
    killed_at = time.time()
    out, _ = procs[0].communicate(timeout=120)
    elapsed = time.time() - killed_at
    procs[1].communicate(timeout=30)
    assert procs[0].returncode not in (0, None)
    assert elapsed < 20 + 15, elapsed  # the peer timeout plus a few heartbeats
    assert "rank 1 failed" in out, out[-3000:]


def _corrupt_folder(root: Path, n: int = 64) -> None:
    from PIL import Image

    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(n // 2):
            Image.new("RGB", (40, 40), (i * 4 % 255, c * 120, 60)).save(root / f"class{c}" / f"{i:03d}.jpg")
    (root / "class1" / "007.jpg").write_bytes(b"\xff\xd8\xff this is not a jpeg")


@pytest.mark.slow
def test_skipped_corrupt_images_are_named_on_the_console(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    _corrupt_folder(data)
    proc = pretrain(run, "data.dataset=image_folder", f"data.path={data}", "data.loader=torchvision",
                    "train.epochs=1")
    check_ok(proc)
    text = " ".join(proc.stderr.split())  # rich wraps long lines
    assert "warning: 1 unreadable image(s) skipped and replaced by others (1 so far): 007.jpg" in text
    assert str(run / "summary.json") in "".join(proc.stderr.split()) and text.count("unreadable image(s)") == 1
    assert list(summary(run)["bad_files"]) == [str(data / "class1" / "007.jpg")]


@pytest.mark.slow
@pytest.mark.distributed
def test_exception_on_one_rank_stops_the_others_naming_it(tmp_path):
    data, run = tmp_path / "data", tmp_path / "exc"
    _corrupt_folder(data)
    procs = start_ranks(run, 2, "data.dataset=image_folder", f"data.path={data}", "data.skip_bad_files=false",
                        "train.epochs=100", "train.peer_timeout_s=60", port=free_port())
    outs = [p.communicate(timeout=180)[0] for p in procs]
    # the failing rank ends with one line through the shared error handler (sfrik_scale.errors)
    culprit = next(r for r, out in enumerate(outs) if "sfrik-scale pretrain: BadImageError:" in out)
    assert "Traceback" not in outs[culprit]
    other = 1 - culprit
    assert all(p.returncode not in (0, None) for p in procs)
    # named either by the watchdog thread or by the failed collective's error, whichever comes first
    assert f"rank {culprit} failed: raised: BadImageError" in outs[other] and "007.jpg" in outs[other]


# ------------------------------------------------------------------ 3. divergence
@pytest.mark.slow
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_divergence_is_detected_and_diagnosed(tmp_path, policy):
    # lr 1e30: step 1 leaves huge but finite weights, from step 2 on the embeddings overflow
    run = tmp_path / policy
    proc = pretrain(run, "train.max_steps=4", "optim.name=adamw", "optim.base_lr=1e30", "optim.warmup_epochs=0",
                    "train.checkpoint_every_steps=1", f"train.on_nonfinite={policy}")
    if policy == "stop":
        assert proc.returncode == 1 and "NonFiniteLossError" in proc.stderr
        assert ckpt.latest_complete(run) == "step000000001"  # the last state, not overwritten
        info = json.loads((run / "nonfinite.json").read_text())
        assert info["step"] == 2 and info["per_rank"][0]["z1"]["nonfinite_values"] > 0
    else:  # skipped steps change nothing; each is counted and described
        check_ok(proc)
        events = [json.loads(e) for e in (run / "nonfinite.jsonl").read_text().splitlines()]
        assert [e["step"] for e in events] == [2, 3, 4] and all(e["policy"] == "skip" for e in events)
        assert summary(run)["skipped_steps"] == 3


def test_nonfinite_parameters_are_never_checkpointed(tmp_path):
    from types import SimpleNamespace

    from sfrik_scale.topology import Topology
    from sfrik_scale.train import NonFiniteStateError, Trainer, TrainState

    trainer = Trainer.__new__(Trainer)
    module = torch.nn.Linear(3, 3)
    with torch.no_grad():
        module.weight[1, 2] = float("inf")
    trainer.engine, trainer.run_dir = SimpleNamespace(module=module), tmp_path
    trainer.topo, trainer.state = Topology(0, 1, 0, torch.device("cpu"), "single"), TrainState(step=7)
    with pytest.raises(NonFiniteStateError, match="step 7.*intact"):
        trainer.checkpoint()
    assert not (tmp_path / "checkpoints").exists()
    assert json.loads((tmp_path / "nonfinite.json").read_text())["step"] == 7


# ------------------------------------------------------------------ 4. storage faults
@pytest.mark.slow
def test_unwritable_checkpoint_folder_is_a_clear_error_and_keeps_the_previous(tmp_path):
    run = tmp_path / "ro"
    check_ok(pretrain(run, "train.max_steps=2"))
    (run / "checkpoints" / "step000000004").write_text("a file where the next checkpoint folder should go")
    proc = pretrain(run, "train.max_steps=4")
    assert proc.returncode == 1
    assert "CheckpointWriteError" in proc.stderr and "step000000002 is intact" in proc.stderr
    assert ckpt.latest_complete(run) == "step000000002"
    (run / "checkpoints" / "step000000004").unlink()
    check_ok(pretrain(run, "train.max_steps=4"))  # and the run carries on from step 2
    assert summary(run)["final_step"] == 4


class _FakeEngine:
    """Stands in for a DeepSpeed engine whose disk fills up while writing."""

    def __init__(self, fail: bool):
        self.fail = fail
        self.module = torch.nn.Linear(4, 4)

    def save_checkpoint(self, root, tag, client_state, save_latest):
        folder = Path(root) / tag
        (folder / "mp_rank_00_model_states.pt").write_bytes(b"partial")
        if self.fail:
            raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_writing_keeps_the_previous_checkpoint(tmp_path):
    ckpt.save_checkpoint(_FakeEngine(False), tmp_path, 5, {}, rank=0, keep_last=2)
    with pytest.raises(ckpt.CheckpointWriteError, match="No space left on device.*step000000005 is intact"):
        ckpt.save_checkpoint(_FakeEngine(True), tmp_path, 6, {}, rank=0, keep_last=2)
    assert ckpt.latest_complete(tmp_path) == "step000000005"
    assert not (tmp_path / "checkpoints" / "step000000006").exists()  # partial files removed


def test_too_little_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    ckpt.save_checkpoint(_FakeEngine(False), tmp_path, 1, {}, rank=0, keep_last=2)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: os.statvfs_result((0,) * 10) and
                        type("U", (), {"free": 10})())
    with pytest.raises(ckpt.CheckpointWriteError, match="GiB free"):
        ckpt.save_checkpoint(_FakeEngine(False), tmp_path, 2, {}, rank=0, keep_last=2)
    assert ckpt.latest_complete(tmp_path) == "step000000001"


def _nan_gradient_worker(rank: int, world: int, run_dir: str, stage: int) -> dict:
    import deepspeed

    from sfrik_scale.config import load_config
    from sfrik_scale.topology import Topology, _skip_cpu_shm_op
    from sfrik_scale.train import Trainer

    _skip_cpu_shm_op()
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = load_config(None, [*TINY, f"train.run_dir={run_dir}", "train.max_steps=4", f"deepspeed.zero_stage={stage}",
                             "monitor.tensorboard=false"]).validate(world)
    trainer = Trainer(cfg, Topology(rank, world, rank, torch.device("cpu"), "torch"))
    trainer.health = __import__("types").SimpleNamespace(set_step=lambda s: None)
    trainer.build()
    calls = {"n": 0}

    def poison(grad):  # rank 1's gradient turns NaN in its second backward pass only
        calls["n"] += 1
        return grad * float("nan") if rank == 1 and calls["n"] == 2 else grad

    next(trainer.engine.module.projector.parameters()).register_hook(poison)
    trainer.train()
    trainer.close()
    return {"skipped": trainer.state.skipped_steps, "history": trainer.state.history,
            "finite": trainer.params_finite()}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_a_nonfinite_gradient_on_one_rank_is_skipped_on_all(tmp_path, stage):
    from sfrik_scale.spawn import run_ranks

    results = run_ranks(_nan_gradient_worker, 2, str(tmp_path), stage, timeout=300)
    assert [r["skipped"] for r in results] == [1, 1]
    assert all(r["finite"] for r in results) and len(results[0]["history"]) == 3
    events = [json.loads(e) for e in (tmp_path / "nonfinite.jsonl").read_text().splitlines()]
    assert len(events) == 1 and events[0]["step"] == 2 and events[0]["per_rank"][0]["what"] == "gradient"


def test_a_killed_peer_is_named_with_the_step_it_last_reached(tmp_path):
    """Heartbeats are written every few seconds; the step is written as it changes (at most once a
    second), so the message no longer names a step several checkpoints old."""
    from sfrik_scale.health import STEP_RECORD_INTERVAL_S, RankHealth

    me = RankHealth(tmp_path, rank=0, world_size=2, peer_timeout_s=1000, interval_s=1000)
    peer = RankHealth(tmp_path, rank=1, world_size=2, peer_timeout_s=1000, interval_s=1000)
    me.dir = peer.dir  # one session (without a process group each picked its own)
    try:
        for step in (10, 20, 30):
            time.sleep(STEP_RECORD_INTERVAL_S + 0.05)
            peer.set_step(step)
        record = json.loads((peer.dir / "rank1.json").read_text())
        assert record["step"] == 30
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()  # reaped: its pid names no process now, as after a kill -9
        (peer.dir / "rank1.json").write_text(json.dumps({**record, "pid": gone.pid}))
        (rank, why), = me.failed_peers()
        assert rank == 1 and "killed?" in why and "last heard at step 30" in why, why
    finally:
        peer.close()
        me.close()


def test_a_failed_peer_is_named_by_its_hostfile_name_and_host(tmp_path, monkeypatch):
    """Under multi_node.sh (SFRIK_HOSTFILE_HOSTS, CROSS_RANK) a rank's node is its hostfile name;
    a failed peer's message names that, its host name when different, and its node rank."""
    import socket

    from sfrik_scale.health import RankHealth
    from sfrik_scale.topology import node_identity

    hosts = {"SFRIK_HOSTFILE_HOSTS": "node1 node2"}
    assert node_identity({**hosts, "CROSS_RANK": "1"}) == ("node2", 1)
    assert node_identity({**hosts, "CROSS_RANK": "2"}) == (socket.gethostname(), 2)  # not in the list
    assert node_identity({**hosts, "SLURMD_NODENAME": "n7", "SLURM_NODEID": "1"}) == ("n7", 1)  # SLURM's
    me = RankHealth(tmp_path, rank=0, world_size=2, peer_timeout_s=1000, interval_s=1000)
    monkeypatch.setenv("SFRIK_HOSTFILE_HOSTS", "node1 node2")
    monkeypatch.setenv("CROSS_RANK", "1")
    peer = RankHealth(tmp_path, rank=1, world_size=2, peer_timeout_s=1000, interval_s=1000)
    me.dir = peer.dir
    try:
        record = json.loads((peer.dir / "rank1.json").read_text())
        assert (record["node"], record["node_rank"]) == ("node2", 1)
        (peer.dir / "rank1.json").write_text(json.dumps({**record, "time": time.time() - 2000}))
        (rank, why), = me.failed_peers()
        assert rank == 1 and f"pid {record['pid']} on node2 (host {socket.gethostname()}, node rank 1)" in why, why
    finally:
        peer.close()
        me.close()


@pytest.mark.slow
@pytest.mark.distributed
def test_an_unwritable_run_dir_is_one_line_on_every_rank(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    run = blocker / "run"
    procs = start_ranks(run, 2, "train.max_steps=2", port=free_port())
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for p, out in zip(procs, outs):
        lines = [line for line in out.splitlines() if line.strip()]
        assert p.returncode == 2, out[-2000:]
        assert lines == [f"sfrik-scale pretrain: error: train.run_dir: cannot write to {run}: Not a directory "
                         f"({blocker} is a file)"], out[-2000:]


def test_write_problem_names_the_file_in_the_way_and_leaves_nothing_behind(tmp_path):
    from sfrik_scale.storage import write_problem

    good = tmp_path / "new" / "run"
    assert write_problem(good) is None
    assert good.is_dir() and list(good.iterdir()) == []
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert write_problem(blocker / "run") == f"cannot write to {blocker / 'run'}: Not a directory ({blocker} is a file)"


@pytest.mark.parametrize("problems, expected", [
    (["disk full", "disk full"], "train.run_dir: disk full"),
    ([None, "disk full"], "train.run_dir: rank 1: disk full"),
    (["read-only", "read-only", "disk full"], "train.run_dir: ranks 0, 1: read-only; rank 2: disk full"),
])
def test_run_dir_problems_of_several_ranks_are_one_line(monkeypatch, tmp_path, problems, expected):
    from sfrik_scale import comm
    from sfrik_scale.errors import StorageError
    from sfrik_scale.train import Trainer

    monkeypatch.setattr(comm, "all_gather_objects", lambda obj, group=None: problems)
    trainer = Trainer.__new__(Trainer)  # only run_dir is needed
    trainer.run_dir = tmp_path
    with pytest.raises(StorageError) as err:
        trainer.check_run_dir()
    assert str(err.value) == expected


def _damage(path: Path, how: str) -> None:
    if how == "truncate":
        os.truncate(path, path.stat().st_size // 2)
    elif how == "flip":  # same size, one byte changed
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        path.unlink()


def _run_ranks(run: Path, world: int, *overrides: str) -> list[tuple[int, str]]:
    if world == 1:
        proc = subprocess.run([sys.executable, "-m", "sfrik_scale.pretrain", *TINY, f"train.run_dir={run}",
                               *overrides], env=_env(), capture_output=True, text=True, timeout=300)
        return [(proc.returncode, proc.stdout + proc.stderr)]
    procs = start_ranks(run, world, *overrides, port=free_port())
    return [(p.wait(timeout=300), p.communicate()[0]) for p in procs]


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2], ids=["1rank", "2ranks"])
def test_damaged_checkpoints_are_set_aside_and_the_newest_good_one_is_resumed(tmp_path, world):
    """Truncated, altered and missing files in the three newest checkpoints: with on_damaged_checkpoint=stop,
    one line and exit 2 on every rank, nothing changed; by default each is named in a warning, kept as
    damaged-stepN, and the run resumes from the one that verifies (step 2) and finishes."""
    run = tmp_path / "run"
    common = ("train.checkpoint_every_steps=2", "train.keep_last=4")
    for code, out in _run_ranks(run, world, *common, "train.max_steps=8"):
        assert code == 0, out[-3000:]
    root = ckpt.checkpoint_root(run)
    assert ckpt.complete_tags(run) == ["step000000002", "step000000004", "step000000006", "step000000008"]
    victims = {"step000000008": "truncate", "step000000006": "flip", "step000000004": "missing"}
    for tag, how in victims.items():  # with 2 ranks, two of them in the last rank's own file
        name = "mp_rank_00_model_states.pt" if how == "truncate" or world == 1 else f"rng_rank{world - 1}.pt"
        _damage(root / tag / name, how)

    for code, out in _run_ranks(run, world, *common, "train.max_steps=10", "train.on_damaged_checkpoint=stop"):
        lines = [line for line in out.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1, out[-3000:]
        assert lines[0].startswith(f"sfrik-scale pretrain: error: checkpoint {root / 'step000000008'} is damaged")
        assert "train.on_damaged_checkpoint=stop" in lines[0]
    assert ckpt.complete_tags(run)[-1] == "step000000008" and not list(root.glob("damaged-*"))

    results = _run_ranks(run, world, *common, "train.max_steps=10")
    for code, out in results:
        assert code == 0, out[-3000:]
        assert "Traceback" not in out
    console = " ".join(results[0][1].split())
    assert "bytes, " in console and "were written" in console  # truncated
    assert "differs from its checksum" in console  # flipped byte
    assert "is missing" in console
    for tag in victims:
        assert f"checkpoint {tag} is damaged" in console
        assert (root / f"damaged-{tag}").is_dir()  # kept for inspection, never pruned
    assert "resumed from step000000002 (step 2)" in console
    assert ckpt.latest_complete(run) == "step000000010"


def test_a_checkpoint_deepspeed_cannot_load_is_fallen_back_from_even_without_checksums(tmp_path):
    """Checkpoints written before checksums were recorded (a marker with the step only) are not
    verified, but a load failure is caught, reported and fallen back from the same way."""
    from sfrik_scale.checkpoint import DamagedCheckpointError, load_checkpoint

    root = ckpt.checkpoint_root(tmp_path)
    for step in (2, 4):
        (root / ckpt.tag_for(step)).mkdir(parents=True)
        (root / ckpt.tag_for(step) / ckpt.COMPLETE_MARKER).write_text(json.dumps({"step": step}))

    class Engine:
        loaded: list = []

        def load_checkpoint(self, path, tag):
            self.loaded.append(tag)
            if tag == "step000000004":
                raise RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory")
            return path, {"train_state": {"step": 2}}

    warnings = []
    client = load_checkpoint(Engine(), tmp_path, 0, warn=warnings.append)
    assert client["tag"] == "step000000002" and Engine.loaded == ["step000000004", "step000000002"]
    assert warnings == [f"checkpoint step000000004 is damaged (DeepSpeed could not load it (RuntimeError: "
                        f"PytorchStreamReader failed reading zip archive: failed finding central directory)); "
                        f"kept as {root / 'damaged-step000000004'} for inspection, trying step000000002"]
    assert ckpt.complete_tags(tmp_path) == ["step000000002"]
    assert (root / ckpt.LATEST_POINTER).read_text().strip() == "step000000002"
    Engine.loaded.clear()
    (root / "step000000002" / ckpt.COMPLETE_MARKER).write_text("{not json")
    with pytest.raises(DamagedCheckpointError, match="no checkpoint in .* can be resumed from: step000000002"):
        load_checkpoint(Engine(), tmp_path, 0)


def test_export_and_evaluation_refuse_a_damaged_checkpoint_in_one_line(tmp_path):
    from sfrik_scale.checkpoint import DamagedCheckpointError, consolidated_state_dict, file_manifest

    folder = ckpt.checkpoint_root(tmp_path) / ckpt.tag_for(3)
    folder.mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"0123456789")
    marker = {"step": 3, "files": file_manifest(folder)}
    (folder / ckpt.COMPLETE_MARKER).write_text(json.dumps(marker))
    _damage(folder / "mp_rank_00_model_states.pt", "flip")
    with pytest.raises(DamagedCheckpointError, match="mp_rank_00_model_states.pt differs from its checksum"):
        consolidated_state_dict(tmp_path)
