"""launchers/slurm.sbatch for real, on the harness's two SLURM nodes: the demo-sized run to
completion with 2 tasks on one node and on two nodes, the SLURM variable mapping, preemption
(scancel --batch --signal=USR1 -> checkpoint -> exit 75 -> requeue -> resume) and a task
count that does not divide the global batch."""
from __future__ import annotations

import math
import subprocess
import time
from pathlib import Path

import pytest

from . import harness
from ._common import CONFIG, LAUNCHERS, STEPS, env, probed, rank_records, summary

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.distributed]
SBATCH = str(LAUNCHERS / "slurm.sbatch")
#: the #SBATCH lines ask for 8 GPUs and 10 CPUs a task; the fake nodes have 2 CPUs and no GPU
FIT = ["--gpus-per-node=0", "--cpus-per-task=1"]
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def submit(cwd: Path, *options: str, args=CONFIG, probe: Path | None = None) -> int:
    e = env(probe)
    e["SLURM_CONF"] = harness.env()["SLURM_CONF"]
    if probe is not None:
        e["SFRIK_ENV_PROBE"] = str(probe / "records")
    proc = subprocess.run(["sbatch", "--parsable", f"--chdir={cwd}", *FIT, *options, SBATCH, *args],
                          cwd=cwd, env=e, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip().split(";")[0])


def job(job_id: int) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], env=harness.env(), capture_output=True,
                         text=True, timeout=30).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


def wait_done(job_id: int, timeout: float = 240, restarts: int = 0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job(job_id)
        if info.get("JobState") in DONE and int(info.get("Restarts", 0)) >= restarts:
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", str(job_id)], env=harness.env(), timeout=30)
    raise AssertionError(f"job {job_id} not done within {timeout} s: {job(job_id)}")


def log_of(cwd: Path, job_id: int) -> str:
    return (cwd / f"slurm-sfrik-{job_id}.out").read_text()  # where the #SBATCH --output line puts it


def check_mapping(run: Path, probe: Path, nodes: list[str], master_addr_exported: bool = True) -> None:
    """Each rank's place as the trainer mapped it (its health record) against what srun gave its
    process (the environment probe, matched by PID)."""
    records = rank_records(run)
    envs = {r["pid"]: r["env"] for r in probed(probe)}
    assert sorted(records) == list(range(len(nodes)))
    for rank, rec in records.items():
        e = envs[rec["pid"]]
        assert (e["SLURM_PROCID"], e["SLURM_NTASKS"], e["SLURM_LOCALID"]) == \
            (str(rank), str(len(nodes)), str(rec["local_rank"]))
        assert rec["node"] == e["SLURMD_NODENAME"] == nodes[rank]
        assert rec["node_rank"] == int(e["SLURM_NODEID"])
        assert e["SLURM_JOB_NODELIST"] == ("node1" if set(nodes) == {"node1"} else "node[1-2]")
        assert "RANK" not in e  # ranks are mapped from SLURM's variables
        assert ("MASTER_ADDR" in e) == master_addr_exported  # slurm.sbatch exports it; else the first node


def test_two_tasks_on_one_node_run_to_completion(cluster, reference, tmp_path):
    start = time.time()
    job_id = submit(tmp_path, "--nodes=1", "--ntasks-per-node=2", probe=tmp_path / "probe")
    info = wait_done(job_id)
    log = log_of(tmp_path, job_id)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    run = tmp_path / "runs" / f"sfrik-{job_id}"  # the default run directory, under the submission directory
    assert summary(run)["loss_history"] == reference
    assert f"job {job_id} restart 0: 1 nodes, 2 tasks, rendezvous node1:" in log
    check_mapping(run, tmp_path / "probe", ["node1", "node1"])
    print(f"sbatch 1 node x 2 tasks, {STEPS} steps: {time.time() - start:.1f} s")


def test_two_nodes_preempted_by_usr1_requeue_and_resume_the_same_trajectory(cluster, reference, tmp_path):
    start = time.time()
    job_id = submit(tmp_path, "--nodes=2", "--ntasks-per-node=1", probe=tmp_path / "probe")
    run = tmp_path / "runs" / f"sfrik-{job_id}"
    deadline = time.time() + 120
    while time.time() < deadline and not list((run / "tensorboard").glob("events*")):
        time.sleep(0.2)
    # the batch shell alone gets the signal: it must forward it to the tasks through srun
    proc = subprocess.run(["scancel", "--batch", "--signal=USR1", str(job_id)], env=harness.env(),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    info = wait_done(job_id, restarts=1)
    log = log_of(tmp_path, job_id)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-3000:]
    assert "batch script got SIGUSR1" in log and f"requeueing job {job_id}" in log
    assert f"job {job_id} restart 0: 2 nodes, 2 tasks" in log and f"job {job_id} restart 1: 2 nodes, 2 tasks" in log
    preempted_at = int(log.split("preempted: checkpoint at step ")[1].split(";")[0].split()[0].strip("[]/"))
    assert 0 < preempted_at < STEPS
    s = summary(run)
    assert s["final_step"] == STEPS
    assert s["loss_history"] == reference  # preempted, requeued, resumed: the uninterrupted losses, bit for bit
    check_mapping(run, tmp_path / "probe", ["node1", "node2"])
    print(f"sbatch 2 nodes, preempted at step {preempted_at}, requeued, resumed: {time.time() - start:.1f} s")


def test_a_task_count_not_dividing_the_global_batch_fails_before_training(cluster, tmp_path):
    job_id = submit(tmp_path, "--nodes=2", "--ntasks=3", "--ntasks-per-node=2")
    info = wait_done(job_id, timeout=120)
    log = log_of(tmp_path, job_id)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "2:0", "0"), log[-3000:]
    errors = [line for line in log.splitlines() if "error" in line.lower()]
    assert errors == ["sfrik-scale pretrain: error: train.global_batch_size: 32 is not divisible by the world "
                      "size 3 (train.micro_batch_size is null: one micro-batch of global / world_size images "
                      "per rank)"], log
    assert not (tmp_path / "runs").exists()  # no task started


