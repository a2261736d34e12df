"""Tests of sfrik_scale.eval.probe: the frozen-feature logistic-regression probe."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from sfrik_scale.eval.probe import fit_logistic_probe


def blobs(n_per_class: int, classes: int, dim: int, spread: float, seed: int):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 3
    y = np.repeat(np.arange(classes), n_per_class)
    return centres[y] + spread * rng.normal(size=(len(y), dim)), y


def test_probe_equals_a_logistic_regression_refitted_with_the_validated_C():
    x, y = blobs(60, 5, 16, spread=3.0, seed=2)
    x, y, xv, yv = x[::2], y[::2], x[1::2], y[1::2]  # train / val halves of the same classes
    out = fit_logistic_probe(x, y, xv, yv, Cs=(0.01, 1.0, 100.0), seed=0)
    scaler = StandardScaler().fit(x)
    reference = LogisticRegression(C=out["C"], max_iter=2000).fit(scaler.transform(x), y)
    assert out["top1"] == pytest.approx(100 * reference.score(scaler.transform(xv), yv))
    assert out["C"] in (0.01, 1.0, 100.0) and set(out["holdout_top1"]) == {"0.01", "1", "100"}
    best = max(out["holdout_top1"].values())
    assert out["holdout_top1"][format(out["C"], "g")] == best
    # among the C values reaching the best held-out accuracy, the smallest (strongest regularisation) wins
    assert out["C"] == min(float(c) for c, v in out["holdout_top1"].items() if v == best)
    assert out["top1"] <= out["top5"] == 100.0


def test_separable_classes_are_learned_and_noise_is_not():
    x, y = blobs(30, 4, 8, spread=0.3, seed=3)
    assert fit_logistic_probe(x, y, x, y)["top1"] == 100.0
    rng = np.random.default_rng(4)
    noise, labels = rng.normal(size=(400, 8)), rng.integers(0, 4, 400)
    assert fit_logistic_probe(noise[:300], labels[:300], noise[300:], labels[300:])["top1"] < 45.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(train_x=np.zeros((0, 3)), train_y=np.zeros(0)), "non-empty"),
    (dict(train_x=np.zeros((4, 3)), train_y=np.zeros(4)), "at least two classes"),
    (dict(val_x=np.zeros((2, 5))), "same D"),
    (dict(holdout=1.0), "holdout"),
    (dict(Cs=(0.0, 1.0)), "Cs must be positive"),
])
def test_bad_inputs_raise_value_errors_naming_the_problem(kwargs, match):
    x, y = blobs(10, 2, 3, spread=1.0, seed=5)
    args = dict(train_x=x, train_y=y, val_x=x[:4], val_y=y[:4], **{k: v for k, v in kwargs.items()
                                                                  if k in ("holdout", "Cs")})
    args.update({k: v for k, v in kwargs.items() if k not in ("holdout", "Cs")})
    with pytest.raises(ValueError, match=match):
        fit_logistic_probe(args.pop("train_x"), args.pop("train_y"), args.pop("val_x"), args.pop("val_y"), **args)
