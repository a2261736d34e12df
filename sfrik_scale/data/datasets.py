"""Datasets by name: the `DATASETS` registry and what builds from it.

``build_dataset(name, **options)`` gives an ``(image, label)`` dataset: "synthetic"
(procedurally generated, no download), "digits" (scikit-learn's bundled handwritten digits,
`sfrik_scale.data.real`), "image_folder" (``root/<class>/<image>``) and "file_list"
(``path label`` lines). ``build_eval_dataset`` adds the evaluation transform.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

from torch.utils.data import Dataset

from sfrik_scale.data.folder import BadFileLog, FileListDataset, ImageFolderDataset
from sfrik_scale.data.real import SklearnDigits
from sfrik_scale.data.synthetic import SyntheticShapes
from sfrik_scale.data.transforms import build_eval_transform
from sfrik_scale.options import Option
from sfrik_scale.registry import Registry


# ---------------------------------------------------------------------------------
# Datasets by name.
# ---------------------------------------------------------------------------------
DATASETS: Registry[Callable[..., Dataset]] = Registry("dataset")

#: the dataset of a run or an evaluation that names none (generated: no download)
DEFAULT_DATASET = "synthetic"


#: what the datasets that read files take from the configuration (``data.<name>``)
_FILE_OPTIONS = (
    Option("images_per_class", Optional[int], None, (
        "Keep only the first K images of each class (in sorted file order); 260 gives the paper's "
        "ImageNet 20% subset. None: all images."), minimum=1),
    Option("skip_bad_files", bool, True, (
        "Replace unreadable or corrupt images by another sample (counted, and named in TensorBoard and "
        "summary.json) instead of failing; false stops at the first bad file, naming it.")),
)


@DATASETS.register("synthetic", summary=(
    "procedurally generated images with class structure, no download, deterministic by train.seed"), options=(
    Option("num_classes", int, 10, "Number of classes of the synthetic dataset.", minimum=1),
    Option("synthetic_size", int, 4096, "Number of images in the synthetic dataset.", minimum=1)))
def _synthetic(*, split: str = "train", image_size: int = 32, seed: int = 0, num_samples: Optional[int] = None,
               num_classes: int = 10, **_: Any) -> Dataset:
    if num_samples is None:
        num_samples = 10_000 if split == "train" else 2_000
    return SyntheticShapes(num_samples=num_samples, num_classes=num_classes, image_size=image_size,
                           split=split, seed=seed)


@DATASETS.register("image_folder", summary="a tree root/<class>/<image>", options=_FILE_OPTIONS)
def _image_folder(*, root: Optional[str] = None, first_k_per_class: Optional[int] = None, strict: bool = False,
                  allow_empty_classes: bool = False, **_: Any) -> Dataset:
    if root is None:
        raise ValueError("dataset 'image_folder' needs root=<folder with one sub-folder per class>")
    return ImageFolderDataset(root, first_k_per_class=first_k_per_class, strict=strict,
                              allow_empty_classes=allow_empty_classes)


@DATASETS.register("file_list", summary="a text file of 'path label' lines", options=_FILE_OPTIONS)
def _file_list(*, list_file: Optional[str] = None, root: Optional[str] = None,
               first_k_per_class: Optional[int] = None, strict: bool = False, **_: Any) -> Dataset:
    if list_file is None:
        raise ValueError("dataset 'file_list' needs list_file=<text file of 'path label' lines>")
    return FileListDataset(list_file, root=root, first_k_per_class=first_k_per_class, strict=strict)


@DATASETS.register("digits", summary=(
    "scikit-learn's bundled 8x8 handwritten digits (real images, fixed train/val split, no download)"))
def _digits(*, split: str = "train", image_size: int = 32, **_: Any) -> Dataset:
    return SklearnDigits(split=split, image_size=image_size)


#: dataset name -> the options it takes from a run's data settings (``cfg.data``)
_PRETRAIN_OPTIONS: dict[str, Callable[[Any], dict]] = {
    "synthetic": lambda d: dict(num_samples=d.synthetic_size, num_classes=d.num_classes),
    "digits": lambda d: {},
    "image_folder": lambda d: dict(root=d.path, first_k_per_class=d.images_per_class, strict=not d.skip_bad_files),
    "file_list": lambda d: dict(list_file=d.path, first_k_per_class=d.images_per_class,
                                strict=not d.skip_bad_files),
}


#: datasets that read their images from a path: the factory's keyword for it, and what it is
_PATH_OPTIONS: dict[str, tuple[str, str]] = {
    "image_folder": ("root", "a folder root/<class>/<image>"),
    "file_list": ("list_file", "a file list"),
}

#: datasets whose images are generated from their settings alone (size, classes, seed)
_GENERATED = ("synthetic",)

#: datasets whose mirror images belong to other classes (a mirrored digit is another symbol):
#: the pretraining views of every named augmentation set do not flip on them
_MIRROR_SENSITIVE = ("digits",)


def mirror_invariant(name: str) -> bool:
    """Whether a mirrored image of dataset ``name`` still shows its class, so that the pretraining
    views may flip it: true for photographs (folders, file lists) and the synthetic shapes, false
    for symbols such as digits."""
    DATASETS.get(name)  # an unknown name: KeyError listing the registered ones
    return name not in _MIRROR_SENSITIVE


def reads_path(name: str) -> bool:
    """Whether dataset ``name`` reads its images from ``data.path`` (a folder or a list file)."""
    return name in _PATH_OPTIONS


def path_option(name: str) -> tuple[str, str]:
    """``(keyword, what)`` of a dataset that `reads_path`: the factory's keyword the path is given
    as ("root", "list_file"), and what the path must be, for messages."""
    return _PATH_OPTIONS[name]


def is_generated(name: str) -> bool:
    """Whether dataset ``name`` generates its images from its settings (size, classes, seed)."""
    return name in _GENERATED


def pretrain_options(name: str, settings: Any) -> dict:
    """The keyword arguments of dataset ``name`` read from a run's data settings (an object with
    the ``data`` section's attributes); a dataset registered without an entry takes none."""
    DATASETS.get(name)  # an unknown name: KeyError listing the registered ones
    return _PRETRAIN_OPTIONS.get(name, lambda d: {})(settings)