def test_a_job_cancelled_outright_keeps_its_checkpoint_and_a_resubmission_resumes(cluster, reference, tmp_path):
    start = time.time()
    run = tmp_path / "run"
    args = [*CONFIG, f"train.run_dir={run}", "train.checkpoint_every_steps=10"]
    job_id = submit(tmp_path, "--nodes=2", "--ntasks-per-node=1", args=args)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "checkpoints" / "latest_complete").exists():
        time.sleep(0.1)
    subprocess.run(["scancel", str(job_id)], env=harness.env(), timeout=30, check=True)  # SIGTERM, then SIGKILL
    info = wait_done(job_id)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", info  # not requeued by the script
    assert "not requeueing" in log_of(tmp_path, job_id)
    from sfrik_scale import checkpoint as ckpt

    tag = ckpt.latest_complete(run)
    assert tag is not None and 10 <= ckpt.step_of(tag) < STEPS
    again = submit(tmp_path, "--nodes=2", "--ntasks-per-node=1", args=args)  # the same command, resubmitted
    info = wait_done(again)
    log = log_of(tmp_path, again)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert "resumed    from step" in log
    s = summary(run)
    assert s["final_step"] == STEPS and s["loss_history"] == reference
    print(f"sbatch cancelled at checkpoint {tag}, resubmitted, resumed: {time.time() - start:.1f} s")


