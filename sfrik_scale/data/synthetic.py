"""A built-in, download-free image dataset with class structure: the trainer's default.

Each class is one combination of three attributes, chosen so that classes differ in
several cues at once and survive the SSL augmentations in different ways:

- shape: disk, square, triangle, ring, cross, diamond, bar (7; survives colour jitter
  and grayscale);
- palette: foreground hue in {0, 0.2, 0.4, 0.6, 0.8} (5; hue spacing 0.2 is twice the
  recipe's hue jitter of 0.1);
- texture: flat, coarse stripes, fine stripes inside the shape (3).

Class ``c`` has shape ``c mod 7``, palette ``c mod 5`` and texture ``c mod 3``; 7, 5 and
3 are pairwise coprime, so by the Chinese remainder theorem the first 105 classes are
all distinct combinations, and neighbouring classes differ in every attribute.

Each sample varies inside its class (position, scale, rotation, stripe orientation and
phase, a +-0.05 hue and a brightness shift, pixel noise) and carries class-free clutter
(a background of random colour with a gradient, a small distractor disk of random
colour), so augmentations matter and global colour statistics do not give the class
away. Sample ``i`` is a pure function of ``(seed, split, i)``: it is the same whatever
the worker, rank, epoch or process that asks for it. Labels are ``i mod num_classes``
(exactly balanced up to one sample).

Generation is vectorised numpy on an ``image_size`` x ``image_size`` grid: about
0.2 ms per 32x32 image and 0.55 ms per 64x64 on one CPU core.
"""
from __future__ import annotations

import colorsys
from typing import Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

SHAPES = ("disk", "square", "triangle", "ring", "cross", "diamond", "bar")
PALETTE_HUES = (0.0, 0.2, 0.4, 0.6, 0.8)
TEXTURES = ("flat", "coarse", "fine")
# Stripe frequency in cycles per shape radius (the shape spans about 2 radii).
_TEXTURE_FREQUENCY = {"flat": 0.0, "coarse": 1.0, "fine": 2.2}
MAX_CLASSES = len(SHAPES) * len(PALETTE_HUES) * len(TEXTURES)  # 105

_SPLIT_CODE = {"train": 0, "val": 1}

# Unit normals of the equilateral triangle's three sides.
_TRIANGLE_NORMALS = np.array(
    [[np.cos(a), np.sin(a)] for a in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3)]
)


def class_attributes(label: int) -> Tuple[str, float, str]:
    """(shape, foreground hue, texture) of class ``label`` (see the module docstring)."""
    if not 0 <= label < MAX_CLASSES:
        raise ValueError(f"label must be in [0, {MAX_CLASSES}), got {label}")
    return (
        SHAPES[label % len(SHAPES)],
        PALETTE_HUES[label % len(PALETTE_HUES)],
        TEXTURES[label % len(TEXTURES)],
    )


