"""VOC07 transfer: per-class linear SVMs on frozen features with a cost sweep, scored by mAP.

The protocol of Goyal et al. (2019, "Scaling and benchmarking self-supervised visual
representation learning"; fair_self_supervision_benchmark), used by PIRL and, through
VISSL, by VICReg and SFRIK:
- features of the frozen backbone (eval mode, resize 256/224 x size (whole image up to 64 px) + center crop),
  L2-normalised (``x / (|x| + 1e-5)``);
- for every class and every cost C of the sweep (default: 1e-7, 1e-6, ..., 100 and
  0.5^4, ..., 0.5^19), a linear SVM (scikit-learn ``LinearSVC``: squared hinge, L2,
  class_weight {+1: 2, -1: 1}, intercept_scaling 1, tol 1e-4, dual, max_iter 2000) is
  scored by 3-fold cross-validated average precision on trainval; difficult images count
  as negatives for training (as in the benchmark);
- the cost with the best cross-validated AP is kept per class; its SVM, trained on all of
  trainval, is scored on test, difficult images ignored;
- mAP = mean over classes of the test AP, in percent.

AP: ``ap="standard"`` (default) is the area under the precision/recall curve with
precision made monotone (the all-point interpolated AP of the VOC2010+ devkit, which the
benchmark's ``calculate_ap`` computes); ``ap="11point"`` is the original VOC2007 devkit
metric (mean of the interpolated precision at recall 0, 0.1, ..., 1). The result file says
which was used.

    sfrik-scale svm-eval RUN_DIR --voc-root /data/VOCdevkit/VOC2007
    sfrik-scale svm-eval RUN_DIR --train-list trainval.txt --test-list test.txt   # multilabel.py format

Distributed: each rank encodes its block of both splits; the features are gathered on
every rank (VOC07: 5011 + 4952 images), and rank r trains the classes r, r + world, ...;
the per-class results are all-gathered. Resumable: features are cached in
``OUT/cache/`` and every finished class is saved in ``OUT/svm/``.
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .. import comm
from ..data import build_eval_transform
from ..topology import Topology
from .common import ProgressBar, base_result, finish_result, gather_rows, print_header, write_json
from .features import extract_features
from .multilabel import MultiLabelImages
from .session import open_backbone
from .source import BackboneSource

#: Goyal et al.'s sweep: the listed costs plus 0.5^4 ... 0.5^19, sorted.
DEFAULT_COSTS = tuple(sorted({1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0}
                             | {0.5 ** k for k in range(4, 20)}))
AP_MODES = ("standard", "11point")


def average_precision(scores: Sequence[float], labels: Sequence[int], mode: str = "standard") -> float:
    """AP of ``scores`` for labels in {1 (positive), -1 (negative), 0 (difficult: ignored)}.

    ``mode``: "standard" (all-point interpolated) or "11point" (VOC2007); see the module
    docstring. NaN when there is no positive. Ties are broken by index (stable sort).

    Example:
        >>> average_precision([0.9, 0.8, 0.7, 0.6, 0.5], [1, -1, 1, -1, 1])   # 1/3 (1 + 2/3 + 3/5)
        0.7555...
    """
    if mode not in AP_MODES:
        raise ValueError(f"ap mode must be one of {AP_MODES}, got {mode!r}")
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D of equal length, got {scores.shape} and {labels.shape}")
    keep = labels != 0
    scores, positive = scores[keep], labels[keep] > 0
    n_pos = int(positive.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(positive[order])
    fp = np.cumsum(~positive[order])
    recall = tp / n_pos
    precision = tp / (tp + fp)
    if mode == "11point":
        return float(np.mean([precision[recall >= t].max() if (recall >= t).any() else 0.0
                              for t in np.linspace(0.0, 1.0, 11)]))
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision made monotone (max to the right)
    steps = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
    return float(np.sum((mrec[steps] - mrec[steps - 1]) * mpre[steps]))


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """``x / (|x| + 1e-5)`` per row, float64 (the benchmark's normalisation)."""
    x = np.asarray(x, dtype=np.float64)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-5)


