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


def with_protocol(r, protocol):
    r["hyperparameters"] = {"protocol": protocol}
    return r


def pixels(**metrics):
    r = with_protocol(result("linear", run="/runs/b", random=True, **metrics), "features")
    r["source"].update(random_init=False, raw_pixels=True)
    return r


BASELINES = [
    result("supervised", run="/runs/a", random=True, top1=99.0, top5=100.0, best_top1=99.2, best_top5=100.0),
    with_protocol(result("linear", random=True, top1=90.0, top5=99.0, best_top1=90.0, best_top5=99.0), "features"),
    pixels(top1=97.0, top5=100.0, best_top1=97.0, best_top5=100.0),
    with_protocol(result("linear", top1=98.5, top5=100.0, best_top1=98.5, best_top5=100.0), "features"),
    result("knn", top1=98.0, top5=100.0),
]


def test_baselines_follow_the_methods_and_the_supervised_accuracy_fills_the_classification_columns():
    columns, rows = build_table(BASELINES)
    assert columns == ["method", "q", "L", "epochs", "probe top-1", "linear top-1", "linear top-5", "kNN top-1"]
    assert [r[0] for r in rows] == ["SFRIK", "raw pixels", "random init (resnet50)", "supervised (resnet50)"]
    assert rows[0][4:] == ["98.50", "-", "-", "98.00"]
    assert rows[1][1:5] == ["-", "-", "-", "97.00"]
    assert rows[3][4:7] == ["99.20", "99.20", "100.00"]


def test_merge_seeds_gives_mean_and_sd_per_configuration():
    runs = []
    for seed, (probe, knn) in enumerate([(98.0, 97.0), (99.0, 98.0), (98.5, 99.0)]):
        run = f"/runs/s{seed}"
        for r in (with_protocol(result("linear", run=run, top1=probe, best_top1=probe), "features"),
                  result("knn", run=run, top1=knn)):
            r["source"]["pretrain"]["seed"] = seed
            runs.append(r)
    other = with_protocol(result("linear", run="/runs/v", method="vicreg", L=None, top1=97.0, best_top1=97.0),
                          "features")
    columns, rows = build_table(runs + [other], merge_seeds=True)
    assert len(rows) == 2
    assert rows[0][4] == "98.50 ± 0.50 (3)" and rows[0][-1] == "98.00 ± 1.00 (3)"
    assert rows[1][0] == "VICReg" and rows[1][4] == "97.00"


def test_transpose_puts_methods_in_columns():
    from sfrik_scale.eval.report import transpose

    columns, rows = transpose(*build_table(BASELINES))
    assert columns == ["metric", "SFRIK L = 3", "raw pixels", "random init (resnet50)", "supervised (resnet50)"]
    assert [r[0] for r in rows] == ["q", "epochs", "probe top-1", "linear top-1", "linear top-5", "kNN top-1"]
    assert rows[2] == ["probe top-1", "98.50", "97.00", "90.00", "99.20"]