def _dataset_keys() -> set:
    keys = set()
    for name in DATASETS:
        params = inspect.signature(DATASETS.get(name)).parameters.values()
        keys |= {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    return keys


def build_dataset(name: str = DEFAULT_DATASET, **kwargs: Any) -> Dataset:
    """The ``(image, label)`` dataset registered as ``name`` ("synthetic", "image_folder", "file_list").

    One data config can be passed whole: a key that another dataset uses is ignored
    (split, image_size, seed, num_samples, num_classes for synthetic; root, list_file,
    first_k_per_class, strict, allow_empty_classes for files), a key no dataset uses
    raises ValueError naming it (a typo must not silently change the data).
    """
    factory = DATASETS.get(name)
    unknown = sorted(set(kwargs) - _dataset_keys())
    if unknown:
        raise ValueError(f"unknown dataset option(s) {unknown}; known: {sorted(_dataset_keys())}")
    return factory(**kwargs)


def build_eval_dataset(name: str = DEFAULT_DATASET, *, image_size: int = 32, split: str = "val", **kwargs: Any) -> Dataset:
    """``(image float32 (3, S, S), label)`` through `build_eval_transform` (resize to eval_resize_size(S): 256/224 x S, or S up to 64 px; center crop S)."""
    base = build_dataset(name, image_size=image_size, split=split, **kwargs)
    return TransformedDataset(base, build_eval_transform(image_size))


class TransformedDataset(Dataset):
    """``(transform(image), label)`` over an ``(image, label)`` dataset; ``bad_files`` passes through."""

    def __init__(self, base: Dataset, transform: Callable) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    @property
    def bad_files(self) -> BadFileLog:
        return getattr(self.base, "bad_files", BadFileLog())

    def __getitem__(self, index: int):
        img, label = self.base[index]
        return self.transform(img), label

    def __repr__(self) -> str:
        return f"TransformedDataset({self.base!r})"
