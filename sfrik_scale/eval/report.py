"""``sfrik-scale report``: the paper's comparison table from evaluation result files.

    sfrik-scale report runs/sfrik_q8192 runs/vicreg runs/random_init/eval/linear-imagenet/result.json

Each argument is a ``result.json``, a folder holding one, or any folder (a pretraining run:
every ``result.json`` below it is collected). Results are grouped by the evaluated weights
(run directory and checkpoint tag, or one of the baselines); one row per group:

    method | q | L | epochs | probe top-1 | linear top-1 | linear top-5 | kNN top-1 | semi 1% top-1 | ... | <transfer> ...

- probe: the frozen-feature logistic regression (``linear-eval --protocol features``);
  linear: the augmented SGD probe (``--protocol sgd``); kNN: ``knn-eval``; all on the
  pretraining data with all labels;
- semi-supervised: fine-tuning results, one column pair per labelled fraction (1 %, 10 %, ...: the
  requested ``--label-fraction``, else the fraction of labelled images actually used);
- transfer: linear results on other datasets (``<benchmark> top-1/top-5``) and SVM results
  (``<benchmark> mAP``).
Accuracies are the best over the evaluated epochs (``--metric last``: the last epoch); when
a group holds several results of the same kind, the most recent one counts.

The baselines of docs/evaluation.md come after the pretrained rows, in this order: raw
pixels (``--raw-pixels``), the random-init backbone (``--random-init``) and the supervised
upper bound (``sfrik-scale supervised``), whose end-to-end val accuracy fills the probe and
linear columns. ``--merge-seeds`` merges the rows of runs that differ only by their seed
into "mean ± standard deviation (number of runs)"; ``--transpose`` puts the methods in the
columns, as the SFRIK paper's tables do. The table is printed as Markdown on stdout
(``--out`` also writes it to a file) and as a rich table on stderr.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Iterable, Optional, Sequence

from ..losses import display_name
from .common import RESULT_FILE, RESULT_SCHEMA, fmt



def collect_results(paths: Iterable[str | Path]) -> list[dict]:
    """Load every result file named by or found under ``paths`` (see the module docstring)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            found.append(p)
        elif (p / RESULT_FILE).is_file():
            found.append(p / RESULT_FILE)
        elif p.is_dir():
            found.extend(sorted(p.rglob(RESULT_FILE)))
        else:
            raise FileNotFoundError(f"{p} does not exist")
    results, seen = [], set()
    for f in found:
        key = f.resolve()
        if key in seen:
            continue
        seen.add(key)
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{f} is not valid JSON: {err}") from None
        if not isinstance(data, dict) or data.get("schema") != RESULT_SCHEMA:
            raise ValueError(f"{f} is not an sfrik-scale evaluation result (schema {RESULT_SCHEMA})")
        data["_file"] = str(f)
        results.append(data)
    if not results:
        raise ValueError(f"no {RESULT_FILE} found under {', '.join(map(str, paths))}")
    return results


_BASELINES = ("pixels", "random", "supervised")  # row order after the pretrained rows


def _baseline(result: dict) -> str | None:
    src = result["source"]
    if src.get("raw_pixels"):
        return "pixels"
    if result.get("kind") == "supervised":
        return "supervised"
    return "random" if src.get("random_init") else None


def _group_key(result: dict) -> tuple:
    src = result["source"]
    where = src.get("run_dir") or src.get("path")
    baseline = _baseline(result)
    if baseline == "pixels":  # the same input whatever run it was evaluated from
        return (None, None, baseline, None)
    return (str(Path(where).resolve()) if where else None, src.get("tag"), baseline,
            src.get("backbone") if baseline else None)


def _method(src: dict, baseline: str | None = None) -> str:
    if baseline == "pixels":
        return "raw pixels"
    if baseline == "supervised":
        return f"supervised ({src.get('backbone')})"
    if baseline == "random" or src.get("random_init"):
        return f"random init ({src.get('backbone')})"
    name = (src.get("pretrain") or {}).get("method")
    return display_name(name) or src.get("backbone") or "?"


def _fraction_label(fraction: float) -> str:
    pct = 100.0 * fraction
    return f"{pct:.0f}%" if abs(pct - round(pct)) < 0.05 else f"{pct:.1f}%"


def build_table(results: Sequence[dict], metric: str = "best",
                merge_seeds: bool = False) -> tuple[list[str], list[list[str]]]:
    """(columns, rows) of the comparison table; empty optional columns are dropped.

    ``merge_seeds``: rows whose runs differ only by ``train.seed`` (same method, q, L,
    coefficients, epochs, batch, data; baselines: the same label) become one row of
    "mean ± sd (n)" cells."""
    columns, rows, signatures = _table(results, metric)
    if merge_seeds:
        rows = _merge_rows(rows, signatures)
    return columns, rows


