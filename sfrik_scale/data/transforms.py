"""Two-view augmentations (torchvision pipeline), built from one description per view.

A view is described by one `ViewAugmentation` (a frozen dataclass, or the equivalent
dict from a YAML recipe); `build_view_transform` turns it into a pipeline of small
operators, each built by one function of `VIEW_OPS` and left out when its
probability is 0 (solo-learn style). `TwoViewTransform(desc1, desc2)` applies both
pipelines to one image. The DALI pipeline (`sfrik_scale.data.dali`) reads the same descriptions.

Pipeline of one view, in order (the VICReg / SimCLR order):
    RandomResizedCrop -> horizontal flip -> colour jitter (with prob.) -> grayscale
    -> gaussian blur -> solarisation -> float in [0, 1] -> normalisation
The geometric and colour operators run on PIL images (faster than tensors at these
sizes); blur, solarisation and normalisation run on uint8 / float tensors.

Randomness: every operator draws from torch's global generator, so one
``torch.manual_seed`` before a call fixes both views (`TwoViewDataset` in
``sfrik_scale.data`` seeds per sample); the two views, and successive samples, use
successive draws, so their random choices are independent.

Named sets (`AUGMENTATIONS`, ``build_two_view_transform(name, image_size)``):
- "sfrik" / "vicreg": the VICReg recipe the SFRIK paper uses (VICReg, Bardes et al.
  2022, appendix; SFRIK's ``ImageNetVICRegTrainTransform``).
- "simclr": SimCLR (Chen et al. 2020, appendix A), as in SFRIK's
  ``ImageNetSimCLRTrainTransform``: jitter 0.8/0.8/0.8/0.2 with p=0.8, blur p=0.5 on
  both views, no solarisation.
- "alignment_uniformity": Wang & Isola (2020)'s recipe from their released STL-10
  code (github.com/SsnL/align_uniform, examples/stl10/main.py), which SFRIK's
  ``STL10AUHTrainTransform`` reuses: RandomResizedCrop scale (0.08, 1),
  ColorJitter(0.4, 0.4, 0.4, 0.4) always applied, grayscale 0.2, no blur, no
  solarisation. (Their ImageNet-100 runs used the MoCo codebase, whose crop scale is
  (0.2, 1); SFRIK's own ImageNet comparison trains the alignment-uniformity loss with
  the VICReg augmentations, i.e. the "sfrik" set.) We keep the ImageNet normalisation.
- "small": the small-image recipes' set (``small_*``, images of 64 px or less): the
  alignment-uniformity set with RandomResizedCrop scale (0.3, 1), brightness and contrast
  jitter only, and horizontal flips; "small_flip" is the same (an older name).
Flips are dropped from every named set on datasets whose mirror images are other classes
(digits; ``sfrik_scale.data.mirror_invariant``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
from PIL import Image

from sfrik_scale.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageLike = Union[Image.Image, torch.Tensor, np.ndarray]


@dataclass(frozen=True)
class ViewAugmentation:
    """Description of the augmentations of one view (defaults: VICReg view 1 at 224 px)."""

    size: int = 224
    """Output side in pixels of the RandomResizedCrop."""
    crop_scale: Tuple[float, float] = (0.08, 1.0)
    """Range of the crop's area as a fraction of the image area."""
    crop_ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    """Range of the crop's aspect ratio (width / height)."""
    interpolation: str = "bicubic"
    """Resampling of the crop: "bicubic", "bilinear" or "nearest"."""
    flip_p: float = 0.5
    """Probability of a horizontal flip."""
    jitter_p: float = 0.8
    """Probability of applying the colour jitter (all four factors together)."""
    brightness: float = 0.4
    """Brightness factor drawn in [1 - b, 1 + b]."""
    contrast: float = 0.4
    """Contrast factor drawn in [1 - c, 1 + c]."""
    saturation: float = 0.2
    """Saturation factor drawn in [1 - s, 1 + s]."""
    hue: float = 0.1
    """Hue shift drawn in [-h, h] (fraction of the colour wheel, at most 0.5)."""
    grayscale_p: float = 0.2
    """Probability of converting to grayscale (kept as 3 equal channels)."""
    blur_p: float = 1.0
    """Probability of a gaussian blur."""
    blur_sigma: Tuple[float, float] = (0.1, 2.0)
    """Range of the blur's standard deviation in pixels, drawn uniformly."""
    blur_kernel_fraction: float = 0.1
    """Blur kernel side as a fraction of ``size``, rounded to an odd integer >= 3 (SimCLR: 10 %)."""
    solarize_p: float = 0.0
    """Probability of solarisation (pixels >= ``solarize_threshold`` inverted)."""
    solarize_threshold: int = 128
    """Solarisation threshold on the uint8 scale (PIL's ImageOps.solarize default)."""
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel mean subtracted after scaling to [0, 1]."""
    std: Tuple[float, float, float] = IMAGENET_STD
    """Per-channel standard deviation divided by after scaling to [0, 1]."""

    def __post_init__(self) -> None:
        # YAML gives lists; store tuples so descriptions stay hashable and comparable.
        for name in ("crop_scale", "crop_ratio", "blur_sigma", "mean", "std"):
            object.__setattr__(self, name, tuple(float(x) for x in getattr(self, name)))
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
        for name, (lo, hi) in (("crop_scale", self.crop_scale), ("crop_ratio", self.crop_ratio),
                               ("blur_sigma", self.blur_sigma)):
            if not 0.0 < lo <= hi:
                raise ValueError(f"{name} must satisfy 0 < low <= high, got {(lo, hi)}")
        if self.crop_scale[1] > 1.0:
            raise ValueError(f"crop_scale must lie in (0, 1], got {self.crop_scale}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0.0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue}")
        if self.interpolation not in _INTERPOLATION:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATION)}, got {self.interpolation!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 entries with std > 0, got {self.mean}, {self.std}")
        if not 0 <= self.solarize_threshold <= 256:
            raise ValueError(f"solarize_threshold must be in [0, 256], got {self.solarize_threshold}")

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> "ViewAugmentation":
        """Build from a dict (e.g. a YAML recipe); unknown keys raise ValueError naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown view augmentation key(s) {unknown}; known: {sorted(known)}")
        return cls(**fields)

    @property
    def blur_kernel_size(self) -> int:
        return blur_kernel_size(self.size, self.blur_kernel_fraction)


