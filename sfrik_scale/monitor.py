"""Rank-0 monitoring: TensorBoard scalars, a rich progress bar per epoch, a summary table and
``summary.json``. Other ranks get a Monitor that does nothing, so the loop never branches.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from .storage import atomic_write_text

SUMMARY_FILE = "summary.json"


class Monitor:
    """Everything a person watches during a run.

    Args:
        run_dir: the run directory (TensorBoard events go to ``run_dir/tensorboard``).
        active: True on rank 0 only.
        tensorboard, progress: the ``monitor`` config switches.
        header: lines printed once at the start (what runs where).
    """

    def __init__(self, run_dir: Path, active: bool, tensorboard: bool = True, progress: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.active = active
        self.writer = None
        self.console = None
        self._progress = None
        self._task = None
        self.summary: dict[str, Any] = {"epochs": []}
        if not active:
            return
        from rich.console import Console

        self.console = Console(stderr=True)
        self.show_progress = progress
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        path = self.run_dir / SUMMARY_FILE
        if path.is_file():  # resumed run: keep the epochs already done
            try:
                self.summary = json.loads(path.read_text())
            except json.JSONDecodeError:
                pass
            self.summary.setdefault("epochs", [])

    # -- console --------------------------------------------------------------------
    def print(self, *args: Any, soft_wrap: bool = False) -> None:
        """Rank 0's console; ``soft_wrap``: one line however long (for grep in a job's log)."""
        if self.console is not None:
            self.console.print(*args, soft_wrap=soft_wrap)

    def print_header(self, rows: list[tuple[str, str]]) -> None:
        if self.console is None:
            return
        from rich.table import Table

        table = Table(title="sfrik-scale pretrain", show_header=False, box=None)
        table.add_column(style="bold cyan")
        table.add_column()
        for k, v in rows:
            table.add_row(k, v)
        self.console.print(table)

    # -- per epoch ----------------------------------------------------------------------
    def start_epoch(self, epoch: int, epochs: int, total: int, completed: int = 0) -> None:
        if not (self.active and self.show_progress):
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self._progress = Progress(TextColumn(f"epoch {epoch + 1}/{epochs}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[ips]} img/s"),
                                  TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                  console=self.console, transient=False)
        self._progress.start()
        self._task = self._progress.add_task("train", total=total, completed=completed, loss="-", ips="-")

    def advance(self, loss: Optional[float], images_per_s: Optional[float]) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1,
                                  loss=f"{loss:.4g}" if loss is not None else "-",
                                  ips=f"{images_per_s:,.0f}" if images_per_s else "-")

    def end_epoch(self, record: dict) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if not self.active:
            return
        self.summary["epochs"] = [e for e in self.summary["epochs"] if e["epoch"] != record["epoch"]] + [record]
        self.write_summary()

    # -- scalars ------------------------------------------------------------------------
    def scalars(self, step: int, values: dict[str, float], prefix: str = "train") -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            if value is not None:
                self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    # -- end ------------------------------------------------------------------------------
    def write_summary(self, **extra: Any) -> None:
        if not self.active:
            return
        self.summary.update(extra)
        self.summary["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        atomic_write_text(self.run_dir / SUMMARY_FILE, json.dumps(self.summary, indent=2, default=float) + "\n")

    def report_bad_files(self, bad_files: dict) -> None:
        """Say on the console, once per new file, that unreadable images were skipped: how many,
        the first names and where the full list is (``summary.json``, key ``bad_files``)."""
        if not self.active:
            return
        seen = self.summary.get("bad_files") or {}
        new = [path for path in bad_files if path not in seen]
        if not new:
            return
        self.write_summary(bad_files=dict(bad_files))
        first = ", ".join(Path(p).name for p in new[:3]) + (", ..." if len(new) > 3 else "")
        self.print(f"[bold yellow]warning:[/] {len(new)} unreadable image(s) skipped and replaced by others "
                   f"({len(bad_files)} so far): {first}; the full list with reasons is under 'bad_files' in "
                   f"{self.run_dir / SUMMARY_FILE}")

    def print_summary_table(self) -> None:
        if self.console is None or not self.summary["epochs"]:
            return
        self.console.print(summary_table(self.summary["epochs"], f"run summary: {self.run_dir}"))

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def _fmt(value: Optional[float], spec: str = ".5g") -> str:
    return "-" if value is None else format(value, spec)


#: the summary table's columns: header (two lines where long), the epoch record's key, format
SUMMARY_COLUMNS = (("epoch", "epoch", None), ("steps", "steps", None), ("loss", "loss", ".4g"),
                   ("invariance", "invariance", ".4g"), ("regulariser", "regulariser", ".4g"),
                   ("img/s", "images_per_s", ",.0f"), ("time\n(s)", "time_s", ".1f"),
                   ("skipped\nsteps", "skipped_steps", None), ("bad\nfiles", "bad_files", None))


def summary_table(epochs: list, title: str):
    """One row per epoch record; fits 80 columns (``skipped steps``: non-finite steps dropped,
    ``bad files``: unreadable images replaced by others)."""
    from rich import box
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True)
    for header, _, _ in SUMMARY_COLUMNS:
        table.add_column(header, justify="right", no_wrap=True)
    for e in epochs:
        row = []
        for _, key, spec in SUMMARY_COLUMNS:
            value = e.get(key, 0 if key in ("skipped_steps", "bad_files") else None)
            if key == "epoch":
                value = value + 1
            row.append(_fmt(value, spec) if spec else ("-" if value is None else str(value)))
        table.add_row(*row)
    return table
