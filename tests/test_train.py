"""The pretraining trainer end to end on CPU, in real processes: the deepspeed launcher with
2 ranks under every ZeRO stage, resume, export, preemption signals and bad configurations."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sfrik_scale.spawn import free_port

TINY = ["model.projector=64-64-128", "data.synthetic_size=128", "data.image_size=32",
        "train.global_batch_size=32", "data.num_workers=0", "monitor.progress=false",
        "train.log_every_steps=1", "train.checkpoint_every_steps=0"]
BIN = Path(sys.executable).parent


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    return env


def pretrain(run_dir: Path, *overrides: str, procs: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real entry point: plain python for 1 process, the deepspeed launcher for more."""
    args = [*TINY, f"train.run_dir={run_dir}", *overrides]
    if procs == 1:
        cmd = [sys.executable, "-m", "sfrik_scale.pretrain", *args]
    else:
        cmd = [str(BIN / "deepspeed"), "--num_gpus", str(procs), "--master_port", str(free_port()),
               "--module", "sfrik_scale.pretrain", *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def check_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


# ------------------------------------------------------------------ launcher, every ZeRO stage
@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_launcher_two_cpu_ranks_bf16(tmp_path, stage):
    run = tmp_path / f"zero{stage}"
    proc = pretrain(run, "train.max_steps=3", f"deepspeed.zero_stage={stage}", "deepspeed.precision=bf16",
                    procs=2)
    check_ok(proc)
    # torch's deprecation of all_gather_into_tensor (DeepSpeed's comm and ZeRO's gathers call it)
    # is not the user's to act on: no rank prints it (it came back after every warning-filter change)
    assert "FutureWarning" not in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
    s = summary(run)
    assert s["final_step"] == 3 and len(s["loss_history"]) == 3
    assert all(torch.isfinite(torch.tensor(s["loss_history"])))
    assert (run / "checkpoints" / "step000000003" / "COMPLETE").is_file()
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == stage and ds["bf16"]["enabled"]
    assert ds["gradient_clipping"] == 0.0 and ds["train_batch_size"] == 32
    assert ds["train_micro_batch_size_per_gpu"] == 16  # 32 over 2 ranks
    assert (run / "config.yaml").is_file() and any((run / "tensorboard").iterdir())


@pytest.mark.slow
@pytest.mark.distributed
def test_export_from_zero3_loads_into_torchvision_resnet(tmp_path):
    import torchvision

    run = tmp_path / "r18"
    check_ok(pretrain(run, "model.backbone=resnet18", "train.max_steps=2", "deepspeed.zero_stage=3", procs=2))
    proc = subprocess.run([sys.executable, "-m", "sfrik_scale.cli", "export", str(run)], env=_env(),
                          capture_output=True, text=True, timeout=300)
    check_ok(proc)
    state = torch.load(run / "export" / "backbone.pt", weights_only=True)
    model = torchvision.models.get_model("resnet18", weights=None)
    result = model.load_state_dict(state, strict=False)
    assert set(result.missing_keys) == {"fc.weight", "fc.bias"} and not result.unexpected_keys
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    info = json.loads((run / "export" / "export.json").read_text())
    assert info["step"] == 2 and info["backbone"] == "resnet18"
    # the weights moved from their initialisation: the export is the trained model
    torch.manual_seed(0)
    init = torchvision.models.get_model("resnet18", weights=None).state_dict()
    assert not torch.equal(init["conv1.weight"], state["conv1.weight"])


# ------------------------------------------------------------------ resume
@pytest.mark.slow
def test_stop_and_resume_reproduces_the_uninterrupted_trajectory(tmp_path):
    # 4 steps per epoch: the resumed run restarts mid-epoch and crosses an epoch boundary
    straight, split = tmp_path / "straight", tmp_path / "split"
    check_ok(pretrain(straight, "train.max_steps=6"))
    check_ok(pretrain(split, "train.max_steps=3"))
    check_ok(pretrain(split, "train.max_steps=6"))
    a, b = summary(straight)["loss_history"], summary(split)["loss_history"]
    assert len(a) == len(b) == 6
    assert a == b  # bit-exact in fp32 on one CPU process
    assert b[-1] < b[0]
    # the epoch interrupted at step 3 is summarised whole: its totals travel in the checkpoint
    (e0, e1), (f0, f1) = summary(straight)["epochs"], summary(split)["epochs"]
    assert (f0["epoch"], f0["steps"], f0["partial"], f1["partial"]) == (0, 4, False, True)
    assert f0["loss"] == e0["loss"] == sum(a[:4]) / 4 and f1["loss"] == e1["loss"]
    assert f0["images_per_s"] > 0 and f0["time_s"] > 0


# ------------------------------------------------------------------ preemption
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_preemption_signal_checkpoints_and_exits_for_requeue(tmp_path, sig):
    run = tmp_path / "pre"
    cmd = [sys.executable, "-m", "sfrik_scale.pretrain", *TINY, f"train.run_dir={run}", "train.epochs=100"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((run / "tensorboard").glob("events*")):
        time.sleep(0.5)
    time.sleep(3)  # some steps in
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out[-3000:]
    tag = (run / "checkpoints" / "latest_complete").read_text().strip()
    step = int(tag[len("step"):])
    assert 0 < step < 100 * 4
    # requeue: the next start resumes from there
    check_ok(pretrain(run, f"train.max_steps={step + 1}", "train.epochs=100"))
    assert summary(run)["final_step"] == step + 1


def _catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (the SigCgt mask of /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(mask >> (sig - 1) & 1)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs /proc")
def test_a_preemption_signal_during_start_up_is_honoured_at_the_first_step(tmp_path):
    """SIGUSR1 as soon as the process can take it, while torch, DeepSpeed and the data load:
    not killed (SIGUSR1's default action), but a checkpoint at step 1 and exit 75 for requeue."""
    run = tmp_path / "early"
    cmd = [sys.executable, "-m", "sfrik_scale.pretrain", *TINY, f"train.run_dir={run}", "train.epochs=100"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 30
    while proc.poll() is None and not _catches(proc.pid, signal.SIGUSR1) and time.time() < deadline:
        time.sleep(0.005)
    maps = Path(f"/proc/{proc.pid}/maps").read_text()
    proc.send_signal(signal.SIGUSR1)
    assert "libtorch" not in maps, "the handler came only after torch loaded"  # i.e. well before training
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out[-3000:]
    assert (run / "checkpoints" / "latest_complete").read_text().strip() == "step000000001", out[-3000:]
    assert "preempted: checkpoint at step 1" in out


def test_stop_signals_are_ignored_once_training_is_over():
    """After training a stop signal must not kill the shutdown (Python gives the handlers it
    installed back the default action, terminate, while it finalises; an ignored one stays)."""
    code = ("import os, signal\n"
            "from sfrik_scale.preemption import STOP_SIGNALS, StopRequest, ignore_stop_signals\n"
            "StopRequest().install()\n"
            "ignore_stop_signals()\n"
            "for sig in STOP_SIGNALS:\n"
            "    assert signal.getsignal(sig) is signal.SIG_IGN\n"
            "    os.kill(os.getpid(), sig)\n"
            "print('alive')\n")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout.strip()) == (0, "alive"), proc.stderr


# ------------------------------------------------------------------ smoke: the loss falls
@pytest.mark.slow
def test_demo_like_run_loss_is_finite_and_falls(tmp_path):
    run = tmp_path / "smoke"
    check_ok(pretrain(run, "train.max_steps=12", "data.synthetic_size=256"))
    hist = summary(run)["loss_history"]
    assert all(map(lambda x: x == x and abs(x) < 1e6, hist))
    assert sum(hist[-3:]) / 3 < 0.9 * sum(hist[:3]) / 3


@pytest.mark.slow
def test_channels_last_views_follow_the_same_trajectory(tmp_path):
    # model.channels_last changes the memory layout of the views, not the maths: the first
    # losses agree to float rounding (the convolutions sum in another order; measured 1e-7
    # relative), and six steps of training amplify it (measured 1.4e-4 at step 6)
    default, nhwc = tmp_path / "nchw", tmp_path / "nhwc"
    check_ok(pretrain(default, "train.max_steps=6"))
    check_ok(pretrain(nhwc, "train.max_steps=6", "model.channels_last=true"))
    a, b = summary(default)["loss_history"], summary(nhwc)["loss_history"]
    assert len(a) == len(b) == 6
    assert torch.allclose(torch.tensor(b[:3]), torch.tensor(a[:3]), rtol=1e-5, atol=0)
    assert torch.allclose(torch.tensor(b), torch.tensor(a), rtol=1e-3, atol=0)


# ------------------------------------------------------------------ bad configuration
@pytest.mark.parametrize("override, key", [
    ("train.epochs=-1", "train.epochs"),
    ("train.epoch=3", "train.epoch"),
    ("train.epochs=abc", "train.epochs"),
    ("model.projector=64-x-8", "model.projector"),
    ("loss.coeffs=[1,-40]", "loss.coeffs"),
    ("deepspeed.zero_stage=5", "deepspeed.zero_stage"),
])
def test_bad_config_exits_2_naming_the_key(override, key, monkeypatch, capsys):
    from sfrik_scale import pretrain as entry

    monkeypatch.setattr(os, "environ", dict(_env()))
    assert entry.main([override, "train.run_dir=/nonexistent/never-written"]) == 2
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err


def test_global_batch_not_divisible_by_world_size_is_caught_before_start(monkeypatch, capsys):
    from sfrik_scale import pretrain as entry

    env = dict(_env())
    env.update(RANK="0", WORLD_SIZE="3", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    monkeypatch.setattr(os, "environ", env)
    assert entry.main(["train.global_batch_size=32"]) == 2  # no process group was started
    assert "global_batch_size" in capsys.readouterr().err


def test_cli_bad_input_is_one_line_with_status_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sfrik_scale.cli", "pretrain", "--config", "no_such_recipe"],
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no_such_recipe" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------ launch environments
def test_slurm_variables_are_mapped():
    from sfrik_scale.topology import resolve_launch_env

    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "gpu[003-004,010],cpu1"}
    assert resolve_launch_env(env) == "slurm"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("5", "16", "1", "gpu003")


def test_launcher_variables_win_and_local_rank_argument_is_accepted():
    from sfrik_scale.topology import resolve_launch_env

    env = {"RANK": "3", "WORLD_SIZE": "4", "MASTER_ADDR": "node1", "MASTER_PORT": "29501", "SLURM_PROCID": "0",
           "SLURM_NTASKS": "1"}
    assert resolve_launch_env(env, local_rank_arg=3) == "torch"
    assert env["LOCAL_RANK"] == "3" and env["RANK"] == "3"


def test_plain_start_is_a_single_process_on_loopback():
    from sfrik_scale.topology import resolve_launch_env

    env: dict = {}
    assert resolve_launch_env(env) == "single"
    assert env["WORLD_SIZE"] == "1" and env["MASTER_ADDR"] == "127.0.0.1" and int(env["MASTER_PORT"]) > 0


@pytest.mark.parametrize("nodelist, host", [("node7", "node7"), ("a[1-3]", "a1"), ("x-[09,11]-ib,y2", "x-09-ib"),
                                            ("gpu[003-004,010],cpu1", "gpu003")])
def test_first_host_of_slurm_nodelist(nodelist, host):
    from sfrik_scale.topology import first_host

    assert first_host(nodelist) == host


def test_launcher_scripts_are_valid_bash():
    for script in Path(__file__).resolve().parents[1].glob("launchers/*.s*"):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script


def test_the_run_header_counts_train_max_steps():
    from sfrik_scale.config import load_config
    from sfrik_scale.train import Trainer

    trainer = Trainer(load_config(None, ["train.max_steps=48"]), topo=None)
    trainer.steps_per_epoch, trainer.total_steps = 16, 48
    assert trainer.schedule_text() == "48 steps (train.max_steps) of 10 epochs x 16 steps"
    trainer.total_steps = 160
    assert trainer.schedule_text() == "10 epochs x 16 steps"


def test_the_summary_table_fits_80_columns_and_counts_bad_files():
    from rich.console import Console

    from sfrik_scale.monitor import summary_table

    epochs = [{"epoch": e, "steps": 16 * (e + 1), "loss": 10.41849 / (e + 1), "invariance": 0.00129771,
               "regulariser": 5.22761, "images_per_s": 12345.6, "time_s": 11.52, "skipped_steps": e,
               "bad_files": 5 * e} for e in range(3)]
    console = Console(width=80, record=True)
    console.print(summary_table(epochs, "run summary: runs/demo"))
    text = console.export_text()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    assert "bad" in text and "files" in text and "skipped" in text
    assert text.splitlines()[-2].split()[-2:] == ["2", "10"]  # last epoch: 2 skipped steps, 10 bad files
