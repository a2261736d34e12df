"""The benchmark commands run and print their tables; timings are not asserted, but each
test checks one relation between the printed figures that must hold whatever the machine."""
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


def table_rows(stdout: str) -> list[list[str]]:
    """The body rows of the rich tables in ``stdout``, as lists of stripped cells."""
    return [[c.strip() for c in line.strip().strip("│").split("│")] for line in stdout.splitlines()
            if line.startswith("│")]


def number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("%"))


def test_parse_sizes_reads_n_by_q_pairs():
    assert parse_sizes("1024x8192,16X32") == [(1024, 8192), (16, 32)]
    with pytest.raises(ValueError, match="NxQ"):
        parse_sizes("1024-8192")


@pytest.mark.slow
def test_bench_loss_prints_both_tables():
    proc = run_cli("bench", "loss", "--sizes", "32x64", "--repeats", "1", "--dist-n", "4", "--dist-q", "16384",
                   "--worlds", "1,2,4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "kernel_mean L=3" in proc.stdout and "VICReg / SFRIK" in proc.stdout and "x shard" in proc.stdout
    # The kernel mean does the floor's two products and more (measured: about 15x its time).
    single = {row[2]: row for row in table_rows(proc.stdout) if row[:2] == ["32", "64"]}
    floor, kernel = single["floor (ZZ^T, Phi'Z)"], single["kernel_mean L=3"]
    assert number(floor[3]) <= number(kernel[3]) and number(floor[5]) <= number(kernel[5])
    # Columns: x floor (paired per round), peak, range, x own floor (per view), compiled. At 32 x 64
    # the configured (auto) rows stay eager, like the forced-eager ones; the floor has no fused pass.
    for method, views in (("kernel_mean L=3", 1), ("kernel_mean L=3, eager", 1), ("SFRIKLoss (2 views)", 2),
                          ("SFRIKLoss (2 views), eager", 2)):
        row = single[method]
        assert number(row[7]) == pytest.approx(number(row[4]) / views, abs=0.011), row
        low, high = (number(x) for x in row[6].split("-"))
        assert low <= number(row[3]) <= high, row
        assert row[8] == "no", row
    assert floor[8] == "-" and number(floor[4]) == 1.0
    assert "eager / configured time" in proc.stdout and "load average" in proc.stdout
    # The ring's per-rank memory does not grow from 2 ranks to 4 (exact byte accounting).
    ring = {row[0]: row for row in table_rows(proc.stdout) if len(row) == 8}
    assert ring["2"][5] == ring["4"][5] and ring["2"][6] == ring["4"][6], ring


@pytest.mark.slow
def test_bench_step_prints_overhead_table():
    proc = run_cli("bench", "step", "--steps", "2", "--repeats", "1", "--warmup", "1",
                   "data.synthetic_size=64", "train.global_batch_size=16", "model.projector=32-64", "data.num_workers=0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "DeepSpeed trainer" in proc.stdout and "bare PyTorch loop" in proc.stdout
    # Both loops are timed on the same steps of 16 images: each row's images/s is its steps/s x 16
    # and its ms/step 1000 / steps/s, and the overhead is the trainer's time over the bare loop's.
    rows = {row[0]: row for row in table_rows(proc.stdout) if row[0] in ("bare PyTorch loop", "DeepSpeed trainer")}
    for name, (_, steps_s, images_s, ms_step, _overhead) in rows.items():
        assert number(images_s) == pytest.approx(16 * number(steps_s), abs=16 * 0.005 + 0.5), name
        assert number(ms_step) == pytest.approx(1000 / number(steps_s), rel=0.01, abs=0.05), name
    bare, trainer = (number(rows[k][3]) for k in ("bare PyTorch loop", "DeepSpeed trainer"))
    assert number(rows["bare PyTorch loop"][4]) == 0.0
    rounding = 0.5 + 100 * 0.1 / bare  # ms/step is printed to 0.1 ms
    assert number(rows["DeepSpeed trainer"][4]) == pytest.approx(100 * (trainer / bare - 1), abs=rounding)
