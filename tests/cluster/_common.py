"""What the cluster tests share: the configuration, the environment and an environment probe."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ..test_train import BIN, TINY, check_ok, pretrain, summary

ROOT = Path(__file__).resolve().parents[2]
LAUNCHERS = ROOT / "launchers"
#: enough steps (20 epochs of 4) that a preemption signal sent once training runs lands mid-run
STEPS = 80
CONFIG = [*TINY, f"train.max_steps={STEPS}", "train.epochs=20", "deepspeed.zero_stage=2",
          "deepspeed.precision=bf16", "train.peer_timeout_s=30"]

PROBE = '''import json, os, sys
_dir = os.environ.get("SFRIK_ENV_PROBE")
if _dir and os.path.isdir(_dir):
    with open(os.path.join(_dir, f"{os.getpid()}.json"), "w") as _f:
        json.dump({"argv": sys.argv, "env": dict(os.environ)}, _f)
'''


def env(probe: Path | None = None) -> dict:
    """The test's environment for a launch: this tree first on PYTHONPATH (remote processes must
    import the same code), the venv's bin on PATH, one thread per rank; with `probe`, a
    sitecustomize on PYTHONPATH that records every Python process's environment there."""
    e = {k: v for k, v in os.environ.items()
         if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DS_ENV_FILE")
         and not k.startswith("SLURM_")}
    paths = [str(ROOT)]
    if probe is not None:
        site = probe / "site"
        site.mkdir(parents=True, exist_ok=True)
        (site / "sitecustomize.py").write_text(PROBE)
        (probe / "records").mkdir(exist_ok=True)
        paths.insert(0, str(site))
    paths += [p for p in e.get("PYTHONPATH", "").split(os.pathsep) if p and p not in paths]
    e.update(PYTHONPATH=os.pathsep.join(paths), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
             PATH=f"{BIN}{os.pathsep}{e.get('PATH', '')}")
    return e


def probed(probe: Path) -> list[dict]:
    """The environment records of the training processes (those started with the trainer module)."""
    out = []
    for f in sorted((probe / "records").glob("*.json")):
        try:
            rec = json.loads(f.read_text())
        except ValueError:
            continue
        rec["pid"] = int(f.stem)
        out.append(rec)
    return out


def rank_records(run_dir: Path) -> dict[int, dict]:
    """The health records of the last session of a run: rank -> record (pid, node, ranks)."""
    sessions = sorted((run_dir / ".ranks").iterdir(), key=lambda p: p.stat().st_mtime)
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in sessions[-1].glob("rank*.json")}


def reference_run(run_dir: Path) -> list[float]:
    check_ok(pretrain(run_dir, *CONFIG[len(TINY):], procs=2))
    return summary(run_dir)["loss_history"]


__all__ = ["BIN", "CONFIG", "LAUNCHERS", "ROOT", "STEPS", "TINY", "check_ok", "env", "probed", "rank_records",
           "reference_run", "summary", "subprocess", "sys"]
