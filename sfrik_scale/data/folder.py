"""Datasets of image files: ImageFolder layouts and file lists, robust to bad files.

Layouts:
- `ImageFolderDataset`: ``root/<class>/**/<image>`` like ``torchvision.datasets.ImageFolder``:
  classes are the sorted sub-folder names, files are walked in sorted order (symlinks
  followed), so indices and labels match torchvision's for the same folder.
- `FileListDataset`: a text file with one ``relative/path.jpg <label>`` per line
  (paths may contain spaces; blank lines and ``#`` comments are skipped), resolved
  against ``root``.

``first_k_per_class=k`` keeps the first k images of each class in sorted path order
(the SFRIK ImageNet 20 % subset is k = 260); a class with fewer keeps all of them.

Bad input, found at construction (always a clear error):
- missing root or list file: FileNotFoundError; no class folders, malformed list line:
  ValueError naming it;
- an empty class folder: ValueError naming the folder(s), because an empty class
  usually means an incomplete copy of the data and silently shifting or dropping a
  label would corrupt every label-based evaluation; ``allow_empty_classes=True``
  keeps the class (its label stays reserved, so labels still match the folder names)
  and warns instead;
- files whose extension is not an image extension (``README``, ``.DS_Store``) are not
  samples: they are listed in ``ignored_files``, as torchvision ignores them.

Bad input, found when a file is read (corrupt or truncated JPEGs, non-image content
behind an image name, unreadable or vanished files):
- default (``strict=False``): the file is recorded in ``bad_files`` (path -> reason)
  and the item is replaced by the next readable sample in index order (wrapping
  around), so a batch never loses its size and the replacement is deterministic;
- ``strict=True``: `BadImageError` at once, naming the file.
Corruption that the decoder does not detect (garbled entropy-coded data that still
decodes) cannot be caught here.

Under a DataLoader each worker holds its own copy of the dataset; the two-view loader
(``sfrik_scale.data.build_loader``) carries the workers' new records back to the main
process with each batch and merges them into ``loader.bad_files``.
"""
from __future__ import annotations

import os
import warnings
from collections import defaultdict
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from PIL import Image
from torch.utils.data import Dataset

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class BadImageError(RuntimeError):
    """A file could not be read or decoded as an image (``path`` names it)."""

    def __init__(self, message: str, path: Optional[str] = None) -> None:
        # One positional message keeps the error re-raisable by DataLoader workers.
        super().__init__(message)
        self.path = path


class BadFileLog:
    """Files that could not be used: path -> reason, in the order they were first seen.

    ``replacements`` counts the items served by a replacement sample (a bad file is
    hit again every epoch). ``take_news()`` hands out what was added since its last
    call; DataLoader workers use it to send their news to the main process with each
    batch, where ``merge`` adds them.
    """

    def __init__(self) -> None:
        self._reasons: Dict[str, str] = {}
        self._new_records: List[Tuple[str, str]] = []
        self._new_replacements = 0
        self.replacements = 0

    def record(self, path: str, reason: str) -> None:
        if path not in self._reasons:
            self._reasons[path] = reason
            self._new_records.append((path, reason))

    def count_replacement(self) -> None:
        self.replacements += 1
        self._new_replacements += 1

    def take_news(self) -> Tuple[List[Tuple[str, str]], int]:
        """(records added, replacements counted) since the previous call."""
        news = (self._new_records, self._new_replacements)
        self._new_records, self._new_replacements = [], 0
        return news

    def merge(self, records: Sequence[Tuple[str, str]], replacements: int = 0) -> None:
        for path, reason in records:
            if path not in self._reasons:
                self._reasons[path] = reason
        self.replacements += replacements

    def __contains__(self, path: object) -> bool:
        return path in self._reasons

    def __len__(self) -> int:
        return len(self._reasons)

    def __iter__(self) -> Iterator[str]:
        return iter(self._reasons)

    def as_dict(self) -> Dict[str, str]:
        """``{path: reason}`` for logging and the run summary."""
        return dict(self._reasons)

    def __repr__(self) -> str:
        return f"BadFileLog({len(self)} bad files, {self.replacements} replacements)"


def pil_loader(path: str) -> Image.Image:
    """Read and fully decode ``path`` as an RGB PIL image (``convert`` forces the decode)."""
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


class _FileDataset(Dataset):
    """Shared machinery: ``samples`` = [(path, label)], decoding with replacement or strict errors."""

    samples: List[Tuple[str, int]]
    classes: List[str]

    def __init__(self, transform: Optional[Callable], strict: bool, loader: Callable[[str], object]) -> None:
        self.transform = transform
        self.strict = strict
        self.loader = loader
        self.bad_files = BadFileLog()

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> List[int]:
        return [label for _, label in self.samples]

    def _load(self, index: int):
        path, label = self.samples[index]
        try:
            img = self.loader(path)
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
            reason = f"{type(exc).__name__}: {exc}"
            if self.strict:
                raise BadImageError(f"cannot read image {path!r}: {reason}", path) from exc
            self.bad_files.record(path, reason)
            return None
        return img, label

    def __getitem__(self, index: int):
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index %= n
        for offset in range(n):  # the item itself, then the next ones (deterministic replacement)
            j = (index + offset) % n
            if self.samples[j][0] in self.bad_files:
                continue
            item = self._load(j)
            if item is not None:
                if offset:
                    self.bad_files.count_replacement()
                img, label = item
                if self.transform is not None:
                    img = self.transform(img)
                return img, label
        raise BadImageError(f"no readable image among the {n} files of {self!r}")


