"""Memory tables in the paper's layout: rich, Markdown, CSV and PNG charts.

Input everywhere is a list of *results*, plain dicts (as ``profile-memory`` writes them to
``results.json``)::

    {"method": "sfrik", "q": 32768, "global_batch": 256, "world_size": 8, "zero_stage": 2,
     "precision": "bf16", "implementation": "trainer", "source": "simulated",
     "peak_bytes": 6.1e9, ...}

:func:`memory_rows` arranges them as the paper does, one row per configuration (batch size,
q, stage, precision) and one column per method, with VICReg / SFRIK ratios and, where the
paper has a figure for that row, the paper's numbers side by side. Values are decimal GB
(10^9 bytes), the paper's unit.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterable, Optional, Sequence

from ..losses import display_name
from .paper import PAPER_METHODS, paper_gb

GB = 1e9
#: methods in column order: the paper's two, then the others alphabetically
METHOD_ORDER = PAPER_METHODS
CSV_FIELDS = ("implementation", "source", "method", "q", "global_batch", "world_size", "zero_stage", "precision",
              "backbone", "projector", "peak_bytes", "peak_gb", "peak_phase", "error")


def _config_key(r: dict) -> tuple:
    impl = r.get("implementation", "trainer")
    return (impl, r.get("source", ""), int(r["q"]), int(r["global_batch"]), int(r.get("world_size", 1)),
            -1 if impl == "paper" else int(r.get("zero_stage", 0)), "amp-fp16" if impl == "paper" else r.get("precision", ""))


def _methods(results: Iterable[dict]) -> list[str]:
    found = {r["method"] for r in results}
    return [m for m in METHOD_ORDER if m in found] + sorted(found - set(METHOD_ORDER))


def _gb(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def memory_rows(results: Sequence[dict], with_paper: bool = True) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of the paper-layout table for ``results``.

    Rows: one per (implementation, source, q, global batch, world size, ZeRO stage, precision),
    in that order. Columns: the configuration, then each method's GB per GPU (and the paper's
    figure next to it when the row matches one of the paper's and ``with_paper``), then the
    VICReg / SFRIK ratio (ours, and the paper's). A failed run shows its error's first words.
    """
    methods = _methods(results)
    rows_by_key: dict[tuple, dict[str, dict]] = {}
    for r in results:
        rows_by_key.setdefault(_config_key(r), {})[r["method"]] = r
    paper_cols = with_paper and any(k[0] == "paper" or paper_gb(m, k[2], k[3]) is not None
                                    for k in rows_by_key for m in methods)
    headers = ["implementation", "q", "batch size", "GPUs", "ZeRO", "precision"]
    for m in methods:
        headers.append(_label(m))
        if paper_cols:
            headers.append(f"{_label(m)} (paper)")
    ratio = "vicreg" in methods and "sfrik" in methods
    if ratio:
        headers.append("ratio VICReg/SFRIK")
        if paper_cols:
            headers.append("ratio (paper)")
    rows = []
    for key in sorted(rows_by_key):
        impl, source, q, batch, world, stage, precision = key
        cells = rows_by_key[key]
        row = [f"{impl} ({source})" if source else impl, str(q), str(batch), str(world),
               "-" if stage < 0 else str(stage), precision]
        values: dict[str, Optional[float]] = {}
        for m in methods:
            r = cells.get(m)
            if r is None:
                row.append("")
            elif r.get("error"):
                row.append("error: " + str(r["error"]).split("\n")[0][:40])
            else:
                values[m] = r["peak_bytes"] / GB
                row.append(_gb(values[m]))
            if paper_cols:
                row.append(_gb(paper_gb(m, q, batch)) if world == 8 else "-")
        if ratio:
            v, s = values.get("vicreg"), values.get("sfrik")
            row.append(f"{v / s:.2f}" if v and s else "-")
            if paper_cols:
                pv, ps = paper_gb("vicreg", q, batch), paper_gb("sfrik", q, batch)
                row.append(f"{pv / ps:.2f}" if pv and ps and world == 8 else "-")
        rows.append(row)
    return headers, rows


def _label(method: str) -> str:
    return display_name(method)


def to_markdown(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub Markdown table (numbers right-aligned)."""
    align = ["---" if i < 2 else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def compact(headers: Sequence[str], rows: Sequence[Sequence[str]], config_columns: int = 6
            ) -> tuple[list[str], list[list[str]], str]:
    """Drop configuration columns whose value is the same in every row; returns (headers,
    rows, caption), the caption naming the dropped columns' common values."""
    keep, fixed = [], []
    for i, h in enumerate(headers):
        values = {row[i] for row in rows}
        if i < config_columns and len(values) == 1 and rows:
            fixed.append(f"{h} {next(iter(values))}")
        else:
            keep.append(i)
    return ([headers[i] for i in keep], [[row[i] for i in keep] for row in rows], ", ".join(fixed))


def to_rich(headers: Sequence[str], rows: Sequence[Sequence[str]], title: str = "peak memory per GPU (GB)",
            note: str = ""):
    """A ``rich.table.Table`` of the same content, constant configuration columns moved to
    the caption, followed by ``note``."""
    from rich.table import Table

    headers, rows, caption = compact(headers, rows)
    caption = "\n".join(c for c in (caption, note) if c)
    table = Table(title=title, caption=caption or None)
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i < 1 else "right",
                         style="dim" if "paper" in h else None)
    for row in rows:
        table.add_row(*[str(c) for c in row])
    return table