_INTERPOLATION = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST,
}


def blur_kernel_size(image_size: int, fraction: float = 0.1) -> int:
    """Odd kernel side ~ ``fraction`` x ``image_size``, at least 3 (23 at 224, 3 at 32)."""
    k = int(round(fraction * image_size))
    return max(3, k if k % 2 == 1 else k + 1)


# ---------------------------------------------------------------------------------
# Operators that torchvision lacks in the form we need.
# ---------------------------------------------------------------------------------
class ToUint8Tensor:
    """PIL image / HWC uint8 array / CHW uint8 tensor -> CHW uint8 ``torch.Tensor``."""

    def __call__(self, img: ImageLike) -> torch.Tensor:
        if isinstance(img, Image.Image):
            img = np.array(img.convert("RGB") if img.mode != "RGB" else img)  # a writable copy
        if isinstance(img, np.ndarray):
            if img.ndim != 3 or img.shape[2] != 3:
                raise ValueError(f"expected an (H, W, 3) array, got shape {img.shape}")
            return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).contiguous()
        if not isinstance(img, torch.Tensor) or img.dtype != torch.uint8 or img.ndim != 3 or img.shape[0] != 3:
            raise ValueError(f"expected a (3, H, W) uint8 tensor, got {type(img).__name__} "
                             f"{getattr(img, 'dtype', '')} {tuple(getattr(img, 'shape', ()))}")
        return img.as_subclass(torch.Tensor)

    def __repr__(self) -> str:
        return "ToUint8Tensor()"