def _table(results: Sequence[dict], metric: str) -> tuple[list[str], list[list[str]], list[tuple]]:
    if metric not in ("best", "last"):
        raise ValueError(f"metric must be 'best' or 'last', got {metric!r}")
    top1, top5 = ("best_top1", "best_top5") if metric == "best" else ("top1", "top5")
    groups: dict[tuple, dict[str, dict]] = {}
    signatures: list[tuple] = []
    order: list[tuple] = []
    semi_fractions: set[str] = set()
    transfer_cols: list[str] = []
    for r in sorted(results, key=lambda r: r.get("finished", "")):
        key = _group_key(r)
        if key not in groups:
            groups[key] = {}
            order.append(key)
        data, kind = r.get("data", {}), r.get("kind")
        full = data.get("labelled_fraction", 1.0) >= 0.999
        features = (r.get("hyperparameters") or {}).get("protocol") == "features"
        if kind == "supervised" and not r.get("transfer"):
            slot = "supervised"
        elif kind == "linear" and features and not r.get("transfer") and full:
            slot = "probe"
        elif kind == "linear" and not r.get("transfer") and full:
            slot = "linear"
        elif kind == "knn" and not r.get("transfer") and full:
            slot = "knn"
        elif kind == "finetune":
            slot = "semi " + _fraction_label(data.get("label_fraction") or data.get("labelled_fraction", 1.0))
            semi_fractions.add(slot)
        elif kind in ("linear", "svm", "knn"):
            slot = f"{'probe' if features else kind}:{r.get('benchmark') or data.get('benchmark')}"
            if slot not in transfer_cols:
                transfer_cols.append(slot)
        else:
            continue
        groups[key][slot] = r  # sorted by time: the most recent wins
    semi = sorted(semi_fractions, key=lambda s: float(s.split()[1].rstrip("%")))
    columns = ["method", "q", "L", "epochs", "probe top-1", "linear top-1", "linear top-5", "kNN top-1"]
    for s in semi:
        columns += [f"{s} top-1", f"{s} top-5"]
    for t in transfer_cols:
        kind, bench = t.split(":", 1)
        columns += [f"{bench} mAP"] if kind == "svm" else [f"{bench} kNN top-1"] if kind == "knn" else \
            [f"{bench} probe top-1"] if kind == "probe" else [f"{bench} top-1", f"{bench} top-5"]
    rows = []
    order = [k for k in order if k[2] is None] + [k for b in _BASELINES for k in order if k[2] == b]
    for key in order:
        slots = groups[key]
        any_result = next(iter(slots.values()), None)
        if any_result is None:
            continue
        src = any_result["source"]
        pre = src.get("pretrain") or {}
        baseline = key[2]
        row = [_method(src, baseline)] + (["-"] * 3 if baseline else
                                          [_int(pre.get("q")), _int(pre.get("L")), _int(pre.get("epochs"))])
        sup = slots.get("supervised", {}).get("metrics", {})
        probe = slots.get("probe", {}).get("metrics", {}) or {"top1": sup.get(top1)}
        lin = slots.get("linear", {}).get("metrics", {}) or sup
        row += [fmt(probe.get("top1")), fmt(lin.get(top1)), fmt(lin.get(top5)),
                fmt(slots.get("knn", {}).get("metrics", {}).get("top1"))]
        for s in semi:
            m = slots.get(s, {}).get("metrics", {})
            row += [fmt(m.get(top1)), fmt(m.get(top5))]
        for t in transfer_cols:
            m = slots.get(t, {}).get("metrics", {})
            kind = t.split(":", 1)[0]
            row += [fmt(m.get("map"))] if kind == "svm" else [fmt(m.get("top1"))] if kind in ("knn", "probe") else \
                [fmt(m.get(top1)), fmt(m.get(top5))]
        rows.append(row)
        signatures.append((row[0],) if baseline else
                          (row[0], src.get("backbone"), json.dumps({k: v for k, v in pre.items() if k != "seed"},
                                                                   sort_keys=True, default=str)))
    keep = [i for i, c in enumerate(columns) if i < 4 or any(r[i] != "-" for r in rows)]
    return [columns[i] for i in keep], [[r[i] for i in keep] for r in rows], signatures


def _merge_rows(rows: list[list[str]], signatures: list[tuple]) -> list[list[str]]:
    """One row per signature; numeric cells become "mean ± sd (n)" when several rows have them."""
    merged: dict[tuple, list[list[str]]] = {}
    for row, sig in zip(rows, signatures):
        merged.setdefault(sig, []).append(row)
    out = []
    for group in merged.values():
        row = list(group[0][:4])
        for i in range(4, len(group[0])):
            values = [float(r[i]) for r in group if r[i] != "-"]
            if len(values) > 1:
                row.append(f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} ({len(values)})")
            else:
                row.append(fmt(values[0]) if values else "-")
        out.append(row)
    return out


def transpose(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> tuple[list[str], list[list[str]]]:
    """Methods as columns (label: method, with L for SFRIK), the metrics as rows."""
    labels = [r[0] if r[2] == "-" else f"{r[0]} L = {r[2]}" for r in rows]
    return ["metric"] + labels, [[columns[i]] + [r[i] for r in rows] for i in range(1, len(columns))
                                 if columns[i] != "L"]


def _int(x) -> str:
    return "-" if x is None else str(x)


def to_markdown(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub Markdown table; numeric columns right-aligned."""
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def print_rich(columns: Sequence[str], rows: Sequence[Sequence[str]], title: str = "sfrik-scale report") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r)
    Console(stderr=True).print(table)


def report(paths: Sequence[str], out: Optional[str] = None, metric: str = "best", rich: bool = True,
           merge_seeds: bool = False, transposed: bool = False) -> str:
    """Collect, tabulate, print; returns the Markdown text."""
    results = collect_results(paths)
    columns, rows = build_table(results, metric, merge_seeds=merge_seeds)
    if transposed:
        columns, rows = transpose(columns, rows)
    text = to_markdown(columns, rows)
    if rich:
        print_rich(columns, rows, title=f"sfrik-scale report ({len(results)} results, {metric} accuracy, %)")
    if out:
        Path(out).write_text(text)
    return text
