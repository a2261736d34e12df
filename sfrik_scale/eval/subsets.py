"""Labelled subsets for semi-supervised evaluation: generated per class, or read from a file list.

Generated (`balanced_subset`): every class keeps the same fraction of its images
(``round(fraction x n_c)``, at least 1) or the same number ``per_class``; which images is
decided by a permutation of the class's members drawn from a generator seeded with
``mix_seed(seed, class)``. The subset is therefore a pure function of (labels, fraction or
per_class, seed): the same on every rank, in every run, for any ImageFolder dataset, and a
class's choice does not depend on the other classes.

From a file (`subset_from_file`): SimCLR's published ImageNet lists (``1percent.txt``,
``10percent.txt``) hold one image file name per line (``n01440764_10026.JPEG``); a line
may also be a path relative to the dataset root or, for datasets without files (synthetic,
digits), an integer index. Every listed name must exist in the dataset.

Each evaluation writes the subset it used to ``OUT/labelled_subset.txt`` in the same
format, so it can be passed back with ``--subset-file``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data import mix_seed

_SUBSET_STREAM = 0x5AB5


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """Labels in index order, from ``targets`` (no image is decoded) or, failing that, by reading items."""
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = [int(dataset[i][1]) for i in range(len(dataset))]
    return np.asarray(targets, dtype=np.int64)


def balanced_subset(labels: Sequence[int], *, fraction: Optional[float] = None, per_class: Optional[int] = None,
                    seed: int = 0) -> np.ndarray:
    """Sorted indices of a per-class balanced subset (see the module docstring).

    Args:
        labels: (n,) integer labels.
        fraction: keep ``round(fraction x n_c)`` images of each class (at least 1), 0 < fraction <= 1.
        per_class: keep ``min(per_class, n_c)`` images of each class. Exactly one of the two.
        seed: selects which images.
    """
    if (fraction is None) == (per_class is None):
        raise ValueError("give exactly one of fraction and per_class")
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if per_class is not None and per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    labels = np.asarray(labels, dtype=np.int64)
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n_c = len(members)
        k = min(n_c, per_class) if per_class is not None else min(n_c, max(1, int(np.floor(fraction * n_c + 0.5))))
        g = torch.Generator().manual_seed(mix_seed(seed, _SUBSET_STREAM, int(c)))
        chosen.append(members[torch.randperm(n_c, generator=g)[:k].numpy()])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def sample_names(dataset: Dataset) -> list[str]:
    """A name per sample: the file's path relative to the dataset root for file datasets, else the index."""
    samples = getattr(dataset, "samples", None)
    root = getattr(dataset, "root", None)
    if samples is None:
        return [str(i) for i in range(len(dataset))]
    return [os.path.relpath(path, root) if root else path for path, _ in samples]


def subset_from_file(dataset: Dataset, path: str | os.PathLike) -> np.ndarray:
    """Sorted indices of the samples named in ``path`` (file names, relative paths or indices, one per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"subset file {path} does not exist")
    wanted = [line.strip() for line in path.read_text().splitlines()]
    wanted = [w for w in wanted if w and not w.startswith("#")]
    if not wanted:
        raise ValueError(f"subset file {path} lists no image")
    names = sample_names(dataset)
    lookup: dict[str, int] = {}
    for i, name in enumerate(names):
        lookup.setdefault(name, i)
        lookup.setdefault(os.path.basename(name), i)
    indices, missing = [], []
    for w in wanted:
        i = lookup.get(w, lookup.get(os.path.basename(w)))
        if i is None and w.isdigit() and getattr(dataset, "samples", None) is None and int(w) < len(names):
            i = int(w)
        if i is None:
            missing.append(w)
        else:
            indices.append(i)
    if missing:
        raise ValueError(f"{len(missing)} of the {len(wanted)} images listed in {path} are not in the dataset "
                         f"(first: {missing[:3]})")
    return np.unique(np.asarray(indices, dtype=np.int64))


def write_subset_file(path: str | os.PathLike, dataset: Dataset, indices: Sequence[int]) -> None:
    """Write the names of ``indices`` (see `sample_names`), one per line, readable by `subset_from_file`."""
    names = sample_names(dataset)
    Path(path).write_text("".join(names[i] + "\n" for i in indices))


class LabelSubset:
    """Which labelled training images an evaluation uses: all, a generated fraction or count per class, or a file.

    Args:
        fraction: per-class fraction (0.01 for the 1 % protocol).
        per_class: images per class.
        file: a subset file (`subset_from_file`).
        seed: the generated subset's seed.
    """

    def __init__(self, fraction: Optional[float] = None, per_class: Optional[int] = None,
                 file: Optional[str] = None, seed: int = 0) -> None:
        if sum(x is not None for x in (fraction, per_class, file)) > 1:
            raise ValueError("choose one of --label-fraction, --images-per-class and --subset-file")
        if fraction is not None and not 0 < fraction <= 1:
            raise ValueError(f"--label-fraction must be in (0, 1], got {fraction}")
        if per_class is not None and per_class < 1:
            raise ValueError(f"--images-per-class must be >= 1, got {per_class}")
        self.fraction, self.per_class, self.file, self.seed = fraction, per_class, file, seed

    @property
    def is_full(self) -> bool:
        return self.fraction is None and self.per_class is None and self.file is None

    def select(self, dataset: Dataset) -> Optional[np.ndarray]:
        """Sorted indices into ``dataset``, or None for all of it."""
        if self.file is not None:
            return subset_from_file(dataset, self.file)
        if self.is_full:
            return None
        return balanced_subset(dataset_labels(dataset), fraction=self.fraction, per_class=self.per_class,
                               seed=self.seed)

    def describe(self) -> dict:
        return {"label_fraction": self.fraction, "images_per_class": self.per_class, "subset_file": self.file,
                "subset_seed": self.seed if (self.fraction or self.per_class) else None}
