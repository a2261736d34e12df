"""Parts 1 and 6 of the self-test: the gpu-marked tests, DALI's mixed decoding."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from .common import SFRIK

ROOT = Path(__file__).resolve().parents[2]


def gpu_test_files(tests_dir: Path) -> list[str]:
    """The test modules holding a ``@pytest.mark.gpu`` (only those are collected: faster)."""
    return sorted(str(p) for p in tests_dir.glob("test_*.py") if "pytest.mark.gpu" in p.read_text())


def run_gpu_tests(quick: bool, work: str, timeout: float) -> dict:
    """Part 1: ``pytest -m gpu`` on the modules that hold gpu-marked tests, in a subprocess
    with a timeout; one check per test (skipped tests pass, with their reason)."""
    tests_dir = ROOT / "tests"
    files = gpu_test_files(tests_dir) if tests_dir.is_dir() else []
    if not files:
        return {"status": "skipped", "note": f"no tests folder with gpu-marked tests at {tests_dir}"}
    Path(work).mkdir(parents=True, exist_ok=True)
    junit = Path(work) / "gpu-tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rA", "-p", "no:cacheprovider",
           f"--junitxml={junit}", *files]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(timeout - 10, 10),
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        output, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        output, code = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) \
            else (err.stdout or ""), "timeout"
    print(output[-6000:])
    checks = junit_checks(junit) if junit.is_file() else []
    if code == "timeout":
        checks.append({"name": "pytest", "ok": False, "detail": f"timed out after {timeout - 10:.0f} s"})
    elif not checks:
        checks.append({"name": "pytest", "ok": code in (0, 5), "detail": f"exit {code}: {output.strip()[-200:]}"})
    summary = re.findall(r"=+ (.+?) in [\d.]+s", output)
    return {"checks": checks, "note": summary[-1] if summary else None, "exit_code": code,
            "tables": [{"title": "gpu-marked tests", "headers": ["test", "outcome", "detail"],
                        "rows": [[c["name"], c["outcome"] if "outcome" in c else ("pass" if c["ok"] else "FAIL"),
                                  c.get("detail", "")] for c in checks]}]}


def junit_checks(path: Path) -> list[dict]:
    checks = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        outcome, detail = "passed", f"{float(case.get('time', 0)):.1f} s"
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                detail = (node.get("message") or node.text or "").strip().splitlines()[0][:200] if \
                    (node.get("message") or node.text) else tag
        checks.append({"name": name, "ok": outcome in ("passed", "skipped"), "outcome": outcome, "detail": detail})
    return checks


def dali_part(quick: bool, work: str, timeout: float) -> dict:
    """Part 6: images/s of DALI's GPU pipeline (nvJPEG "mixed" decoding, device augmentation)
    against the torchvision loader, on generated 500x375 JPEGs with the SFRIK views at 224 px."""
    import torch

    from ..benchmarks.data import DALI_GPU, TORCHVISION, bench_data, write_jpegs

    threads = min(len(os.sched_getaffinity(0)), 16)
    images = 256 if quick else 1024
    root = write_jpegs(str(Path(work) / "jpegs"), images)
    rows = bench_data(root, threads, batch_size=128, image_size=224, augmentations=SFRIK,
                      epochs=1 if quick else 2, pipelines=[TORCHVISION, DALI_GPU], cpu_cost=False)
    base = next(r for r in rows if r.pipeline == TORCHVISION).images_per_s
    table = [[r.pipeline, r.device, r.threads, round(r.images_per_s, 1), round(r.images_per_s / base, 2), r.images,
              round(r.seconds, 2)] for r in rows]
    gpu = next(r for r in rows if r.pipeline == DALI_GPU)
    return {"checks": [{"name": "DALI mixed decoding yields batches", "ok": gpu.images > 0,
                        "detail": f"{gpu.images_per_s:,.0f} images/s, {gpu.images_per_s / base:.2f}x torchvision"}],
            "device": torch.cuda.get_device_name(0),
            "tables": [{"title": f"{images} generated 500x375 JPEGs, SFRIK views at 224 px, batch 128, "
                                 f"{threads} threads",
                        "headers": ["pipeline", "device", "threads", "images/s", "vs torchvision", "images",
                                    "seconds"], "rows": table}]}