def _keep_first_k(samples: List[Tuple[str, int]], k: Optional[int]) -> List[Tuple[str, int]]:
    if k is None:
        return samples
    if k < 1:
        raise ValueError(f"first_k_per_class must be >= 1, got {k}")
    by_class: Dict[int, List[Tuple[str, int]]] = defaultdict(list)
    for path, label in samples:
        by_class[label].append((path, label))
    kept = []
    for label in sorted(by_class):
        kept.extend(sorted(by_class[label])[:k])
    return kept


class ImageFolderDataset(_FileDataset):
    """``root/<class>/**/<image>`` images with labels = index of the sorted class folder.

    Args:
        root: folder holding one sub-folder per class.
        transform: applied to the PIL RGB image.
        first_k_per_class: keep only the first k files of each class (sorted order).
        strict: raise `BadImageError` on the first unreadable file instead of replacing it.
        allow_empty_classes: warn instead of raising when a class folder has no image.
        extensions: file name endings counted as images (case-insensitive).

    Returns (per item): ``(image, label)``. See the module docstring for bad input.
    """

    def __init__(
        self,
        root: str,
        transform: Optional[Callable] = None,
        first_k_per_class: Optional[int] = None,
        strict: bool = False,
        allow_empty_classes: bool = False,
        extensions: Sequence[str] = IMG_EXTENSIONS,
        loader: Callable[[str], object] = pil_loader,
    ) -> None:
        super().__init__(transform, strict, loader)
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"image folder root {self.root!r} does not exist or is not a folder")
        self.classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
        if not self.classes:
            raise ValueError(f"no class folders in {self.root!r} (expected root/<class>/<image>)")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        exts = tuple(e.lower() for e in extensions)
        samples: List[Tuple[str, int]] = []
        self.ignored_files: List[str] = []
        empty: List[str] = []
        for label, cls in enumerate(self.classes):
            class_dir = os.path.join(self.root, cls)
            found = 0
            for dirpath, _, filenames in sorted(os.walk(class_dir, followlinks=True)):
                for name in sorted(filenames):
                    path = os.path.join(dirpath, name)
                    if name.lower().endswith(exts):
                        samples.append((path, label))
                        found += 1
                    else:
                        self.ignored_files.append(path)
            if found == 0:
                empty.append(class_dir)
        if empty:
            message = (f"{len(empty)} class folder(s) without any image ({', '.join(exts)}): "
                       + ", ".join(repr(p) for p in empty))
            if not allow_empty_classes:
                raise ValueError(message + "; remove or fill them (an empty class would still take a label "
                                 "number), or, from Python, pass ImageFolderDataset(..., allow_empty_classes=True)")
            warnings.warn(message + "; kept as empty classes", stacklevel=2)
        self.empty_classes = [os.path.basename(p) for p in empty]
        self.samples = _keep_first_k(samples, first_k_per_class)

    def __repr__(self) -> str:
        return f"ImageFolderDataset(root={self.root!r}, {len(self)} images, {len(self.classes)} classes)"


class FileListDataset(_FileDataset):
    """Images listed in a text file, one ``relative/path.jpg <integer label>`` per line.

    Args:
        list_file: the list; paths are relative to ``root`` (absolute paths are kept).
        root: folder the listed paths are relative to (default: the list file's folder).
        transform, first_k_per_class, strict, loader: as for `ImageFolderDataset`.

    ``classes`` are the label numbers as strings, ``0 .. max label``.
    """

    def __init__(
        self,
        list_file: str,
        root: Optional[str] = None,
        transform: Optional[Callable] = None,
        first_k_per_class: Optional[int] = None,
        strict: bool = False,
        loader: Callable[[str], object] = pil_loader,
    ) -> None:
        super().__init__(transform, strict, loader)
        self.list_file = os.fspath(list_file)
        if not os.path.isfile(self.list_file):
            raise FileNotFoundError(f"file list {self.list_file!r} does not exist")
        self.root = os.fspath(root) if root is not None else os.path.dirname(os.path.abspath(self.list_file))
        samples: List[Tuple[str, int]] = []
        with open(self.list_file, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                parts = line.rsplit(maxsplit=1)  # the path may contain spaces, the label cannot
                try:
                    if len(parts) != 2:
                        raise ValueError
                    label = int(parts[1])
                    if label < 0:
                        raise ValueError
                except ValueError:
                    raise ValueError(
                        f"{self.list_file}:{lineno}: expected '<path> <label >= 0>', got {line!r}") from None
                samples.append((os.path.join(self.root, parts[0]), label))
        num_classes = max((label for _, label in samples), default=-1) + 1
        self.classes = [str(i) for i in range(num_classes)]
        self.ignored_files: List[str] = []
        self.samples = _keep_first_k(samples, first_k_per_class)

    def __repr__(self) -> str:
        return f"FileListDataset(list_file={self.list_file!r}, root={self.root!r}, {len(self)} images)"


def check_dataset_size(dataset, global_batch: int) -> None:
    """Raise ValueError before training when ``dataset`` cannot fill one global batch.

    ``global_batch`` = micro-batch x gradient accumulation x world size: with the
    drop-last sharding every step needs that many distinct samples.
    """
    if global_batch < 1:
        raise ValueError(f"global batch must be >= 1, got {global_batch}")
    n = len(dataset)
    if n == 0:
        raise ValueError(f"dataset {dataset!r} is empty: nothing to train on")
    if n < global_batch:
        raise ValueError(
            f"dataset {dataset!r} has {n} samples, fewer than one global batch of {global_batch} "
            "(micro-batch x gradient accumulation x world size); add data or lower the batch size"
        )
