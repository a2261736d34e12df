"""The frozen-feature linear probe: features extracted once, a multinomial logistic regression
whose regularisation is chosen on held-out training images.

    sfrik-scale linear-eval RUN_DIR --protocol features      # the default up to 64 px

The fast, protocol-free standard of docs/evaluation.md: no augmentation,
no learning-rate schedule to tune, seconds on a CPU for datasets of up to ~10^5 images.

1. Every image of the labelled train split and of the val split goes once through the
   frozen backbone in eval mode (the evaluation transform: resize, centre crop; the whole
   image up to 64 px). The features are cached in ``OUT/cache`` (shared with ``knn-eval``'s
   format), so a rerun, or a rerun with other probe settings, skips the extraction.
2. The features are standardised (mean 0, variance 1 per dimension, statistics of the
   training features).
3. The inverse L2 strength C of scikit-learn's multinomial ``LogisticRegression`` (lbfgs) is
   chosen from ``Cs`` (a decade apart, 0.001 to 100) by accuracy on a stratified ``holdout``
   fraction of the training images, fitted on the rest (each C warm-started from the
   previous one's solution); ties go to the stronger regularisation.
4. The probe with that C is refitted on all training images and scored on the val split
   (top-1, top-5, in percent).

Distributed: the extraction is sharded (rank r encodes its contiguous block; no collective
inside the forward passes besides what the backbone itself holds) and the features are
gathered on every rank (`common.gather_rows`); rank 0 fits the probe and writes the
result, the other ranks wait for it at the final barrier. One process: no collective.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .common import base_result, finish_result, gather_rows

if TYPE_CHECKING:  # the command's imports stay out of the probe's core (tests, the digits check)
    from .session import EvalSetup

#: Inverse regularisation strengths tried (a decade apart); the validated one is reported.
DEFAULT_CS = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)
DEFAULT_HOLDOUT = 0.2


def fit_logistic_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, *,
                       Cs: Sequence[float] = DEFAULT_CS, holdout: float = DEFAULT_HOLDOUT, seed: int = 0,
                       max_iter: int = 2000) -> dict:
    """Fit and score the probe of the module docstring on (n, D) features.

    Returns ``{"top1", "top5"}`` in percent on the val features, ``"C"`` (the chosen value),
    ``"holdout_top1"`` ({C: accuracy on the held-out training images}), ``"train_top1"``.

    Raises ValueError for empty inputs, mismatched shapes, fewer than two classes, or a
    ``holdout`` outside (0, 1).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    train_x, val_x = np.asarray(train_x, dtype=np.float64), np.asarray(val_x, dtype=np.float64)
    train_y, val_y = np.asarray(train_y).astype(np.int64), np.asarray(val_y).astype(np.int64)
    if train_x.ndim != 2 or val_x.ndim != 2 or train_x.shape[1] != val_x.shape[1]:
        raise ValueError(f"features must be (n, D) with the same D, got {train_x.shape} and {val_x.shape}")
    if len(train_x) != len(train_y) or len(val_x) != len(val_y) or not len(train_x) or not len(val_x):
        raise ValueError(f"need non-empty features with one label each, got {len(train_x)} features / "
                         f"{len(train_y)} labels (train), {len(val_x)} / {len(val_y)} (val)")
    classes = np.unique(train_y)
    if len(classes) < 2:
        raise ValueError(f"the probe needs at least two classes in the training labels, got {classes.tolist()}")
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must lie in (0, 1), got {holdout}")
    if not Cs or min(Cs) <= 0:
        raise ValueError(f"Cs must be positive, got {list(Cs)}")

    def fit(x: np.ndarray, y: np.ndarray, C: float, start=None):
        scaler = StandardScaler().fit(x)
        model = LogisticRegression(C=C, max_iter=max_iter, warm_start=start is not None)
        if start is not None:  # continue from the previous C's solution: the path is smooth in C
            model.coef_, model.intercept_ = start.coef_.copy(), start.intercept_.copy()
        return scaler, model.fit(scaler.transform(x), y)

    # stratify when every class can give at least one image to each side
    counts = np.bincount(train_y - train_y.min())
    stratify = train_y if counts[counts > 0].min() >= 2 else None
    fit_idx, hold_idx = train_test_split(np.arange(len(train_y)), test_size=holdout, random_state=seed,
                                         stratify=stratify)
    scores: dict[float, float] = {}
    model = None
    for C in sorted(Cs):  # ascending: on a tie the smaller C (stronger regularisation) is kept
        scaler, model = fit(train_x[fit_idx], train_y[fit_idx], C, start=model)
        scores[C] = 100.0 * model.score(scaler.transform(train_x[hold_idx]), train_y[hold_idx])
    best = max(scores, key=lambda c: (scores[c], -c))
    scaler, model = fit(train_x, train_y, best)
    proba = model.predict_proba(scaler.transform(val_x))
    ranked = model.classes_[np.argsort(-proba, axis=1)]
    hit = ranked == val_y[:, None]
    return {"top1": 100.0 * float(hit[:, :1].any(1).mean()), "top5": 100.0 * float(hit[:, :5].any(1).mean()),
            "C": float(best), "holdout_top1": {f"{c:g}": s for c, s in scores.items()},
            "train_top1": 100.0 * float(model.score(scaler.transform(train_x), train_y))}


