"""Multi-label image lists (the VOC07 classification protocol's input).

File format (one file per split, e.g. ``trainval.txt`` and ``test.txt``)::

    # classes: aeroplane bicycle bird boat ...      <- optional header naming the columns
    JPEGImages/000005.jpg -1 -1 -1 -1 1 ...
    JPEGImages/000007.jpg -1 -1 -1 -1 -1 1 ...

One image per line: its path (relative to the list file's folder, or to ``root``; absolute
paths are kept; the path may contain spaces when a ``# classes:`` header fixes the number
of columns) followed by one value per class, the PASCAL VOC devkit's convention:
``1`` present, ``-1`` absent, ``0`` difficult. Blank lines and other ``#`` lines are
skipped. Without a header the classes are named ``0 .. C-1`` and every line must have the
same number of values.

`read_voc_devkit` reads the devkit layout directly (``VOC2007/ImageSets/Main/<class>_<set>.txt``
+ ``JPEGImages/``), so VOC07 needs no conversion.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data import pil_loader

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


class MultiLabelImages(Dataset):
    """Images with a (C,) label vector in {1, -1, 0} each.

    Attributes: ``paths`` (list of str), ``labels`` (int8 array (n, C)), ``classes``.
    Items: ``(transform(image), index)``; look the labels up in ``labels[index]``.
    Unreadable images raise (every image of the protocol is needed).
    """

    def __init__(self, paths: Sequence[str], labels: np.ndarray, classes: Sequence[str],
                 transform: Optional[Callable] = None) -> None:
        labels = np.asarray(labels, dtype=np.int8)
        if labels.ndim != 2 or labels.shape != (len(paths), len(classes)):
            raise ValueError(f"labels must have shape ({len(paths)}, {len(classes)}), got {labels.shape}")
        bad = set(np.unique(labels).tolist()) - {-1, 0, 1}
        if bad:
            raise ValueError(f"label values must be 1, -1 or 0, got {sorted(bad)}")
        self.paths, self.labels, self.classes, self.transform = list(paths), labels, list(classes), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        img = pil_loader(self.paths[index])
        return (self.transform(img) if self.transform is not None else img), index

    def with_transform(self, transform: Callable) -> "MultiLabelImages":
        return MultiLabelImages(self.paths, self.labels, self.classes, transform)

    @property
    def label_tensor(self) -> torch.Tensor:
        return torch.from_numpy(self.labels.astype(np.int64))


def read_multilabel_list(list_file: str | os.PathLike, root: Optional[str] = None) -> MultiLabelImages:
    """Parse a list in the format of the module docstring."""
    list_file = Path(list_file)
    if not list_file.is_file():
        raise FileNotFoundError(f"multi-label list {list_file} does not exist")
    base = Path(root) if root is not None else list_file.parent
    classes: Optional[list[str]] = None
    paths, rows = [], []
    for lineno, raw in enumerate(list_file.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            body = line[1:].strip()
            if body.lower().startswith("classes:") and not paths:
                classes = body.split(":", 1)[1].split()
            continue
        if classes is not None:
            parts = line.rsplit(maxsplit=len(classes))
        else:
            parts = line.split()
            classes = [str(i) for i in range(len(parts) - 1)]
        if len(parts) != len(classes) + 1 or not classes:
            raise ValueError(f"{list_file}:{lineno}: expected '<path>' and {len(classes)} values, got {line!r}")
        try:
            values = [int(v) for v in parts[1:]]
        except ValueError:
            raise ValueError(f"{list_file}:{lineno}: label values must be integers 1, -1 or 0, got {line!r}") from None
        paths.append(str(base / parts[0]))
        rows.append(values)
    if not paths:
        raise ValueError(f"multi-label list {list_file} lists no image")
    try:
        return MultiLabelImages(paths, np.asarray(rows), classes or [])
    except ValueError as err:
        raise ValueError(f"{list_file}: {err}") from None


def write_multilabel_list(path: str | os.PathLike, paths: Sequence[str], labels: np.ndarray,
                          classes: Sequence[str]) -> None:
    """Write a list readable by `read_multilabel_list` (paths written as given)."""
    lines = [f"# classes: {' '.join(classes)}"]
    lines += [p + " " + " ".join(str(int(v)) for v in row) for p, row in zip(paths, np.asarray(labels))]
    Path(path).write_text("\n".join(lines) + "\n")


def read_voc_devkit(voc_root: str | os.PathLike, image_set: str) -> MultiLabelImages:
    """VOC ``image_set`` ("trainval", "test", ...) from a devkit folder such as ``VOCdevkit/VOC2007``."""
    root = Path(voc_root)
    main = root / "ImageSets" / "Main"
    if not main.is_dir():
        raise FileNotFoundError(f"{main} does not exist (expected a VOC devkit folder like VOCdevkit/VOC2007)")
    ids: Optional[list[str]] = None
    columns = []
    for cls in VOC_CLASSES:
        path = main / f"{cls}_{image_set}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        pairs = [line.split() for line in path.read_text().splitlines() if line.strip()]
        these = [p[0] for p in pairs]
        if ids is None:
            ids = these
        elif these != ids:
            raise ValueError(f"{path} lists other images than {VOC_CLASSES[0]}_{image_set}.txt")
        columns.append([int(p[1]) for p in pairs])
    paths = [str(root / "JPEGImages" / f"{i}.jpg") for i in ids or []]
    return MultiLabelImages(paths, np.asarray(columns).T, VOC_CLASSES)