def _signed_distance(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Approximate signed distance to the shape boundary in shape units (< 0 inside)."""
    if shape == "disk":
        return np.sqrt(u * u + v * v) - 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) - 0.85
    if shape == "triangle":
        d = u[..., None] * _TRIANGLE_NORMALS[:, 0] + v[..., None] * _TRIANGLE_NORMALS[:, 1]
        return d.max(axis=-1) - 0.6
    if shape == "ring":
        return np.abs(np.sqrt(u * u + v * v) - 0.75) - 0.28
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return np.minimum(np.maximum(au - 1.0, av - 0.32), np.maximum(au - 0.32, av - 1.0))
    if shape == "diamond":
        return (np.abs(u) + np.abs(v) - 1.15) * 0.7071
    if shape == "bar":
        return np.maximum(np.abs(u) - 1.1, np.abs(v) - 0.33)
    raise ValueError(f"unknown shape {shape!r}")


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)), dtype=np.float32)


class SyntheticShapes(Dataset):
    """Procedurally generated RGB images of textured, coloured shapes on a background.

    Args:
        num_samples: number of images in this split.
        num_classes: number of classes, at most 105 (see the module docstring).
        image_size: side of the square images in pixels (at least 8).
        split: "train" or "val"; the two splits draw different images of the same classes.
        seed: dataset seed; sample ``i`` is a pure function of ``(seed, split, i)``.
        as_tensor: return a uint8 tensor (3, H, W) instead of a PIL RGB image.

    Returns (per item): ``(image, label)`` with ``image`` a PIL RGB image (or uint8
    tensor (3, image_size, image_size)) and ``label`` an int in [0, num_classes).

    Example:
        >>> ds = SyntheticShapes(num_samples=1000, num_classes=10, image_size=32)
        >>> img, label = ds[3]   # label == 3, img.size == (32, 32)
    """

    def __init__(
        self,
        num_samples: int = 10_000,
        num_classes: int = 10,
        image_size: int = 32,
        split: str = "train",
        seed: int = 0,
        as_tensor: bool = False,
    ) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if not 1 <= num_classes <= MAX_CLASSES:
            raise ValueError(f"num_classes must be in [1, {MAX_CLASSES}], got {num_classes}")
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        if split not in _SPLIT_CODE:
            raise ValueError(f"split must be one of {sorted(_SPLIT_CODE)}, got {split!r}")
        self.num_samples = int(num_samples)
        self.num_classes = int(num_classes)
        self.image_size = int(image_size)
        self.split = split
        self.seed = int(seed)
        self.as_tensor = as_tensor
        self.classes = ["/".join((s, f"hue{h:.1f}", t)) for s, h, t in map(class_attributes, range(num_classes))]
        # Pixel-centre coordinates in [-1, 1], shared by all samples.
        axis = (np.arange(self.image_size, dtype=np.float32) + 0.5) / self.image_size * 2.0 - 1.0
        self._y, self._x = np.meshgrid(axis, axis, indexing="ij")

    def __len__(self) -> int:
        return self.num_samples

    @property
    def targets(self) -> list[int]:
        """Labels of all samples, in index order (torchvision's attribute name)."""
        return [i % self.num_classes for i in range(self.num_samples)]

    def __repr__(self) -> str:
        return (
            f"SyntheticShapes(num_samples={self.num_samples}, num_classes={self.num_classes}, "
            f"image_size={self.image_size}, split={self.split!r}, seed={self.seed})"
        )

    def render(self, index: int) -> np.ndarray:
        """The uint8 (H, W, 3) pixels of sample ``index``."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        label = index % self.num_classes
        shape, hue, texture = class_attributes(label)
        # A generator per sample, keyed by (seed, split, index): same pixels in any process.
        rng = np.random.Generator(np.random.PCG64([self.seed, _SPLIT_CODE[self.split], index]))
        draws = rng.random(15)
        cx, cy = (draws[0] - 0.5) * 0.6, (draws[1] - 0.5) * 0.6  # centre within +-0.3
        radius = 0.3 + 0.35 * draws[2]  # shape radius: 30-65 % of the half-width
        angle = 2 * np.pi * draws[3]
        hue = hue + (draws[4] - 0.5) * 0.1  # +-0.05 around the palette hue
        value = 0.7 + 0.3 * draws[5]

        dx, dy = self._x - cx, self._y - cy
        c, s = np.cos(angle), np.sin(angle)
        u = (c * dx + s * dy) / radius
        v = (c * dy - s * dx) / radius
        # Soft (anti-aliased) mask: the signed distance converted to pixels.
        pixels_per_unit = radius * self.image_size / 2.0
        mask = np.clip(0.5 - _signed_distance(shape, u, v) * pixels_per_unit, 0.0, 1.0)

        fg_bright = _hsv(hue, 0.85, value)
        freq = _TEXTURE_FREQUENCY[texture]
        if freq > 0:
            t = np.pi * draws[6]
            stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (freq * (np.cos(t) * u + np.sin(t) * v) + draws[7]))
            fg_dark = _hsv(hue, 0.85, value * 0.35)
            fg = fg_dark + stripes[..., None] * (fg_bright - fg_dark)
        else:
            fg = fg_bright
        # Background and distractor carry no class information: their colours are random.
        bg_colour = _hsv(draws[8], 0.4, 0.3 + 0.3 * draws[9])
        gradient = 1.0 + 0.4 * ((draws[10] - 0.5) * self._x + (draws[11] - 0.5) * self._y)
        bg = gradient[..., None] * bg_colour
        blob_r = 0.08 + 0.1 * draws[12]
        blob_d = np.sqrt((self._x - 1.6 * draws[13] + 0.8) ** 2 + (self._y - 1.6 * draws[14] + 0.8) ** 2)
        blob = np.clip(0.5 - (blob_d - blob_r) * self.image_size / 2.0, 0.0, 1.0)[..., None]
        bg = bg + blob * (_hsv(rng.random(), 0.7, 0.8) - bg)
        m = mask[..., None]
        img = m * fg + (1.0 - m) * bg
        img += rng.normal(0.0, 0.03, size=img.shape).astype(np.float32)
        return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

    def __getitem__(self, index: int) -> Tuple[Union[Image.Image, torch.Tensor], int]:
        pixels = self.render(int(index))
        label = int(index) % self.num_classes
        if self.as_tensor:
            return torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), label
        return Image.fromarray(pixels, mode="RGB"), label
