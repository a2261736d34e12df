"""The self-test's runner: parts in priority order, each in a fresh process with a time box,
results written after every part.

A part is a function ``fn(quick: bool, work: str, timeout: float) -> dict`` run by
:mod:`.worker` in its own process (``start_new_session``: on timeout the whole process
group, the part's own sub-processes included, is killed). Whatever happens to one part
(an exception, a crash, a timeout) is recorded and the next part runs. The returned dict
may hold ``status`` ("ok" or "failed": a check did not hold), ``note``, ``checks`` (a list
of {"name", "ok", "detail"}) and ``tables`` (a list of {"title", "headers", "rows"}), which
the Markdown report prints.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from .worker import faults

#: whole-command budgets (seconds): the issue's 3 and 8 minutes, less start-up and writing
BUDGET_S = {"quick": 170.0, "full": 465.0}


@dataclass(frozen=True)
class Part:
    key: str
    title: str
    target: str  # MODULE:FUNCTION, run by the worker
    quick_s: float  # time box with --quick
    full_s: float  # time box otherwise
    skip: Callable[[], Optional[str]]  # reason to skip on this machine, or None


def isolated(target: str, kwargs: dict, timeout: float, work: str, key: str = "",
             new_session: bool = False) -> dict:
    """Run ``target(**kwargs)`` in a fresh process (:mod:`.worker`), at most ``timeout`` seconds.

    Returns its dict, or {"error": ..., "partial": ...} when it raised, crashed or timed out
    ("timed_out": True then). Parts call it with ``new_session=False`` for their own sub-cases,
    so that a part's time box also ends its children.
    """
    work_dir = Path(work)
    work_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{key or target.rsplit(':', 1)[-1]}-{time.monotonic_ns()}"
    result_file, log_file = work_dir / f"{stem}.json", work_dir / f"{stem}.log"
    cmd = [sys.executable, "-m", "sfrik_scale.selftest.worker", "--call", target, "--kwargs",
           json.dumps(kwargs), "--result", str(result_file), "--key", key]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    timed_out = False
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=new_session)
        try:
            code = proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill(proc, new_session)
            code = proc.wait()
    seconds = round(time.perf_counter() - start, 1)
    log_tail = log_file.read_text(errors="replace")[-3000:]
    out: dict
    if result_file.is_file():
        out = json.loads(result_file.read_text())
    else:
        why = f"timed out after {timeout:.0f} s" if timed_out else f"process exited with status {code}"
        out = {"error": why}
        partial = Path(str(result_file) + ".partial")
        if partial.is_file():
            out["partial"] = json.loads(partial.read_text())
    out.setdefault("seconds", seconds)
    if timed_out:
        out["timed_out"] = True
    out["log_tail"] = log_tail
    out["log"] = str(log_file)
    return out


def _kill(proc: subprocess.Popen, group: bool) -> None:
    try:
        if group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except ProcessLookupError:
        pass


# ------------------------------------------------------------------------------ environment
def environment() -> dict:
    """Device name, torch/CUDA/cuDNN/DeepSpeed/DALI versions, date, host."""
    import torch

    env = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "device": "cpu (no CUDA device)", "device_memory_gb": None}
    if env["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, device_memory_gb=round(props.total_memory / 1e9, 1),
                   device_count=torch.cuda.device_count(), capability=f"{props.major}.{props.minor}")
    env["deepspeed"] = _version("deepspeed")
    env["dali"] = _version("nvidia.dali")
    return env


def _version(module: str) -> Optional[str]:
    from importlib.util import find_spec

    try:
        if find_spec(module.split(".")[0]) is None or find_spec(module) is None:
            return None
    except (ImportError, ValueError):
        return None
    try:
        from importlib.metadata import version

        dist = {"nvidia.dali": ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110",
                                "nvidia-dali")}.get(module, (module,))
        for name in dist:
            try:
                return version(name)
            except Exception:  # noqa: BLE001 - try the next distribution name
                continue
    except ImportError:
        pass
    return "installed"


# ------------------------------------------------------------------------------ the run
def run_parts(parts: Sequence[Part], out: Path, quick: bool, budget: Optional[float] = None,
              part_timeout: Optional[float] = None, work: Optional[str] = None,
              echo: Callable[[str], None] = print) -> dict:
    """Run ``parts`` in order; after each, rewrite ``out/selftest.json`` and ``out/selftest.md``
    and append the part's log to ``out/selftest.log``. Returns the report."""
    out.mkdir(parents=True, exist_ok=True)
    work = work or tempfile.mkdtemp(prefix="sfrik-selftest-")
    mode = "quick" if quick else "full"
    budget = BUDGET_S[mode] if budget is None else budget
    deadline = time.monotonic() + budget
    report = {"mode": mode, "budget_s": budget, "environment": environment(), "parts": [], "finished": False,
              "work_dir": work}
    (out / "selftest.log").write_text("")
    injected = faults()
    echo(f"selftest ({mode}, budget {budget:.0f} s) on {report['environment']['device']} -> {out}")
    for part in parts:
        entry = {"key": part.key, "title": part.title}
        reason = None if part.key in injected else part.skip()
        left = deadline - time.monotonic()
        box = part_timeout if part_timeout is not None else (part.quick_s if quick else part.full_s)
        if reason is not None:
            entry.update(status="skipped", note=reason, seconds=0.0)
        elif left < 5:
            entry.update(status="not run", note=f"the {budget:.0f} s budget was spent", seconds=0.0)
        else:
            timeout = min(box, left)
            result = isolated(part.target, {"quick": quick, "work": str(Path(work) / part.key),
                                            "timeout": timeout}, timeout, work, key=part.key, new_session=True)
            entry.update(_entry_from(result, timeout))
            with open(out / "selftest.log", "a") as log:
                log.write(f"===== {part.key}: {entry['status']} ({entry['seconds']} s)\n{result.get('log_tail', '')}\n")
        report["parts"].append(entry)
        write_report(report, out)
        echo(f"  {part.key}: {entry['status']} ({entry['seconds']} s)"
             + (f": {entry['note']}" if entry.get("note") else ""))
    report["finished"] = True
    write_report(report, out)
    return report