class RandomGaussianBlur:
    """Gaussian blur with probability ``p``, sigma ~ U(sigma), a ``kernel_size`` x ``kernel_size`` kernel.

    Same result as torchvision's ``GaussianBlur`` (normalised truncated kernel, reflect
    padding, rounding back to uint8) but separable: 2k multiply-adds per pixel instead
    of k^2, 6x faster at 224 px. Input and output: uint8 tensor (3, H, W).
    """

    def __init__(self, kernel_size: int, sigma: Tuple[float, float], p: float) -> None:
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
        self.kernel_size, self.sigma, self.p = kernel_size, sigma, p

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if self.p < 1.0 and torch.rand(1).item() >= self.p:
            return img
        sigma = torch.empty(1).uniform_(self.sigma[0], self.sigma[1]).item()
        k, pad = self.kernel_size, self.kernel_size // 2
        _, h, w = img.shape
        if pad >= h or pad >= w:  # reflect padding needs pad < side; tiny inputs are left as they are
            return img
        x = torch.arange(k, dtype=torch.float32) - (k - 1) / 2
        weights = torch.exp(-0.5 * (x / sigma) ** 2)
        weights = (weights / weights.sum()).tolist()
        f = F.pad(img.float().unsqueeze(0), (pad, pad, pad, pad), mode="reflect").squeeze(0)
        rows = f[:, :, 0:w] * weights[0]  # horizontal pass as a sum of shifted copies
        for i in range(1, k):
            rows.add_(f[:, :, i:i + w], alpha=weights[i])
        out = rows[:, 0:h] * weights[0]  # vertical pass
        for i in range(1, k):
            out.add_(rows[:, i:i + h], alpha=weights[i])
        return out.round_().clamp_(0, 255).to(torch.uint8)

    def __repr__(self) -> str:
        return f"RandomGaussianBlur(kernel_size={self.kernel_size}, sigma={self.sigma}, p={self.p})"


class RandomSolarize:
    """Invert the pixels >= ``threshold`` (uint8 tensor) with probability ``p``."""

    def __init__(self, threshold: int, p: float) -> None:
        self.threshold, self.p = threshold, p

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if self.p < 1.0 and torch.rand(1).item() >= self.p:
            return img
        return torch.where(img >= self.threshold, 255 - img, img)

    def __repr__(self) -> str:
        return f"RandomSolarize(threshold={self.threshold}, p={self.p})"