def write_csv(results: Sequence[dict], path: Path) -> Path:
    """One line per result (long format), including failed ones."""
    path = Path(path)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in results:
            row = dict(r)
            if r.get("peak_bytes") is not None:
                row["peak_gb"] = f"{r['peak_bytes'] / GB:.4f}"
            w.writerow(row)
    return path


def write_json(results: Sequence[dict], path: Path) -> Path:
    Path(path).write_text(json.dumps(list(results), indent=2, default=str) + "\n")
    return Path(path)


def plot_batches(results: Sequence[dict], path: Path, title: str = "peak memory per GPU") -> Optional[Path]:
    """Grouped bars: one group per table row (configuration), one bar per method, the
    paper's figures as hatched bars where known. None when matplotlib is not installed."""
    plt = _pyplot()
    if plt is None:
        return None
    methods = _methods(results)
    keys = sorted({_config_key(r) for r in results})
    by = {(_config_key(r), r["method"]): r for r in results if not r.get("error")}
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(keys) * max(1, len(methods))), 4.5))
    width = 0.8 / (2 * len(methods))
    for j, m in enumerate(methods):
        xs = [i + (2 * j) * width for i in range(len(keys))]
        bars = ax.bar(xs, [by[(k, m)]["peak_bytes"] / GB if (k, m) in by else 0 for k in keys], width,
                      label=f"{_label(m)} ({_sources(results, m)})")
        paper = [paper_gb(m, k[2], k[3]) if k[4] == 8 else None for k in keys]
        if any(p is not None for p in paper):
            ax.bar([x + width for x in xs], [p or 0 for p in paper], width, label=f"{_label(m)} (paper)",
                   hatch="//", fill=False, edgecolor=bars.patches[0].get_facecolor())
    ax.set_xticks([i + 0.4 - width for i in range(len(keys))])
    ax.set_xticklabels([_short_key(k) for k in keys], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("GB per GPU (10^9 bytes)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _sources(results: Sequence[dict], method: str) -> str:
    """"simulated", "measured" or both, for the legend: a simulated bar must say so."""
    found = sorted({r.get("source", "simulated") for r in results if r["method"] == method})
    return " and ".join(found) or "simulated"


#: caption of the scaling table: what its ratio column means
INCREMENT_RATIO_NOTE = ("increment ratio = (M(q) - M(q/2)) / (M(q/2) - M(q/4)): about 2 when memory grows "
                        "linearly in q, about 4 when it grows quadratically (q x q matrices)")
#: caption of trainer tables holding both VICReg and SFRIK
TRAINER_VICREG_NOTE = ("this trainer builds VICReg's covariance in column blocks (memory linear in q, like SFRIK's "
                       "chunked Gram), so both need the same memory; the paper's VICReg forms the q x q matrices")


def notes_for(results: Sequence[dict]) -> str:
    """Caption lines a reader needs to read a memory table of these results."""
    trainer_methods = {r["method"] for r in results if r.get("implementation", "trainer") == "trainer"}
    return TRAINER_VICREG_NOTE if {"vicreg", "sfrik"} <= trainer_methods else ""


def _short_key(key: tuple) -> str:
    impl, _, q, batch, world, stage, precision = key
    what = "paper" if impl == "paper" else f"Z{stage} {precision}"
    return f"{what}\nq={q} N={batch}"


def scaling_rows(results: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """Memory against q: one row per q, one column per (method, implementation), each followed
    by the ratio of successive increments, (M(q) - M(q/2)) / (M(q/2) - M(q/4)): it tends to 2
    for memory linear in q and to 4 for quadratic memory (the q-independent part cancels)."""
    series = sorted({(r["method"], r.get("implementation", "trainer")) for r in results})
    qs = sorted({int(r["q"]) for r in results})
    by = {(r["method"], r.get("implementation", "trainer"), int(r["q"])): r for r in results}
    headers = ["q"]
    for m, impl in series:
        headers += [f"{_label(m)} {impl} (GB)", f"{_label(m)} increment ratio"]
    rows = []
    for i, q in enumerate(qs):
        row = [str(q)]
        for m, impl in series:
            values = [by.get((m, impl, qq)) for qq in qs[max(0, i - 2):i + 1]]
            r = values[-1]
            if r is None or r.get("error"):
                row += ["-" if r is None else "error", ""]
                continue
            row.append(_gb(r["peak_bytes"] / GB))
            ok = len(values) == 3 and all(v is not None and not v.get("error") for v in values)
            if ok:
                a, b, c = (v["peak_bytes"] for v in values)
                row.append(f"{(c - b) / (b - a):.2f}" if b != a else "")
            else:
                row.append("")
        rows.append(row)
    return headers, rows


def plot_scaling(results: Sequence[dict], path: Path, title: str = "peak memory per GPU against q") -> Optional[Path]:
    """Log-log lines of memory against q per (method, implementation), with the q-dependent
    part's reference slopes 1 (linear) and 2 (quadratic). None without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return None
    series = sorted({(r["method"], r.get("implementation", "trainer")) for r in results})
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for m, impl in series:
        pts = sorted((int(r["q"]), r["peak_bytes"] / GB) for r in results
                     if r["method"] == m and r.get("implementation", "trainer") == impl and not r.get("error"))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    label=f"{_label(m)} ({impl}, {_sources(results, m)})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("embedding dimension q")
    ax.set_ylabel("GB per GPU (10^9 bytes)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