def _entry_from(result: dict, timeout: float) -> dict:
    seconds = result.get("seconds")
    if result.get("timed_out"):
        partial = result.get("partial") or {}
        return {"status": "timeout", "note": f"time box of {timeout:.0f} s reached; partial results kept",
                "seconds": seconds, "result": partial}
    if "error" in result:
        return {"status": "error", "note": result["error"].splitlines()[0][:300], "seconds": seconds,
                "result": result.get("partial") or {}, "traceback": result.get("traceback", "")}
    failed = [c for c in result.get("checks", []) if not c.get("ok")]
    status = result.get("status") or ("failed" if failed else "ok")
    note = result.get("note") or ("; ".join(f"{c['name']}: {c.get('detail', '')}" for c in failed)[:300] or None)
    return {"status": status, "note": note, "seconds": seconds,
            "result": {k: v for k, v in result.items() if k not in ("log_tail", "log", "seconds")}}


def exit_status(report: dict) -> int:
    """0 when no part ran into an error, a timeout or a failed check (skipped parts are fine)."""
    return 1 if any(p["status"] in ("error", "timeout", "failed") for p in report["parts"]) else 0


# ------------------------------------------------------------------------------ the files
def write_report(report: dict, out: Path) -> None:
    tmp = out / "selftest.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, out / "selftest.json")
    (out / "selftest.md").write_text(markdown(report))


ENV_ROWS = (("device", "device"), ("device memory (GB)", "device_memory_gb"), ("torch", "torch"),
            ("CUDA (torch built with)", "cuda"), ("cuDNN", "cudnn"), ("DeepSpeed", "deepspeed"), ("DALI", "dali"),
            ("Python", "python"), ("date", "date"))


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"## sfrik-scale selftest --gpu ({report['mode']})", "",
             "| | |", "|---|---|"]
    lines += [f"| {label} | {_cell(env.get(key))} |" for label, key in ENV_ROWS]
    lines += ["", "| part | status | seconds | note |", "|---|---|---:|---|"]
    lines += [f"| {p['key']}: {p['title']} | {p['status']} | {_cell(p.get('seconds'))} | {_cell(p.get('note'))} |"
              for p in report["parts"]]
    if not report.get("finished"):
        lines += ["", "(run in progress or cut short: parts not listed did not run)"]
    for p in report["parts"]:
        result = p.get("result") or {}
        checks, tables = result.get("checks") or [], result.get("tables") or []
        if not checks and not tables:
            continue
        lines += ["", f"### {p['key']}: {p['title']}"]
        if checks:
            lines += ["", "| check | result | detail |", "|---|---|---|"]
            lines += [f"| {_cell(c['name'])} | {'pass' if c.get('ok') else 'FAIL'} | {_cell(c.get('detail'))} |"
                      for c in checks]
        for t in tables:
            lines += ["", f"**{t['title']}**", "", "| " + " | ".join(t["headers"]) + " |",
                      "|" + "|".join("---" for _ in t["headers"]) + "|"]
            lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in t["rows"]]
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "/").replace("\n", " ")