class ToNormalizedFloat:
    """uint8 tensor (3, H, W) -> float32 ``(x / 255 - mean) / std``."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return img.float().div_(255.0).sub_(self.mean).div_(self.std)

    def __repr__(self) -> str:
        mean, std = tuple(self.mean.flatten().tolist()), tuple(self.std.flatten().tolist())
        return f"ToNormalizedFloat(mean={mean}, std={std})"


# ---------------------------------------------------------------------------------
# One builder per operator: description -> operator, or None when disabled.
# ---------------------------------------------------------------------------------
def _crop(d: ViewAugmentation) -> Callable:
    return T.RandomResizedCrop(d.size, scale=d.crop_scale, ratio=d.crop_ratio,
                               interpolation=_INTERPOLATION[d.interpolation], antialias=True)


def _flip(d: ViewAugmentation) -> Optional[Callable]:
    return T.RandomHorizontalFlip(d.flip_p) if d.flip_p > 0 else None


def _color_jitter(d: ViewAugmentation) -> Optional[Callable]:
    if d.jitter_p == 0 or not any((d.brightness, d.contrast, d.saturation, d.hue)):
        return None
    jitter = T.ColorJitter(d.brightness, d.contrast, d.saturation, d.hue)
    return jitter if d.jitter_p == 1.0 else T.RandomApply([jitter], p=d.jitter_p)


def _grayscale(d: ViewAugmentation) -> Optional[Callable]:
    return T.RandomGrayscale(d.grayscale_p) if d.grayscale_p > 0 else None


def _to_tensor(d: ViewAugmentation) -> Callable:
    return ToUint8Tensor()


def _blur(d: ViewAugmentation) -> Optional[Callable]:
    return RandomGaussianBlur(d.blur_kernel_size, d.blur_sigma, d.blur_p) if d.blur_p > 0 else None


def _solarize(d: ViewAugmentation) -> Optional[Callable]:
    return RandomSolarize(d.solarize_threshold, d.solarize_p) if d.solarize_p > 0 else None


def _normalize(d: ViewAugmentation) -> Callable:
    return ToNormalizedFloat(d.mean, d.std)


VIEW_OPS: Tuple[Callable[[ViewAugmentation], Optional[Callable]], ...] = (
    _crop, _flip, _color_jitter, _grayscale, _to_tensor, _blur, _solarize, _normalize,
)
"""Operator builders applied in this order; PIL operators come before ``_to_tensor``."""


def as_view_augmentation(desc: Union[ViewAugmentation, Mapping[str, Any]]) -> ViewAugmentation:
    return desc if isinstance(desc, ViewAugmentation) else ViewAugmentation.from_dict(desc)


def build_view_transform(desc: Union[ViewAugmentation, Mapping[str, Any]]) -> T.Compose:
    """The pipeline of one view: image (PIL RGB or uint8 (3, H, W)) -> float32 (3, size, size)."""
    desc = as_view_augmentation(desc)
    return T.Compose([op for op in (build(desc) for build in VIEW_OPS) if op is not None])


class TwoViewTransform:
    """Applies two view pipelines to one image: ``img -> (view1, view2)``, each float32 (3, size, size).

    Example:
        >>> desc1, desc2 = AUGMENTATIONS.get("sfrik")(32)
        >>> v1, v2 = TwoViewTransform(desc1, desc2)(pil_image)
    """

    def __init__(self, desc1: Union[ViewAugmentation, Mapping[str, Any]],
                 desc2: Union[ViewAugmentation, Mapping[str, Any]]) -> None:
        self.desc1, self.desc2 = as_view_augmentation(desc1), as_view_augmentation(desc2)
        if self.desc1.size != self.desc2.size:
            raise ValueError(
                f"both views need the same size to be batched, got {self.desc1.size} and {self.desc2.size}")
        self.view1 = build_view_transform(self.desc1)
        self.view2 = build_view_transform(self.desc2)

    def __call__(self, img: ImageLike) -> Tuple[torch.Tensor, torch.Tensor]:
        if isinstance(img, Image.Image) and img.mode != "RGB":
            img = img.convert("RGB")
        return self.view1(img), self.view2(img)

    def __repr__(self) -> str:
        return f"TwoViewTransform(\n  view1={self.view1},\n  view2={self.view2})"


# ---------------------------------------------------------------------------------
# Named two-view sets: name -> (image_size -> (view1 description, view2 description)).
# ---------------------------------------------------------------------------------
AugmentationSet = Callable[[int], Tuple[ViewAugmentation, ViewAugmentation]]
AUGMENTATIONS: Registry[AugmentationSet] = Registry("augmentation set")


def _vicreg(image_size: int) -> Tuple[ViewAugmentation, ViewAugmentation]:
    view1 = ViewAugmentation(size=image_size, blur_p=1.0, solarize_p=0.0)
    return view1, dataclasses.replace(view1, blur_p=0.1, solarize_p=0.2)


AUGMENTATIONS.register("sfrik", summary="the same as vicreg")(_vicreg)
AUGMENTATIONS.register("vicreg", summary="the SFRIK paper's, ImageNet at 224 px")(_vicreg)


@AUGMENTATIONS.register("simclr", summary="SimCLR's, strong colour jitter")
def _simclr(image_size: int) -> Tuple[ViewAugmentation, ViewAugmentation]:
    view = ViewAugmentation(size=image_size, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2,
                            jitter_p=0.8, grayscale_p=0.2, blur_p=0.5, solarize_p=0.0)
    return view, view


@AUGMENTATIONS.register("alignment_uniformity", summary=(
    "Wang & Isola's small-image pipeline, used for STL10"))
def _alignment_uniformity(image_size: int) -> Tuple[ViewAugmentation, ViewAugmentation]:
    view = ViewAugmentation(size=image_size, crop_scale=(0.08, 1.0), brightness=0.4, contrast=0.4,
                            saturation=0.4, hue=0.4, jitter_p=1.0, grayscale_p=0.2, blur_p=0.0, solarize_p=0.0)
    return view, view


@AUGMENTATIONS.register("small", summary=(
    "alignment_uniformity with crops of at least 30 % of the image and brightness and contrast jitter only: "
    "the demo and small_* recipes, images of 64 px or less"))
def _small(image_size: int) -> Tuple[ViewAugmentation, ViewAugmentation]:
    """The small-image recipes' views (images of 64 px or less): Wang & Isola's set with crops of
    at least 30 % of the image instead of 8 %, brightness and contrast jitter only (no
    saturation, hue or grayscale) and horizontal flips (p = 0.5).

    At 32 px an 8 % crop is a 9 px patch upsampled 3.5x. At this size colour is often what
    tells the classes apart: on a 10-class folder of 32 px photo patches, dropping the hue,
    saturation and grayscale steps raised the probe from 74.8 % to 90.5 % after 10 epochs
    (docs/evaluation.md). On grayscale images those steps are identities, so this set draws
    the same views there as Wang & Isola's colour steps. Flips: on datasets whose mirror
    images are other classes (`sfrik_scale.data.mirror_invariant`: digits) the pretraining
    views of every named set do not flip; on digits flipping cost 1.1 points of kNN accuracy
    over 3 seeds, on the photo patches not flipping cost 1.1 and 7.6 probe points (seeds 1 and 0)."""
    view = dataclasses.replace(_alignment_uniformity(image_size)[0], crop_scale=(0.3, 1.0), flip_p=0.5,
                               saturation=0.0, hue=0.0, grayscale_p=0.0)
    return view, view


@AUGMENTATIONS.register("small_flip", summary="the same as small (kept for configurations written before flips "
                        "were decided by the dataset)")
def _small_flip(image_size: int) -> Tuple[ViewAugmentation, ViewAugmentation]:
    """The same views as "small": its name is kept so that run directories whose config.yaml
    names it still load."""
    return _small(image_size)


def build_two_view_transform(name: str, image_size: int) -> TwoViewTransform:
    """The named augmentation set (see `AUGMENTATIONS`) at ``image_size`` px."""
    desc1, desc2 = AUGMENTATIONS.get(name)(image_size)
    return TwoViewTransform(desc1, desc2)


#: Images evaluated at this side or smaller are taken whole (resize to the side, no border crop).
SMALL_IMAGE_SIZE = 64


def eval_resize_size(image_size: int) -> int:
    """Short side the evaluation transform resizes to before its centre crop of ``image_size``.

    ImageNet-sized inputs: 256/224 x size (256 at 224), the VICReg / SFRIK evaluation
    geometry, which trims a border of ~6 % per side. Small images (side <= `SMALL_IMAGE_SIZE`):
    the size itself, so nothing is cropped, as CIFAR/STL evaluations do; the pretraining
    views of these recipes cover up to the whole image, and trimming the border of a 32 px
    digit cut off its strokes (docs/evaluation.md, "Why the first digits runs learned little").
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    return image_size if image_size <= SMALL_IMAGE_SIZE else int(math.floor(image_size * 256 / 224 + 0.5))


def build_eval_transform(image_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                         std: Sequence[float] = IMAGENET_STD) -> T.Compose:
    """Evaluation transform: resize the short side to `eval_resize_size` (256 at 224; the
    size itself up to 64 px), center crop, normalise.

    Output: float32 (3, image_size, image_size). Bilinear resize, as in the VICReg and
    SFRIK evaluation scripts (torchvision's default).
    """
    resize = eval_resize_size(image_size)
    return T.Compose([
        T.Resize(resize, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
        T.CenterCrop(image_size),
        ToUint8Tensor(),
        ToNormalizedFloat(mean, std),
    ])


__all__: List[str] = [
    "IMAGENET_MEAN", "IMAGENET_STD", "ViewAugmentation", "VIEW_OPS", "AUGMENTATIONS",
    "TwoViewTransform", "build_view_transform", "build_two_view_transform", "build_eval_transform",
    "blur_kernel_size", "eval_resize_size", "SMALL_IMAGE_SIZE", "RandomGaussianBlur", "RandomSolarize", "ToUint8Tensor", "ToNormalizedFloat",
]
