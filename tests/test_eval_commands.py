"""End-to-end tests of the evaluation commands on generated data, on 1 and 2 CPU processes.

One tiny pretraining run (subprocess, ~10 s) serves the module. The 1-process commands run
in this process (environment restored afterwards); the 2-process ones run all commands in
one gloo process group (`sfrik_scale.spawn.run_ranks`: start-up dominates the cost), each
rank holding its own shard of the data. The same spawn runs the online evaluator's
2-rank check (tests/test_eval_online.py defines it).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sfrik_scale.data import SyntheticShapes
from sfrik_scale.data.synthetic import class_attributes
from sfrik_scale.eval import cli as eval_cli
from sfrik_scale.eval.multilabel import write_multilabel_list

from ._dist import run_ranks

TRAIN_IMAGES, VAL_IMAGES, BATCH = 64, 32, 16
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _data_args(out: Path) -> list[str]:
    return ["--synthetic-size", str(TRAIN_IMAGES), "--synthetic-val-size", str(VAL_IMAGES), "--workers", "0",
            "--no-progress", "--out", str(out)]


def commands(run_dir: Path, out: Path, voc: Path) -> dict[str, list[str]]:
    """argv of every command, writing under ``out``."""
    return {
        "linear": ["linear-eval", str(run_dir), "--protocol", "sgd", "--epochs", "2", "--batch-size", str(BATCH),
                   *_data_args(out / "linear")],
        "probe": ["linear-eval", str(run_dir), "--Cs", "0.1", "1", "10", *_data_args(out / "probe")],
        "probe_pixels": ["linear-eval", str(run_dir), "--raw-pixels", "--Cs", "0.1", "1", *_data_args(out / "probe_pixels")],
        "supervised": ["supervised", str(run_dir), "--epochs", "1", "--batch-size", str(BATCH),
                       *_data_args(out / "supervised")],
        "knn": ["knn-eval", str(run_dir), "--k", "5", "20", *_data_args(out / "knn")],
        "finetune": ["finetune", str(run_dir), "--epochs", "1", "--batch-size", str(BATCH), "--label-fraction", "0.25",
                     *_data_args(out / "finetune")],
        "svm": ["svm-eval", str(run_dir), "--train-list", str(voc / "trainval.txt"), "--test-list",
                str(voc / "test.txt"), "--costs", "0.1,1", "--workers", "0", "--no-progress", "--out", str(out / "svm")],
    }


def run_commands(run_dir: Path, out: Path, voc: Path) -> dict:
    """Run every command; return the result files and the trained linear head."""
    for name, argv in commands(run_dir, out, voc).items():
        assert eval_cli.main(argv) == 0, name
    results = {name: json.loads((out / name / "result.json").read_text()) for name in commands(run_dir, out, voc)}
    head = torch.load(out / "linear" / "checkpoint.pt", weights_only=True)["model"]
    return {"results": results, "head": {k: v.numpy() for k, v in head.items()}, "out": out}


def _commands_worker(rank: int, world: int, run_dir: str, out: str, voc: str) -> dict:
    from .test_eval_online import online_ranks_worker

    return {**run_commands(Path(run_dir), Path(out), Path(voc)), "online": online_ranks_worker(rank, world)}


def make_multilabel_lists(folder: Path) -> Path:
    """Synthetic images as PNG files + multi-label lists (classes round / warm / textured, some difficult)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("trainval", 36), ("test", 24)):
        ds = SyntheticShapes(num_samples=n, num_classes=15, image_size=24, split="train" if split == "trainval" else "val")
        paths, labels = [], []
        for i in range(n):
            img, c = ds[i]
            shape, hue, texture = class_attributes(c)
            path = f"images/{split}_{i:03d}.png"
            (folder / "images").mkdir(exist_ok=True)
            img.save(folder / path)
            row = [1 if shape in ("disk", "ring") else -1, 1 if hue < 0.3 else -1, 1 if texture != "flat" else -1]
            if i % 7 == 3:
                row[0] = 0  # difficult
            paths.append(path)
            labels.append(row)
        write_multilabel_list(folder / f"{split}.txt", paths, np.array(labels), ["round", "warm", "textured"])
    return folder


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pretrain")
    run_dir = root / "run"
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    cmd = [sys.executable, "-m", "sfrik_scale.cli", "pretrain", "model.projector=64-64-128",
           "data.synthetic_size=128", "data.image_size=32", "train.global_batch_size=32", "train.max_steps=2",
           f"train.run_dir={run_dir}", "data.num_workers=0", "monitor.progress=false"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def voc_lists(tmp_path_factory) -> Path:
    return make_multilabel_lists(tmp_path_factory.mktemp("voc"))


@pytest.fixture
def clean_env():
    """The in-process commands resolve a single-process launch into os.environ: restore it after."""
    saved = {k: os.environ.get(k) for k in LAUNCH_VARS}
    for k in LAUNCH_VARS:
        os.environ.pop(k, None)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def one_process(pretrain_run, voc_lists, tmp_path_factory) -> dict:
    saved = {k: os.environ.pop(k, None) for k in LAUNCH_VARS}
    try:
        return run_commands(pretrain_run, tmp_path_factory.mktemp("world1"), voc_lists)
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v


@pytest.fixture(scope="module")
def two_processes(pretrain_run, voc_lists, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("world2")
    results = run_ranks(_commands_worker, 2, str(pretrain_run), str(out), str(voc_lists), timeout=240)
    return {"rank0": results[0], "rank1": results[1], "out": out}


# ---------------------------------------------------------------------------------------------
def test_every_result_has_top1_top5_last_and_best(one_process):
    for name in ("linear", "finetune"):
        m = one_process["results"][name]["metrics"]
        assert {"top1", "top5", "best_top1", "best_top5", "best_epoch"} <= set(m)
        assert 0 <= m["top1"] <= m["top5"] <= 100 and m["best_top1"] >= m["top1"]
    assert set(one_process["results"]["knn"]["metrics"]["per_k"]) == {"5", "20"}
    assert 0 <= one_process["results"]["svm"]["metrics"]["map"] <= 100


def test_results_describe_source_data_and_hyperparameters(one_process, pretrain_run):
    r = one_process["results"]["linear"]
    assert r["source"]["kind"] == "run" and r["source"]["tag"] == "step000000002"
    assert r["source"]["pretrain"]["method"] == "sfrik" and r["source"]["pretrain"]["q"] == 128
    assert r["data"]["train_images"] == TRAIN_IMAGES and r["data"]["val_images"] == VAL_IMAGES
    assert r["hyperparameters"]["head_lr"] == 0.4 and r["hyperparameters"]["weight_decay"] == 1e-6
    assert not r["transfer"] and r["world_size"] == 1


def test_linear_eval_writes_tensorboard_events_and_per_epoch_summary(one_process):
    out = one_process["out"] / "linear"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    summary = json.loads((out / "summary.json").read_text())
    assert [e["epoch"] for e in summary["epochs"]] == [0, 1]
    history = one_process["results"]["linear"]["history"]
    assert [h["epoch"] for h in history] == [0, 1] and all("train_loss" in h for h in history)


@pytest.mark.distributed
def test_linear_eval_on_two_processes_takes_the_single_process_steps(one_process, two_processes):
    for rank in ("rank0", "rank1"):
        for k, v in one_process["head"].items():
            np.testing.assert_allclose(two_processes[rank]["head"][k], v, rtol=1e-4, atol=1e-6)
    assert two_processes["rank0"]["results"]["linear"]["world_size"] == 2
    assert two_processes["rank0"]["results"]["linear"]["metrics"]["top1"] == pytest.approx(
        one_process["results"]["linear"]["metrics"]["top1"], abs=100 / VAL_IMAGES)


def test_feature_probe_defaults_at_small_sizes_and_validates_C(one_process):
    r = one_process["results"]["probe"]
    assert r["kind"] == "linear" and r["hyperparameters"]["protocol"] == "features"
    assert r["hyperparameters"]["Cs"] == [0.1, 1.0, 10.0] and r["metrics"]["C"] in (0.1, 1.0, 10.0)
    assert set(r["metrics"]["holdout_top1"]) == {"0.1", "1", "10"}
    assert r["metrics"]["feature_dim"] == 128 and r["metrics"]["train_images"] == TRAIN_IMAGES  # tiny_cnn width
    assert 0 <= r["metrics"]["top1"] <= r["metrics"]["top5"] <= 100
    assert one_process["results"]["linear"]["hyperparameters"]["protocol"] == "sgd"
    assert one_process["results"]["linear"]["hyperparameters"]["crop_scale"] == [0.5, 1.0]  # 32 px default


def test_raw_pixel_probe_reads_the_flattened_input(one_process):
    r = one_process["results"]["probe_pixels"]
    assert r["source"]["raw_pixels"] and not r["source"]["random_init"]
    assert r["metrics"]["feature_dim"] == 3 * 32 * 32


def test_supervised_upper_bound_trains_a_random_init_backbone_end_to_end(one_process):
    r = one_process["results"]["supervised"]
    assert r["kind"] == "supervised" and r["source"]["random_init"] and r["source"]["tag"] is None
    assert r["hyperparameters"]["finetune"] and r["hyperparameters"]["backbone_lr"] == 0.05
    assert 0 <= r["metrics"]["top1"] <= 100 and r["metrics"]["epochs"] == 1


@pytest.mark.distributed
def test_feature_probe_on_two_processes_matches_one_process(one_process, two_processes):
    one, two = one_process["results"]["probe"], two_processes["rank0"]["results"]["probe"]
    assert two["world_size"] == 2 and two["metrics"]["C"] == one["metrics"]["C"]
    assert two["metrics"]["top1"] == pytest.approx(one["metrics"]["top1"], abs=100 / VAL_IMAGES)
    assert two["metrics"]["holdout_top1"] == pytest.approx(one["metrics"]["holdout_top1"], abs=100 / 13)  # 13 held out


@pytest.mark.distributed
def test_knn_eval_on_two_processes_matches_one_process(one_process, two_processes):
    one = one_process["results"]["knn"]["metrics"]["per_k"]
    two = two_processes["rank0"]["results"]["knn"]["metrics"]["per_k"]
    for k in one:
        assert two[k]["top1"] == pytest.approx(one[k]["top1"], abs=100 / VAL_IMAGES)
        assert two[k]["top5"] == pytest.approx(one[k]["top5"], abs=100 / VAL_IMAGES)


@pytest.mark.distributed
def test_finetune_on_two_processes_uses_the_same_balanced_subset(one_process, two_processes):
    one, two = one_process["results"]["finetune"], two_processes["rank0"]["results"]["finetune"]
    assert two["data"]["labelled_images"] == one["data"]["labelled_images"] < TRAIN_IMAGES
    assert two["world_size"] == 2 and 0 <= two["metrics"]["top1"] <= 100
    subset = (two_processes["out"] / "finetune" / "labelled_subset.txt").read_text().split()
    assert len(subset) == two["data"]["labelled_images"]


@pytest.mark.distributed
def test_svm_eval_on_two_processes_matches_one_process(one_process, two_processes):
    one, two = one_process["results"]["svm"]["metrics"], two_processes["rank0"]["results"]["svm"]["metrics"]
    assert two["chosen_costs"] == one["chosen_costs"]
    assert two["map"] == pytest.approx(one["map"], abs=1e-3)


def test_linear_eval_resumes_after_an_interrupted_epoch(pretrain_run, one_process, tmp_path, clean_env, monkeypatch):
    from sfrik_scale.eval.classifier import ClassifierTraining

    argv = commands(pretrain_run, tmp_path, tmp_path)["linear"]
    original = ClassifierTraining.train_epoch

    def crash_in_second_epoch(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt("preempted")
        return original(self, epoch)

    monkeypatch.setattr(ClassifierTraining, "train_epoch", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        eval_cli.main(argv)
    assert torch.load(tmp_path / "linear" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(ClassifierTraining, "train_epoch", original)
    assert eval_cli.main(argv) == 0
    head = torch.load(tmp_path / "linear" / "checkpoint.pt", weights_only=True)["model"]
    for k, v in one_process["head"].items():
        np.testing.assert_allclose(head[k].numpy(), v, rtol=1e-5, atol=1e-7)


def test_knn_eval_reads_an_export_like_the_run_and_random_init_differs(pretrain_run, one_process, tmp_path, clean_env):
    from sfrik_scale.export import export_run

    export_run(pretrain_run, tmp_path / "export")
    argv = ["knn-eval", str(tmp_path / "export"), "--k", "5", "20", *_data_args(tmp_path / "knn_export")]
    assert eval_cli.main(argv) == 0
    exported = json.loads((tmp_path / "knn_export" / "result.json").read_text())
    assert exported["source"]["kind"] == "export" and exported["source"]["backbone"] == "tiny_cnn"
    for k, expected in one_process["results"]["knn"]["metrics"]["per_k"].items():
        assert exported["metrics"]["per_k"][k] == pytest.approx(expected)
    argv = ["knn-eval", str(pretrain_run), "--random-init", "--k", "5", *_data_args(tmp_path / "knn_random")]
    assert eval_cli.main(argv) == 0
    random = json.loads((tmp_path / "knn_random" / "result.json").read_text())
    assert random["source"]["random_init"] and random["source"]["tag"] is None


def test_report_tabulates_every_result_of_the_run(one_process, tmp_path, capsys):
    from sfrik_scale.cli import main

    files = []
    for name, result in one_process["results"].items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "result.json").write_text(json.dumps(result))
        files.append(str(tmp_path / name))
    assert main(["report", *files, "--out", str(tmp_path / "table.md")]) == 0
    table = capsys.readouterr().out
    header = table.splitlines()[0]
    for column in ("method", "q", "L", "epochs", "linear top-1", "linear top-5", "kNN top-1",
                   "semi 25% top-1", "voc07 mAP"):
        assert column in header
    assert table.splitlines()[2].startswith("| SFRIK | 128 | 3 |")
    assert (tmp_path / "table.md").read_text() == table


def test_a_source_that_is_not_a_run_fails_with_one_clear_line(tmp_path, capsys, clean_env):
    assert eval_cli.main(["linear-eval", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "neither a pretraining run directory" in err and "Traceback" not in err


@pytest.mark.distributed
def test_online_evaluator_on_two_ranks_averages_heads_and_agrees_on_scores(two_processes):
    ranks = [two_processes["rank0"]["online"], two_processes["rank1"]["online"]]
    for i in range(2):
        mean = (ranks[0]["local"][i] + ranks[1]["local"][i]) / 2
        assert not np.allclose(ranks[0]["local"][i], ranks[1]["local"][i])  # different data per rank
        np.testing.assert_allclose(ranks[0]["averaged"][i], mean, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(ranks[1]["averaged"][i], mean, rtol=1e-5, atol=1e-7)
    assert ranks[0]["values"] == pytest.approx(ranks[1]["values"])  # merged kNN votes, all-reduced sums



@pytest.mark.parametrize("option, match", [
    (["--eval-every", "0"], "--eval-every must be >= 1"),
    (["--label-fraction", "1.5"], "--label-fraction must be in"),
    (["--crop-scale", "0.5", "0.1"], "--crop-scale must satisfy"),
])
def test_bad_options_fail_with_one_clear_line(pretrain_run, tmp_path, capsys, clean_env, option, match):
    argv = ["linear-eval", str(pretrain_run), "--protocol", "sgd", *option, "--no-progress", "--out", str(tmp_path / "o")]
    assert eval_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
