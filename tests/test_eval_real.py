"""Tests of sfrik_scale.data.real: scikit-learn's bundled digits as a registered dataset."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn")

from sfrik_scale.data import DATASETS, build_dataset, build_pretrain_dataset  # noqa: E402
from sfrik_scale.data.real import digits_split_indices  # noqa: E402


def test_digits_is_registered_with_fixed_disjoint_splits():
    assert "digits" in DATASETS
    train, val = build_dataset("digits", split="train", image_size=16), build_dataset("digits", split="val",
                                                                                        image_size=16)
    assert (len(train), len(val)) == (1442, 355)
    from sklearn.datasets import load_digits

    labels = load_digits().target
    tr, va = digits_split_indices(labels, "train"), digits_split_indices(labels, "val")
    assert not set(tr) & set(va) and len(tr) + len(va) == len(labels)
    assert np.array_equal(tr, digits_split_indices(labels, "train"))  # no seed involved
    assert min(np.bincount(labels[va])) >= 34  # every class held out


def test_digits_images_are_rgb_at_the_requested_size_with_their_labels():
    ds = build_dataset("digits", split="val", image_size=24)
    img, label = ds[5]
    assert img.mode == "RGB" and img.size == (24, 24) and 0 <= label <= 9
    pixels = np.asarray(img)
    assert np.array_equal(pixels[..., 0], pixels[..., 1]) and pixels.max() > 128
    assert ds.targets[5] == label and len(ds.classes) == 10


def test_the_trainer_can_build_two_views_of_digits_with_its_usual_arguments():
    # train.py passes list_file / first_k_per_class / strict for every non-synthetic dataset
    ds = build_pretrain_dataset("digits", augmentations="alignment_uniformity", image_size=16, seed=0,
                                list_file=None, first_k_per_class=None, strict=False)
    v1, v2, label = ds[(0, 3)]
    assert v1.shape == v2.shape == (3, 16, 16) and 0 <= label <= 9


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="digits split"):
        build_dataset("digits", split="test")
