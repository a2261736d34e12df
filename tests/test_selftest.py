"""``sfrik-scale selftest --gpu`` on CPU: its structure, its failure isolation, its parts'
code paths on tiny models, and the carry that takes DeepSpeed to the GPU machine."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sfrik_scale.selftest import PARTS
from sfrik_scale.selftest.common import SFRIK, VICREG, Deadline
from sfrik_scale.selftest.runner import Part, markdown

ROOT = Path(__file__).resolve().parent.parent
no_cuda_only = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the command runs the real checks")


def selftest(tmp_path: Path, *args: str, faults: str = "") -> tuple[subprocess.CompletedProcess, dict, str]:
    env = {**os.environ, "COLUMNS": "200", "SFRIK_SELFTEST_FAULTS": faults}
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, "-m", "sfrik_scale.cli", "selftest", "--gpu", "--out", str(tmp_path), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    report = json.loads((tmp_path / "selftest.json").read_text())
    return proc, report, (tmp_path / "selftest.md").read_text()


@no_cuda_only
def test_without_cuda_every_part_is_skipped_with_one_line_and_the_command_returns_0(tmp_path):
    proc, report, md = selftest(tmp_path, "--quick")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("  ") and ": skipped (" in line]
    assert [line.split(":")[0].strip() for line in lines] == [p.key for p in PARTS]
    assert all("no CUDA device" in line for line in lines)
    assert report["mode"] == "quick" and report["finished"] is True
    env = report["environment"]
    assert {"device", "torch", "cuda", "deepspeed", "dali", "date", "python"} <= set(env)
    assert env["cuda_available"] is False and env["torch"] == torch.__version__
    assert [p["key"] for p in report["parts"]] == [p.key for p in PARTS]
    assert all(p["status"] == "skipped" and p["note"] for p in report["parts"])
    for label in ("| device |", "| torch |", "| DeepSpeed |", "| DALI |", "| date |", "| part | status |"):
        assert label in md, label
    assert sum(line.startswith("| ") and "skipped" in line for line in md.splitlines()) == len(PARTS)
    assert (tmp_path / "selftest.log").is_file()
    assert len(list(tmp_path.iterdir())) <= 8  # what a device run brings back: at most 8 files


def test_the_output_folder_defaults_to_OUT(monkeypatch, tmp_path):
    from sfrik_scale.selftest import default_out

    monkeypatch.setenv("OUT", str(tmp_path))
    assert default_out() == tmp_path
    monkeypatch.delenv("OUT")
    assert default_out() == Path("gpu-validation")


def test_selftest_needs_gpu_and_known_parts(tmp_path):
    from sfrik_scale.cli import main

    assert main(["selftest", "--out", str(tmp_path)]) == 2
    assert main(["selftest", "--gpu", "--parts", "nope", "--out", str(tmp_path)]) == 2


def test_a_part_that_raises_crashes_or_hangs_is_recorded_and_the_next_parts_still_run(tmp_path):
    faults = "tests:raise,memory-paper:hang,memory-trainer:exit"
    proc, report, md = selftest(tmp_path, "--quick", "--part-timeout", "6", faults=faults)
    assert proc.returncode == 1, proc.stderr[-2000:]
    status = {p["key"]: p for p in report["parts"]}
    assert [p["key"] for p in report["parts"]] == [p.key for p in PARTS]
    assert status["tests"]["status"] == "error" and "fault injected" in status["tests"]["note"]
    assert status["memory-paper"]["status"] == "timeout" and status["memory-paper"]["seconds"] < 30
    assert status["memory-trainer"]["status"] == "error" and "status 3" in status["memory-trainer"]["note"]
    if not torch.cuda.is_available():
        assert all(status[k]["status"] == "skipped" for k in ("steps", "gram", "dali"))
    assert report["finished"] is True
    assert "| memory-paper: " in md and "timeout" in md
    log = (tmp_path / "selftest.log").read_text()
    assert "===== tests: error" in log and "RuntimeError: fault injected" in log


def test_results_are_written_after_every_part(tmp_path):
    from sfrik_scale.selftest.runner import run_parts

    seen = []

    def echo(text):
        if text.startswith("  "):
            seen.append(len(json.loads((tmp_path / "selftest.json").read_text())["parts"]))

    parts = [Part(f"p{i}", "t", "unused:unused", 1, 1, lambda: "not here") for i in range(3)]
    report = run_parts(parts, tmp_path, quick=True, echo=echo)
    assert seen == [1, 2, 3] and report["finished"]
    assert [p["status"] for p in report["parts"]] == ["skipped"] * 3


@no_cuda_only
@pytest.mark.slow
def test_the_gpu_tests_part_runs_pytest_on_the_gpu_marked_tests(tmp_path):
    """Forced to run on CPU (fault hook "run"): the gpu-marked tests are collected, and skip."""
    proc, report, md = selftest(tmp_path, "--parts", "tests", "--part-timeout", "300", faults="tests:run")
    part = report["parts"][0]
    assert part["status"] == "ok", (part, proc.stdout[-2000:])
    names = {c["name"].split("::")[-1]: c for c in part["result"]["checks"]}
    assert "test_simulated_peak_matches_a_measured_gpu_run" in names
    assert names["test_simulated_peak_matches_a_measured_gpu_run"]["outcome"] == "skipped"
    assert "gpu-marked tests" in md


def test_markdown_lays_out_environment_parts_checks_and_tables():
    report = {"mode": "full", "finished": False, "environment": {"device": "NVIDIA H200", "torch": "2.11"},
              "parts": [{"key": "gram", "title": "t", "status": "failed", "seconds": 3.0, "note": "x",
                         "result": {"checks": [{"name": "c", "ok": False, "detail": "d|e"}],
                                    "tables": [{"title": "T", "headers": ["a", "b"], "rows": [[1, 2.5]]}]}}]}
    md = markdown(report)
    assert "| device | NVIDIA H200 |" in md and "| gram: t | failed | 3 | x |" in md
    assert "| c | FAIL | d/e |" in md and "| a | b |" in md and "| 1 | 2.5 |" in md
    assert "cut short" in md


# ------------------------------------------------------------------------------ the parts, tiny, on CPU
TINY = dict(q=256, hidden="64-64", backbone="tiny_cnn", image_size=32)


def test_the_paper_step_runs_and_is_simulated_with_each_assumption(tmp_path):
    from sfrik_scale.selftest.memory import paper_part

    configs = [dict(method=SFRIK, per_gpu_batch=4), dict(method=VICREG, per_gpu_batch=4),
               dict(method=SFRIK, per_gpu_batch=4, grad_set_to_none=True)]
    result = paper_part(False, str(tmp_path), 300, configs=configs, device="cpu", **TINY)
    rows = result["rows"]
    assert [r["variant"] for r in rows] == ["as the official code"] * 2 + ["grad_set_to_none=True"]
    for r in rows:
        assert "error" not in r, r
        assert r["steady"] and r["simulated_bytes"] > 0 and all(x == x for x in r["losses"])
    assert rows[2]["simulated_delta_gb"] is not None  # compared with its default
    assert result["checks"] == []  # nothing measured on CPU, nothing failed
    assert result["tables"][0]["rows"][0][:3] == [SFRIK, 4, "as the official code"]


def test_the_paper_configurations_cover_the_papers_batches_and_every_toggle():
    from sfrik_scale.selftest.memory import ASSUMPTIONS, paper_configs, variant

    full = paper_configs(quick=False)
    assert {(c["method"], c["per_gpu_batch"]) for c in full if variant(c) == "as the official code"} == \
        {(m, n) for m in (SFRIK, VICREG) for n in (32, 64, 128)}
    toggled = {variant(c) for c in full} - {"as the official code"}
    assert len(toggled) == len(ASSUMPTIONS) + 1 and "SyncBatchNorm" in toggled
    assert len(paper_configs(quick=True)) < len(full)


def test_the_gram_table_times_kernel_mean_against_its_floor(tmp_path):
    from sfrik_scale.selftest.gram import gram_table

    rows = gram_table(True, Deadline(120, margin=0), sizes=[(64, 256)], device=torch.device("cpu"), repeats=1)
    assert [r["dtype"] for r in rows] == ["fp32", "fp32+TF32", "bf16"]
    for r in rows:
        assert "error" not in r, r
        assert r["floor_ms"] > 0 and r["kernel_mean_ms"] > 0 and r["x_floor"] > 0


def _records(scales, skipped):
    return [{"step": i, "loss": 1.0, "nonfinite": False, "skipped": s, "scale_before": a, "scale_after": b}
            for i, ((a, b), s) in enumerate(zip(scales, skipped))]


def test_the_fp16_checks_want_counted_skips_and_a_halving_scale():
    from sfrik_scale.selftest.training import step_checks

    good = {"precision": "fp16", "zero_stage": 2, "forced_overflow": True, "min_loss_scale": 1.0,
            "records": _records([(8, 4), (4, 2), (2, 2), (2, 2), (2, 2)], [True, True, False, False, False]),
            "skipped_steps": 2}
    assert all(c["ok"] for c in step_checks(good)), step_checks(good)
    miscounted = {**good, "skipped_steps": 1}
    assert not all(c["ok"] for c in step_checks(miscounted))
    wrong_scale = {**good, "records": _records([(8, 8), (8, 4), (4, 4), (4, 4), (4, 4)],
                                               [True, True, False, False, False])}
    assert [c["ok"] for c in step_checks(wrong_scale)].count(False) == 1
    no_overflow = {**good, "records": _records([(8, 8)] * 5, [False] * 5), "skipped_steps": 0}
    assert not all(c["ok"] for c in step_checks(no_overflow))  # forced, yet nothing overflowed
    bf16 = {"precision": "bf16", "zero_stage": 2, "forced_overflow": False, "min_loss_scale": 1.0,
            "records": _records([(None, None)] * 3, [False] * 3), "skipped_steps": 0}
    assert all(c["ok"] for c in step_checks(bf16))
    nan = {**bf16, "records": [{**r, "nonfinite": True} for r in bf16["records"]]}
    assert not step_checks(nan)[0]["ok"]


@pytest.mark.slow
def test_the_steps_part_trains_the_real_trainer_in_bf16(tmp_path):
    from sfrik_scale.selftest.training import steps_part

    config = dict(method=SFRIK, per_gpu_batch=8, precision="bf16", zero_stage=2, steps=3, **TINY)
    result = steps_part(False, str(tmp_path), 300, configs=[config])
    assert [c["ok"] for c in result["checks"]] == [True, True], result["checks"]
    assert len(result["tables"][0]["rows"]) == 3


# ------------------------------------------------------------------------------ the carry and the device command
@pytest.mark.slow
def test_prepare_gpu_carry_builds_deepspeed_and_its_missing_packages_well_under_64_mib(tmp_path):
    """Needs pip to reach its registry or cache (about 10 s)."""
    carry = tmp_path / "carry"
    proc = subprocess.run([str(ROOT / "scripts" / "prepare-gpu-carry"), str(carry)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheels = sorted(p.name for p in carry.glob("*.whl"))
    from importlib.metadata import version

    assert f"deepspeed-{version('deepspeed')}-py3-none-any.whl" in wheels
    for name in ("hjson", "pydantic-", "annotated_types", "typing_inspection"):
        assert any(w.startswith(name) for w in wheels), (name, wheels)
    core = [w for w in wheels if w.startswith("pydantic_core")]
    assert len(core) == 1 and "cp312" in core[0] and "x86_64" in core[0]  # the device's Python and processor
    total = sum(p.stat().st_size for p in carry.iterdir())
    assert total < 16 * 2**20  # the whole working tree that travels may hold 64 MiB


def test_gpu_acceptance_installs_offline_then_runs_the_selftest_into_OUT(tmp_path):
    """With pip replaced by a recorder: the install commands it issues, then the real selftest
    (on CPU: every part skipped, exit 0) writing into $OUT."""
    log = tmp_path / "pip.log"
    shim = tmp_path / "python"
    shim.write_text(f"""#!/usr/bin/env bash
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then echo "pip ${{@:3}}" >> {log}; exit 0; fi
exec {sys.executable} "$@"
""")
    shim.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": str(shim), "OUT": str(out), "GPU_CARRY": str(tmp_path / "carry"),
           "CUDA_VISIBLE_DEVICES": "" if not torch.cuda.is_available() else os.environ.get("CUDA_VISIBLE_DEVICES", "")}
    (tmp_path / "carry").mkdir()
    (tmp_path / "carry" / "deepspeed-0-py3-none-any.whl").write_text("")
    if torch.cuda.is_available():
        pytest.skip("on a GPU this would run the real checks")
    proc = subprocess.run([str(ROOT / "scripts" / "gpu-acceptance"), "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    calls = log.read_text().splitlines()
    assert any("install" in c and "--no-index" in c and f"--find-links {tmp_path / 'carry'}" in c and "deepspeed" in c
               for c in calls), calls
    assert any("install" in c and "--no-deps" in c and "-e ." in c for c in calls), calls
    assert any(c.startswith("pip show deepspeed") for c in calls), calls
    report = json.loads((out / "selftest.json").read_text())
    assert report["mode"] == "quick" and all(p["status"] == "skipped" for p in report["parts"])
    assert (out / "selftest.md").is_file()
