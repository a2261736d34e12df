"""Tests of sfrik_scale.eval.report: grouping results into the comparison table."""
from __future__ import annotations

import json

import pytest

from sfrik_scale.eval.common import RESULT_SCHEMA
from sfrik_scale.eval.report import build_table, collect_results, to_markdown


def result(kind, run="/runs/a", tag="step000000010", method="sfrik", q=8192, L=3, epochs=100, random=False,
           benchmark="imagenet", transfer=False, fraction=1.0, finished="2026-01-01T00:00:00", **metrics):
    return {"schema": RESULT_SCHEMA, "kind": kind, "benchmark": benchmark, "transfer": transfer,
            "source": {"run_dir": run, "path": run, "tag": None if random else tag, "backbone": "resnet50",
                       "random_init": random, "pretrain": {"method": method, "q": q, "L": L, "epochs": epochs}},
            "data": {"benchmark": benchmark, "labelled_fraction": fraction,
                     "label_fraction": fraction if fraction < 1 else None},
            "metrics": metrics, "finished": finished}


RESULTS = [
    result("linear", top1=70.0, top5=89.0, best_top1=70.5, best_top5=89.5),
    result("knn", top1=60.0, top5=80.0),
    result("finetune", fraction=0.01, top1=50.0, top5=75.0, best_top1=51.0, best_top5=76.0),
    result("finetune", fraction=0.1, top1=65.0, top5=86.0, best_top1=66.0, best_top5=87.0),
    result("linear", benchmark="places205", transfer=True, top1=50.0, top5=80.0, best_top1=51.0, best_top5=81.0),
    result("svm", benchmark="voc07", transfer=True, map=85.25),
    result("linear", run="/runs/b", method="vicreg", L=None, top1=68.0, top5=88.0, best_top1=68.2, best_top5=88.1),
    result("linear", random=True, top1=5.0, top5=12.0, best_top1=5.1, best_top5=12.5),
]


def test_table_has_the_papers_columns_and_one_row_per_weights():
    columns, rows = build_table(RESULTS)
    assert columns == ["method", "q", "L", "epochs", "linear top-1", "linear top-5", "kNN top-1",
                       "semi 1% top-1", "semi 1% top-5", "semi 10% top-1", "semi 10% top-5",
                       "places205 top-1", "places205 top-5", "voc07 mAP"]
    assert rows[0] == ["SFRIK", "8192", "3", "100", "70.50", "89.50", "60.00", "51.00", "76.00", "66.00", "87.00",
                       "51.00", "81.00", "85.25"]
    assert rows[1][:6] == ["VICReg", "8192", "-", "100", "68.20", "88.10"] and rows[1][6:] == ["-"] * 8
    assert rows[2][:6] == ["random init (resnet50)", "-", "-", "-", "5.10", "12.50"]


def test_last_epoch_metric_and_the_most_recent_result_win():
    newer = result("linear", top1=71.0, top5=90.0, best_top1=72.0, best_top5=91.0, finished="2026-02-01T00:00:00")
    _, rows = build_table(RESULTS + [newer], metric="last")
    assert rows[0][4:6] == ["71.00", "90.00"]


def test_markdown_table_is_well_formed():
    columns, rows = build_table(RESULTS[:1])
    text = to_markdown(columns, rows)
    lines = text.splitlines()
    assert lines[0] == "| method | q | L | epochs | linear top-1 | linear top-5 |"
    assert lines[1] == "|---|---:|---:|---:|---:|---:|"
    assert lines[2] == "| SFRIK | 8192 | 3 | 100 | 70.50 | 89.50 |"


def test_collect_results_walks_folders_and_refuses_foreign_json(tmp_path):
    (tmp_path / "run" / "eval" / "linear").mkdir(parents=True)
    (tmp_path / "run" / "eval" / "linear" / "result.json").write_text(json.dumps(RESULTS[0]))
    (tmp_path / "run" / "summary.json").write_text("{}")
    assert len(collect_results([tmp_path / "run", tmp_path / "run" / "eval" / "linear"])) == 1
    (tmp_path / "other.json").write_text(json.dumps({"epochs": []}))
    with pytest.raises(ValueError, match="not an sfrik-scale evaluation result"):
        collect_results([tmp_path / "other.json"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no result.json"):
        collect_results([tmp_path / "empty"])