def run_feature_probe(setup: "EvalSetup", *, batch_size: int = 256, num_workers: int = 0, cache: bool = True,
                      Cs: Sequence[float] = DEFAULT_CS, holdout: float = DEFAULT_HOLDOUT, seed: int = 0) -> dict:
    """Extract (or reload) the features, fit the probe on rank 0, write ``result.json``."""
    start = time.perf_counter()
    s, topo = setup, setup.topo
    from .features import encoded_splits

    train, val = encoded_splits(s, batch_size=batch_size, num_workers=num_workers, cache=cache)
    dev = topo.device
    train_x, train_y = gather_rows(train["features"].to(dev)), gather_rows(train["labels"].to(dev))
    val_x, val_y = gather_rows(val["features"].to(dev)), gather_rows(val["labels"].to(dev))
    result = base_result("linear", topo, s.source.to_dict(), s.data,
                         {"protocol": "features", "Cs": [float(c) for c in Cs], "holdout": holdout, "seed": seed,
                          "classifier": "sklearn LogisticRegression (multinomial, lbfgs) on standardised features"})
    if topo.is_main:
        with _status(s.console, f"fitting the probe ({len(Cs)} values of C on {train_x.shape[0]} x "
                                f"{train_x.shape[1]} features)"):
            metrics = fit_logistic_probe(train_x.cpu().numpy(), train_y.cpu().numpy(), val_x.cpu().numpy(),
                                         val_y.cpu().numpy(), Cs=Cs, holdout=holdout, seed=seed)
        # the same names as the SGD probe's, so that the report reads either
        metrics.update(best_top1=metrics["top1"], best_top5=metrics["top5"], feature_dim=int(train_x.shape[1]),
                       train_images=int(train_x.shape[0]), val_images=int(val_x.shape[0]))
        result["metrics"] = metrics
        _print_table(s.console, metrics)
        s.monitor.scalars(0, {"top1": metrics["top1"], "top5": metrics["top5"]}, prefix="probe")
    s.monitor.close()
    return finish_result(result, s.out_dir, topo, start)


class _status:
    """A rich spinner on rank 0 while the probe fits (a no-op without a console)."""

    def __init__(self, console, text: str) -> None:
        self._cm = console.status(text) if console is not None else None

    def __enter__(self):
        if self._cm is not None:
            self._cm.__enter__()
        return self

    def __exit__(self, *exc):
        if self._cm is not None:
            self._cm.__exit__(*exc)


def _print_table(console, metrics: dict) -> None:
    if console is None:
        return
    from rich.table import Table

    table = Table(title="frozen-feature probe (logistic regression)")
    for col in ("C (validated)", "held-out top-1 (%)", "val top-1 (%)", "val top-5 (%)"):
        table.add_column(col, justify="right")
    chosen = format(metrics["C"], "g")
    table.add_row(chosen, f"{metrics['holdout_top1'][chosen]:.2f}", f"{metrics['top1']:.2f}", f"{metrics['top5']:.2f}")
    console.print(table)
