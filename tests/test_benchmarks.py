"""The benchmark commands run and print their tables (timings are not asserted)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sfrik_scale.benchmarks.loss import parse_sizes


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "sfrik_scale.cli", *args], env=env, capture_output=True,
                          text=True, timeout=300)


def test_parse_sizes_reads_n_by_q_pairs():
    assert parse_sizes("1024x8192,16X32") == [(1024, 8192), (16, 32)]
    with pytest.raises(ValueError, match="NxQ"):
        parse_sizes("1024-8192")


@pytest.mark.slow
def test_bench_loss_prints_both_tables():
    proc = run_cli("bench", "loss", "--sizes", "32x64", "--repeats", "1", "--dist-n", "4", "--dist-q", "64",
                   "--worlds", "1,2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "kernel_mean L=3" in proc.stdout and "VICReg / SFRIK" in proc.stdout and "x shard" in proc.stdout


@pytest.mark.slow
def test_bench_step_prints_overhead_table():
    proc = run_cli("bench", "step", "--steps", "2", "--repeats", "1", "--warmup", "1",
                   "data.synthetic_size=64", "train.global_batch_size=16", "model.projector=32-64", "data.num_workers=0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "DeepSpeed trainer" in proc.stdout and "bare PyTorch loop" in proc.stdout
