"""Tests of the VOC07 protocol pieces: AP by hand, multi-label lists, the VOC devkit reader, the cost sweep."""
from __future__ import annotations

import math

import numpy as np
import pytest

from sfrik_scale.eval.multilabel import VOC_CLASSES, read_multilabel_list, read_voc_devkit, write_multilabel_list
from sfrik_scale.eval.svm import DEFAULT_COSTS, average_precision, normalize_rows, train_class_svm

# Ranked by score: +, -, +, -, +. Precision at the positives: 1/1, 2/3, 3/5; recall steps of 1/3.
SCORES = [0.9, 0.8, 0.7, 0.6, 0.5]
LABELS = [1, -1, 1, -1, 1]


def test_standard_ap_of_the_hand_checked_example():
    # Interpolated precision at recall 1/3, 2/3, 1: max(1, ...) = 1, max(2/3, 1/2, 3/5) = 2/3, 3/5.
    assert average_precision(SCORES, LABELS) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)  # 34/45 = 0.7556


def test_voc07_eleven_point_ap_of_the_hand_checked_example():
    # Recall >= t for t = 0, .1, .2, .3: precision 1; t = .4, .5, .6: 2/3; t = .7, .8, .9, 1: 3/5.
    assert average_precision(SCORES, LABELS, "11point") == pytest.approx((4 * 1 + 3 * 2 / 3 + 4 * 3 / 5) / 11)


def test_difficult_images_are_ignored_when_scoring():
    scores = [0.95] + SCORES + [0.1]
    labels = [0] + LABELS + [0]
    assert average_precision(scores, labels) == pytest.approx(average_precision(SCORES, LABELS))


def test_perfect_ranking_scores_one_and_no_positive_is_nan():
    assert average_precision([3, 2, 1, 0], [1, 1, -1, -1]) == pytest.approx(1.0)
    assert average_precision([3, 2, 1, 0], [1, 1, -1, -1], "11point") == pytest.approx(1.0)
    assert math.isnan(average_precision([1.0, 2.0], [-1, 0]))


def test_standard_ap_matches_sklearn_on_random_scores_with_distinct_values():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    scores, labels = rng.normal(size=200), rng.choice([-1, 1], size=200)
    # sklearn's AP is not interpolated, so it can only be lower or equal.
    assert average_precision(scores, labels) >= average_precision_score(labels > 0, scores) - 1e-12


def test_default_costs_are_the_benchmark_sweep():
    assert len(DEFAULT_COSTS) == 26 and min(DEFAULT_COSTS) == 1e-7 and max(DEFAULT_COSTS) == 100.0
    assert 0.5 ** 4 in DEFAULT_COSTS and 0.5 ** 19 in DEFAULT_COSTS


def test_normalize_rows_matches_the_benchmark():
    x = np.array([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(normalize_rows(x), [[3 / (5 + 1e-5), 4 / (5 + 1e-5)], [0, 0]])


def test_multilabel_list_round_trips_with_header_and_spaces(tmp_path):
    labels = np.array([[1, -1, 0], [-1, 1, 1]])
    write_multilabel_list(tmp_path / "l.txt", ["a b.jpg", "c.jpg"], labels, ["x", "y", "z"])
    ds = read_multilabel_list(tmp_path / "l.txt")
    assert ds.classes == ["x", "y", "z"] and ds.paths == [str(tmp_path / "a b.jpg"), str(tmp_path / "c.jpg")]
    np.testing.assert_array_equal(ds.labels, labels)


def test_multilabel_list_without_header_names_classes_by_index(tmp_path):
    (tmp_path / "l.txt").write_text("# comment\nimg1.png 1 -1\n\nimg2.png -1 0\n")
    ds = read_multilabel_list(tmp_path / "l.txt", root="/data")
    assert ds.classes == ["0", "1"] and ds.paths[0] == "/data/img1.png"


@pytest.mark.parametrize("text, match", [
    ("a.png 1 -1\nb.png 1\n", "expected '<path>' and 2 values"),
    ("a.png 1 2\n", "must be 1, -1 or 0"),
    ("a.png 1 x\n", "integers"),
    ("# only a comment\n", "lists no image"),
])
def test_malformed_multilabel_lists_fail_naming_the_problem(tmp_path, text, match):
    (tmp_path / "l.txt").write_text(text)
    with pytest.raises(ValueError, match=match):
        read_multilabel_list(tmp_path / "l.txt")


def test_voc_devkit_layout_is_read_per_class(tmp_path):
    main = tmp_path / "ImageSets" / "Main"
    main.mkdir(parents=True)
    for k, cls in enumerate(VOC_CLASSES):
        main.joinpath(f"{cls}_test.txt").write_text(f"000001 {1 if k == 0 else -1}\n000002  {0 if k == 1 else -1}\n")
    ds = read_voc_devkit(tmp_path, "test")
    assert ds.paths == [str(tmp_path / "JPEGImages" / "000001.jpg"), str(tmp_path / "JPEGImages" / "000002.jpg")]
    assert ds.labels[0, 0] == 1 and ds.labels[1, 1] == 0 and ds.labels.sum() == 1 - 38


def _separable_split(rng, n: int):
    """n images of one class: label +-1, first feature shifted by 2 x label, normalised."""
    y = np.repeat([1, -1], n // 2)
    return normalize_rows(rng.normal(size=(n, 5)) + np.outer(y, [2.0, 0, 0, 0, 0])), y


def test_cost_sweep_picks_the_cost_with_the_best_cross_validated_ap_and_scores_held_out_data():
    rng = np.random.default_rng(0)
    train_x, train_y = _separable_split(rng, 60)
    test_x, test_y = _separable_split(rng, 200)  # held out: drawn after, never seen in training
    out = train_class_svm(train_x, train_y, test_x, test_y, costs=[1e-7, 1.0], folds=3)
    best = int(np.argmax(out["cv_ap"]))
    assert out["cost"] == [1e-7, 1.0][best] and out["test_ap"] == out["test_ap_per_cost"][best]
    # The Bayes-optimal score (the first feature) reaches the same held-out AP within 0.05:
    # the SVM has learnt the direction, not the 60 training points.
    bayes = average_precision(test_x[:, 0], test_y)
    assert out["test_ap"] > 0.9 and out["test_ap"] > bayes - 0.05, (out["test_ap"], bayes)
    # Labels shuffled on the held-out split: no better than chance (AP near the 0.5 positive rate).
    shuffled = train_class_svm(train_x, train_y, test_x, rng.permutation(test_y), costs=[1.0], folds=3)
    assert shuffled["test_ap"] < 0.7


def test_cost_sweep_needs_positives_in_every_fold():
    x = np.eye(6)
    with pytest.raises(ValueError, match="at least 3 positive"):
        train_class_svm(x, np.array([1, -1, -1, -1, -1, -1]), x, np.ones(6), costs=[1.0])
