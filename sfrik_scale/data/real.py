"""Real images that ship inside an installable package: no download, ever.

``"digits"``: scikit-learn's bundled handwritten digits (``sklearn.datasets.load_digits``;
the UCI "Optical Recognition of Handwritten Digits" test set): 1797 grayscale 8 x 8 images
of the digits 0-9 (about 180 per class), read from a file inside the scikit-learn wheel.
Small enough to pretrain on for a few CPU minutes and to show that SSL pretraining beats a
randomly initialised backbone (docs/evaluation.md).

Splits are fixed (they do not depend on any seed, so pretraining and evaluation agree):
within each class, in the file's order, every fifth image (positions 4, 9, 14, ...) is
"val" (355 images) and the others are "train" (1442 images). Images are white digits
on black, upsampled to ``image_size`` (bilinear) and returned as RGB PIL images (three
equal channels), like the other datasets of ``sfrik_scale.data``.

Registered as "digits" in ``sfrik_scale.data.DATASETS`` (`sfrik_scale.data.datasets`)::

    ds = build_dataset("digits", split="val", image_size=32)

scikit-learn is imported lazily, when a digits dataset is built.
"""
from __future__ import annotations

from typing import List, Tuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

DIGITS_VAL_EVERY = 5  # every 5th image of each class is held out


def digits_split_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """Indices of ``split`` ("train", "val" or "all") in the digits file order (see the module docstring)."""
    if split == "all":
        return np.arange(len(labels))
    if split not in ("train", "val"):
        raise ValueError(f"digits split must be 'train', 'val' or 'all', got {split!r}")
    position = np.zeros(len(labels), dtype=np.int64)  # rank of each image within its class
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        position[members] = np.arange(len(members))
    held_out = position % DIGITS_VAL_EVERY == DIGITS_VAL_EVERY - 1
    return np.flatnonzero(held_out if split == "val" else ~held_out)


class SklearnDigits(Dataset):
    """scikit-learn's 8 x 8 handwritten digits as ``(PIL RGB image, label)``.

    Args:
        split: "train" (80 %), "val" (20 %) or "all"; see the module docstring.
        image_size: side of the returned images (the 8 x 8 originals upsampled, bilinear).

    Attributes: ``targets`` (labels in index order), ``classes`` (["0", ..., "9"]).
    All images are rendered once at construction (1797 x image_size^2 bytes).
    """

    def __init__(self, split: str = "train", image_size: int = 32) -> None:
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:  # pragma: no cover - scikit-learn is a dependency
            raise ImportError("dataset 'digits' needs scikit-learn (pip install scikit-learn)") from err
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        digits = load_digits()  # read from the package's bundled data file: no download
        labels = np.asarray(digits.target, dtype=np.int64)
        keep = digits_split_indices(labels, split)
        self.split, self.image_size = split, int(image_size)
        self.classes = [str(c) for c in range(10)]
        self._labels = labels[keep]
        pixels = (np.asarray(digits.images, dtype=np.float32)[keep] * (255.0 / 16.0)).round().astype(np.uint8)
        self._images = np.stack([np.asarray(Image.fromarray(p, mode="L").resize(
            (self.image_size, self.image_size), Image.BILINEAR)) for p in pixels]) if len(pixels) else \
            np.zeros((0, self.image_size, self.image_size), np.uint8)

    def __len__(self) -> int:
        return len(self._labels)

    @property
    def targets(self) -> List[int]:
        return self._labels.tolist()

    def __getitem__(self, index: int) -> Tuple[Image.Image, int]:
        gray = self._images[int(index)]
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), mode="RGB"), int(self._labels[int(index)])

    def __repr__(self) -> str:
        return f"SklearnDigits(split={self.split!r}, {len(self)} images, image_size={self.image_size})"
