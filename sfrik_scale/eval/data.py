"""Labelled data for the evaluations: dataset description, transforms, per-sample seeded augmentation.

`EvalDataSpec` names a train and a val split of any ``sfrik_scale.data.DATASETS`` entry:
"synthetic" and "digits" have built-in splits; "image_folder" (ImageNet, Places205 layout
``root/<class>/<image>``) and "file_list" take a path per split. Transforms follow the
linear-evaluation recipes (VICReg, SFRIK): training crops ``RandomResizedCrop(size, scale)``
(bilinear) plus a horizontal flip (none on digits, whose mirror images are other classes);
validation resizes the short side to 256/224 x size (the size itself up to 64 px) and
center-crops (`sfrik_scale.data.build_eval_transform`).

Training augmentations are drawn per sample from a generator seeded with
``mix_seed(seed, epoch, index)`` (`SeededAugmentDataset`), so they do not depend on the
rank, the world size or the worker: a run on 2 processes sees the same global batches,
augmented the same way, as a run on 1.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import Dataset

from ..data import ViewAugmentation, build_dataset, build_eval_transform, build_view_transform, mix_seed
from ..data.datasets import DEFAULT_DATASET, is_generated, path_option, reads_path

_AUGMENT_STREAM = 0x1E7A


@dataclass
class EvalDataSpec:
    """A labelled dataset with a train and a val split."""

    dataset: str = DEFAULT_DATASET
    """A DATASETS name: synthetic, digits, image_folder, file_list."""
    train_path: Optional[str] = None
    """image_folder root or file_list file of the training split."""
    val_path: Optional[str] = None
    """image_folder root or file_list file of the validation split."""
    image_size: int = 224
    """Side of the crops fed to the backbone."""
    num_classes: int = 10
    """synthetic only: number of classes."""
    synthetic_size: int = 4096
    """synthetic only: images in the train split."""
    synthetic_val_size: int = 1000
    """synthetic only: images in the val split."""
    seed: int = 0
    """synthetic only: the generation seed (use the pretraining run's, to evaluate on its images)."""

    def build(self, split: str) -> Dataset:
        """The ``(PIL image, label)`` dataset of ``split`` ("train" or "val"), untransformed."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if reads_path(self.dataset):
            path = self.train_path if split == "train" else self.val_path
            key, what = path_option(self.dataset)
            if not path:
                raise ValueError(f"dataset {self.dataset!r} needs --{split}-data ({what})")
            return build_dataset(self.dataset, **{key: path}, strict=False)
        if is_generated(self.dataset):
            size = self.synthetic_size if split == "train" else self.synthetic_val_size
            return build_dataset(self.dataset, split=split, image_size=self.image_size, seed=self.seed,
                                 num_samples=size, num_classes=self.num_classes)
        return build_dataset(self.dataset, split=split, image_size=self.image_size)

    def describe(self) -> dict:
        keep = asdict(self)
        if not is_generated(self.dataset):
            for k in ("num_classes", "synthetic_size", "synthetic_val_size", "seed"):
                keep.pop(k)
        return keep

    def benchmark_name(self) -> str:
        """Default short name of the benchmark: the dataset, or the folder above the train data."""
        if reads_path(self.dataset) and self.train_path:
            from pathlib import Path

            p = Path(self.train_path).resolve()
            return (p.parent.name if p.name in ("train", "train.txt", "trainval", "trainval.txt") else p.name) or self.dataset
        return self.dataset

    def same_data_as(self, pretrain: dict) -> bool:
        """True when the train split is the pretraining run's data (not a transfer task)."""
        if not pretrain or pretrain.get("dataset") != self.dataset:
            return False
        if reads_path(self.dataset):
            from pathlib import Path

            return bool(pretrain.get("path")) and Path(pretrain["path"]).resolve() == Path(self.train_path or "").resolve()
        return True


def num_classes_of(dataset: Dataset, labels: Optional[Sequence[int]] = None) -> int:
    """Number of classes: ``len(dataset.classes)`` when the dataset names them, else max label + 1."""
    classes = getattr(dataset, "classes", None)
    if classes:
        return len(classes)
    if labels is None or len(labels) == 0:
        raise ValueError(f"cannot tell the number of classes of {dataset!r}")
    return int(max(labels)) + 1


#: Smallest crop area of the classifiers' training crops, for small images (side <= 64 px).
SMALL_IMAGE_CROP_SCALE = (0.5, 1.0)


def default_crop_scale(image_size: int) -> Tuple[float, float]:
    """RandomResizedCrop area range of the classifiers' training crops: the reference (0.08, 1)
    at ImageNet sizes; (0.5, 1) up to 64 px, where an 8 % crop of a 32 px image is a blur of a
    few source pixels (docs/evaluation.md)."""
    from ..data.transforms import SMALL_IMAGE_SIZE

    return SMALL_IMAGE_CROP_SCALE if image_size <= SMALL_IMAGE_SIZE else (0.08, 1.0)


def classifier_train_transform(image_size: int, crop_scale: Tuple[float, float] = (0.08, 1.0),
                               flip: bool = True) -> Callable:
    """RandomResizedCrop(image_size, crop_scale, bilinear) + horizontal flip (unless ``flip`` is
    false: datasets whose mirror images are other classes, `mirror_invariant`) + ImageNet normalisation."""
    return build_view_transform(ViewAugmentation(
        size=image_size, crop_scale=tuple(crop_scale), interpolation="bilinear", flip_p=0.5 if flip else 0.0,
        jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0))


class TransformedSubset(Dataset):
    """``(transform(image), label)`` over the ``indices`` of ``base`` (all of it when None)."""

    def __init__(self, base: Dataset, transform: Callable, indices: Optional[Sequence[int]] = None) -> None:
        self.base, self.transform = base, transform
        self.indices = list(range(len(base))) if indices is None else [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Tuple[Any, int]:
        img, label = self.base[self.indices[i]]
        return self.transform(img), int(label)


class SeededAugmentDataset(TransformedSubset):
    """Like `TransformedSubset`, keyed by ``(epoch, i)``: the random transform of item i in an
    epoch is drawn from torch's generator seeded with ``mix_seed(seed, epoch, i)`` (caller's RNG untouched)."""

    def __init__(self, base: Dataset, transform: Callable, indices: Optional[Sequence[int]] = None,
                 seed: int = 0) -> None:
        super().__init__(base, transform, indices)
        self.seed = int(seed)

    def __getitem__(self, key: Union[int, Tuple[int, int]]) -> Tuple[Any, int]:  # type: ignore[override]
        epoch, i = key if isinstance(key, tuple) else (0, key)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(mix_seed(self.seed, _AUGMENT_STREAM, epoch, i))
            return super().__getitem__(i)


def eval_view(base: Dataset, image_size: int, indices: Optional[Sequence[int]] = None) -> TransformedSubset:
    """Validation-transformed view (`build_eval_transform`: resize, center crop) of ``base``."""
    return TransformedSubset(base, build_eval_transform(image_size), indices)
