"""Tests of sfrik_scale.eval.subsets: deterministic, per-class balanced label subsets and subset files."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sfrik_scale.data import ImageFolderDataset, SyntheticShapes
from sfrik_scale.eval.common import padded_shard, shard_range
from sfrik_scale.eval.subsets import (
    LabelSubset, balanced_subset, dataset_labels, subset_from_file, write_subset_file,
)

LABELS = np.repeat(np.arange(4), [100, 100, 100, 100])[np.random.default_rng(0).permutation(400)]


def test_subset_is_the_same_for_the_same_seed_and_changes_with_it():
    a = balanced_subset(LABELS, fraction=0.1, seed=3)
    assert np.array_equal(a, balanced_subset(LABELS, fraction=0.1, seed=3))
    assert not np.array_equal(a, balanced_subset(LABELS, fraction=0.1, seed=4))


def test_fraction_keeps_the_same_share_of_every_class():
    chosen = balanced_subset(LABELS, fraction=0.1, seed=0)
    assert np.bincount(LABELS[chosen]).tolist() == [10, 10, 10, 10]
    assert np.all(np.diff(chosen) > 0)  # sorted, no duplicates


def test_fraction_rounds_per_class_and_keeps_at_least_one():
    labels = np.array([0] * 15 + [1] * 25 + [2] * 3)
    counts = np.bincount(labels[balanced_subset(labels, fraction=0.1)]).tolist()
    assert counts == [2, 3, 1]  # round(1.5) = 2, round(2.5) = 3 (half up), max(1, round(0.3))


def test_per_class_count_is_exact_and_capped_by_the_class_size():
    labels = np.array([0] * 5 + [1] * 50)
    assert np.bincount(labels[balanced_subset(labels, per_class=8)]).tolist() == [5, 8]


def test_a_class_choice_does_not_depend_on_the_other_classes():
    full = balanced_subset(LABELS, per_class=7, seed=1)
    only_class_2 = np.flatnonzero(LABELS == 2)
    alone = balanced_subset(np.where(LABELS == 2, 2, -1), per_class=7, seed=1)
    assert np.array_equal(np.intersect1d(full, only_class_2), np.intersect1d(alone, only_class_2))


@pytest.mark.parametrize("kwargs", [dict(), dict(fraction=0.1, per_class=3), dict(fraction=0.0), dict(per_class=0)])
def test_balanced_subset_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        balanced_subset(LABELS, **kwargs)


def _image_folder(root, per_class=4):
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / c / f"{c}_{i}.png")
    return ImageFolderDataset(str(root))


def test_subset_file_round_trips_and_accepts_simclr_style_basenames(tmp_path):
    ds = _image_folder(tmp_path / "data")
    chosen = balanced_subset(dataset_labels(ds), per_class=2, seed=5)
    write_subset_file(tmp_path / "subset.txt", ds, chosen)
    assert np.array_equal(subset_from_file(ds, tmp_path / "subset.txt"), chosen)
    (tmp_path / "names.txt").write_text("# SimCLR style\ndog_1.png\ncat_3.png\n\n")
    names = [ds.samples[i][0].split("/")[-1] for i in subset_from_file(ds, tmp_path / "names.txt")]
    assert names == ["cat_3.png", "dog_1.png"]


def test_subset_file_naming_a_missing_image_fails_clearly(tmp_path):
    ds = _image_folder(tmp_path / "data")
    (tmp_path / "subset.txt").write_text("cat_0.png\nn01440764_10026.JPEG\n")
    with pytest.raises(ValueError, match=r"1 of the 2 images .*n01440764_10026\.JPEG"):
        subset_from_file(ds, tmp_path / "subset.txt")


def test_indices_name_samples_of_datasets_without_files(tmp_path):
    ds = SyntheticShapes(num_samples=20, num_classes=4, image_size=8)
    chosen = LabelSubset(per_class=2, seed=1).select(ds)
    write_subset_file(tmp_path / "s.txt", ds, chosen)
    assert np.array_equal(LabelSubset(file=str(tmp_path / "s.txt")).select(ds), chosen)
    assert LabelSubset().select(ds) is None


def test_label_subset_refuses_two_selections():
    with pytest.raises(ValueError, match="choose one"):
        LabelSubset(fraction=0.1, file="x.txt")


@pytest.mark.parametrize("n, world", [(10, 3), (2, 4), (0, 2), (12, 4)])
def test_shards_cover_the_range_once_and_pad_to_equal_lengths(n, world):
    blocks = [shard_range(n, r, world) for r in range(world)]
    assert [i for a, b in blocks for i in range(a, b)] == list(range(n))
    padded = [padded_shard(n, r, world) for r in range(world)]
    assert len({len(idx) for idx, _ in padded}) == 1
    assert [i for idx, valid in padded for i in idx[:valid]] == list(range(n))