def test_deepspeed_launcher_slurm_route_inside_an_allocation(cluster, reference, tmp_path):
    """`deepspeed --launcher slurm` run inside an sbatch allocation: DeepSpeed's runner starts the
    ranks with `srun -n 2` and sets no RANK/WORLD_SIZE/MASTER_*; the trainer maps SLURM's variables
    (MASTER_ADDR = the allocation's first node). It needs the script's path (the console script):
    the slurm runner ignores --module. The uninterrupted trajectory, bit for bit."""
    start = time.time()
    (tmp_path / "hosts").write_text("node1 slots=1\nnode2 slots=1\n")
    run = tmp_path / "run"
    script = tmp_path / "ds-slurm.sh"
    script.write_text("#!/usr/bin/env bash\n#SBATCH --output=slurm-sfrik-%j.out\nset -euo pipefail\n"
                      'exec deepspeed --launcher slurm --hostfile hosts "$(command -v sfrik-scale)" pretrain "$@"\n')
    e = env(tmp_path / "probe")
    e.update(SLURM_CONF=harness.env()["SLURM_CONF"], SFRIK_ENV_PROBE=str(tmp_path / "probe" / "records"))
    proc = subprocess.run(["sbatch", "--parsable", f"--chdir={tmp_path}", "--nodes=2", "--ntasks-per-node=1",
                           "--cpus-per-task=1", str(script), *CONFIG, f"train.run_dir={run}"],
                          cwd=tmp_path, env=e, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job_id = int(proc.stdout.strip().split(";")[0])
    info = wait_done(job_id)
    log = log_of(tmp_path, job_id)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert "cmd = srun -n 2" in log and "processes  2 (slurm)" in log
    assert "FutureWarning" not in log and "Traceback" not in log
    assert summary(run)["loss_history"] == reference
    check_mapping(run, tmp_path / "probe", ["node1", "node2"], master_addr_exported=False)
    print(f"deepspeed --launcher slurm, 2 nodes, {STEPS} steps: {time.time() - start:.1f} s")


def seconds_per_step(run: Path) -> float:
    """The median wall time of one optimiser step in a finished run, from its epoch records
    (``steps`` counts from the start of the run, ``time_s`` the epoch); the first epoch
    (warm-up) left out."""
    epochs = summary(run)["epochs"]
    per_step = sorted(e["time_s"] / (e["steps"] - before["steps"]) for before, e in zip(epochs, epochs[1:]))
    return per_step[len(per_step) // 2]


def test_the_time_limit_signal_route_checkpoints_requeues_and_finishes(cluster, tmp_path):
    """`--time=2 --signal=USR1@60`: SLURM itself sends SIGUSR1 to the tasks (not the batch shell)
    about a minute before the time limit (its timer fired 4-11 s early in our trials); every
    rank checkpoints at the next step boundary and exits 75, the script requeues, and the
    requeued job resumes (signalled again if it is still running then) until it finishes.

    The run is sized in seconds, not steps: a first, short job of the same shape measures the
    step time (80-90 ms here), and
    the long one gets about 75 s of training at that pace, so that the first signal (at most
    ~44 s into training: 60 s less a start-up of ~16 s) lands mid-run on a fast machine too,
    and a slow one needs no more requeues. (A fixed 900 steps took 70-100 s here but finished
    before the signal on a faster CI machine.) A signal that comes after training ended must
    not kill a task either: Python restores the default action (terminate) while it shuts
    down."""
    start = time.time()
    probe_run = submit(tmp_path, "--nodes=2", "--ntasks-per-node=1", args=[*CONFIG, "train.run_dir=pace"])
    assert wait_done(probe_run)["JobState"] == "COMPLETED", log_of(tmp_path, probe_run)[-3000:]
    step_s = seconds_per_step(tmp_path / "pace")
    steps = min(20000, max(400, 4 * math.ceil(75.0 / step_s / 4)))  # whole epochs of 4 steps
    long_run = [*CONFIG, f"train.max_steps={steps}", f"train.epochs={steps // 4}"]
    job_id = submit(tmp_path, "--nodes=2", "--ntasks-per-node=1", "--time=2", "--signal=USR1@60", args=long_run)
    info = wait_done(job_id, timeout=480)  # COMPLETED only at the very end: a requeued job is PENDING meanwhile
    log = log_of(tmp_path, job_id)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert int(info["Restarts"]) >= 1, f"finished before SLURM's signal: {log[-2000:]}"
    assert "batch script got SIGUSR1" not in log  # the tasks got it from SLURM, not through the batch shell
    assert f"requeueing job {job_id}" in log and "preempted: checkpoint at step" in log, log[-3000:]
    s = summary(tmp_path / "runs" / f"sfrik-{job_id}")
    assert s["final_step"] == steps and len(s["loss_history"]) == steps
    assert all(math.isfinite(v) for v in s["loss_history"])
    at = [line.split("preempted: checkpoint at step ")[1].split(";")[0] for line in log.splitlines()
          if "preempted: checkpoint at step" in line]
    print(f"sbatch --time=2 --signal=USR1@60, {steps} steps ({step_s * 1e3:.0f} ms a step in the pace job), preempted at step(s) {', '.join(at)}, "
          f"{info['Restarts']} restart(s): {time.time() - start:.1f} s")