def _svm(cost: float, seed: int):
    from sklearn.svm import LinearSVC

    return LinearSVC(C=cost, class_weight={1: 2, -1: 1}, intercept_scaling=1.0, penalty="l2", loss="squared_hinge",
                     tol=1e-4, dual=True, max_iter=2000, random_state=seed)


def train_class_svm(train_x: np.ndarray, train_labels: np.ndarray, test_x: np.ndarray, test_labels: np.ndarray,
                    costs: Sequence[float] = DEFAULT_COSTS, folds: int = 3, ap: str = "standard",
                    seed: int = 0) -> dict:
    """The cost sweep of one class.

    Args:
        train_x, test_x: (n, D) normalised features.
        train_labels, test_labels: (n,) values in {1, -1, 0} for this class.

    Returns: {"cv_ap": [per cost], "cost": chosen, "test_ap": AP at the chosen cost,
    "test_ap_per_cost": [per cost]} (APs as fractions).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import cross_val_score

    y = np.where(np.asarray(train_labels) > 0, 1, -1)  # difficult -> negative for training
    if (y > 0).sum() < folds or (y < 0).sum() < folds:
        raise ValueError(f"a class needs at least {folds} positive and {folds} negative training images "
                         f"for {folds}-fold cross-validation, got {(y > 0).sum()} and {(y < 0).sum()}")
    cv_ap, test_ap = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter 2000 is part of the protocol
        for cost in costs:
            cv_ap.append(float(cross_val_score(_svm(cost, seed), train_x, y, cv=folds,
                                               scoring="average_precision").mean()))
            clf = _svm(cost, seed).fit(train_x, y)
            test_ap.append(average_precision(clf.decision_function(test_x), test_labels, ap))
    best = int(np.argmax(cv_ap))  # first of the best: ties go to the smaller cost
    return {"cv_ap": cv_ap, "cost": float(costs[best]), "test_ap": test_ap[best], "test_ap_per_cost": test_ap}


def run_svm_eval(topo: Topology, source: BackboneSource, train: MultiLabelImages, test: MultiLabelImages,
                 out_dir: Path, *, image_size: int = 224, costs: Sequence[float] = DEFAULT_COSTS, folds: int = 3,
                 ap: str = "standard", batch_size: int = 256, num_workers: int = 0, seed: int = 0,
                 benchmark: str = "voc07", progress: bool = True, tensorboard: bool = True,
                 resume: bool = True) -> dict:
    """Encode both splits, run the per-class sweeps over the ranks, write ``result.json``."""
    start = time.perf_counter()
    if ap not in AP_MODES:
        raise ValueError(f"--ap must be one of {AP_MODES}, got {ap!r}")
    if train.classes != test.classes:
        raise ValueError(f"train and test lists name different classes: {train.classes} vs {test.classes}")
    if not costs or min(costs) <= 0:
        raise ValueError(f"costs must be positive, got {list(costs)}")
    costs = sorted(float(c) for c in costs)
    out_dir, monitor, backbone, feature_dim = open_backbone(source, out_dir, topo, seed=seed, progress=progress,
                                                            tensorboard=tensorboard, image_size=image_size)
    classes = train.classes
    data = {"benchmark": benchmark, "transfer": True, "num_classes": len(classes), "classes": classes,
            "train_images": len(train), "test_images": len(test), "image_size": image_size}
    print_header(monitor.console, "sfrik-scale svm-eval", [
        ("backbone", f"{source.label()} (features {feature_dim})"),
        ("data", f"{benchmark}: {len(train)} trainval, {len(test)} test images, {len(classes)} classes, "
                 f"{image_size} px"),
        ("protocol", f"{len(costs)} costs, {folds}-fold CV AP, test AP '{ap}'"),
        ("processes", f"{topo.world_size} ({topo.launcher}), device {topo.device}"),
        ("output", str(out_dir)),
    ])
    transform = build_eval_transform(image_size)
    fingerprint = {"source": source.to_dict(), "image_size": image_size}
    show = monitor.active and monitor.show_progress
    feats = {}
    for name, ds in (("train", train), ("test", test)):
        path = out_dir / "cache" / f"svm_{name}_features.pt"
        key = {**fingerprint, "split": name, "paths": len(ds.paths), "first": ds.paths[0]}
        saved = torch.load(path, map_location="cpu", weights_only=True) if resume and path.is_file() else None
        if saved is not None and saved.get("fingerprint") == key:
            feats[name] = saved["features"]
            continue
        f, idx = extract_features(backbone, ds.with_transform(transform), batch_size=batch_size, device=topo.device,
                                  rank=topo.rank, world=topo.world_size, num_workers=num_workers,
                                  console=monitor.console, progress=show, description=f"{name} features")
        f = gather_rows(f).cpu()
        feats[name] = f
        if topo.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"features": f, "fingerprint": key}, path)
    train_x, test_x = normalize_rows(feats["train"].numpy()), normalize_rows(feats["test"].numpy())

    class_dir = out_dir / "svm"
    sweep_key = {"costs": costs, "folds": folds, "ap": ap, "seed": seed, **fingerprint}
    mine = list(range(topo.rank, len(classes), topo.world_size))
    results: dict[int, dict] = {}
    with ProgressBar(monitor.console, f"SVMs (rank 0: {len(mine)} classes)", len(mine), enabled=show) as bar:
        for c in mine:
            path = class_dir / f"class{c:03d}.json"
            if resume and path.is_file():
                saved = json.loads(path.read_text())
                if saved.get("key") == json.loads(json.dumps(sweep_key, default=str)):
                    results[c] = saved["result"]
                    bar.advance()
                    continue
            results[c] = {"class": classes[c], **train_class_svm(train_x, train.labels[:, c], test_x,
                                                                    test.labels[:, c], costs, folds, ap, seed)}
            write_json(path, {"key": sweep_key, "result": results[c]})
            bar.advance()
    merged: dict[int, dict] = {}
    for part in comm.all_gather_objects(results):
        merged.update(part)
    per_class = [merged[c] for c in range(len(classes))]
    test_ap = np.array([r["test_ap"] for r in per_class], dtype=np.float64)
    per_cost = np.nanmean(np.array([r["test_ap_per_cost"] for r in per_class]), axis=0)
    metrics = {"map": 100.0 * float(np.nanmean(test_ap)), "ap_metric": ap,
               "per_class_ap": {r["class"]: 100.0 * r["test_ap"] for r in per_class},
               "chosen_costs": {r["class"]: r["cost"] for r in per_class},
               "map_per_cost": {f"{c:g}": 100.0 * float(v) for c, v in zip(costs, per_cost)}}
    monitor.scalars(0, {"map": metrics["map"]}, prefix="svm")
    if monitor.console is not None:
        from rich.table import Table

        table = Table(title=f"{benchmark} linear SVM ({ap} AP)")
        table.add_column("class")
        table.add_column("AP (%)", justify="right")
        table.add_column("cost", justify="right")
        for r in per_class:
            table.add_row(r["class"], f"{100 * r['test_ap']:.2f}", f"{r['cost']:g}")
        table.add_row("[bold]mAP", f"[bold]{metrics['map']:.2f}", "")
        monitor.console.print(table)
    result = base_result("svm", topo, source.to_dict(), data, {"costs": costs, "folds": folds, "ap": ap,
                                                               "batch_size": batch_size, "seed": seed})
    result["metrics"] = metrics
    monitor.close()
    return finish_result(result, out_dir, topo, start)
