#!/usr/bin/env python
"""Write an ImageFolder of small real images cut from scikit-image's bundled photographs.

    pip install scikit-image      # in the test extra, not a dependency of sfrik-scale; its wheel carries the photos
    python scripts/make_patch_folder.py /tmp/patches        # 8,000 train + 2,000 val PNGs, 32 px

Ten classes, one per photograph. ``--photos set1`` (the default): scikit-image's astronaut,
brick, camera, chelsea, coffee, coins, grass, gravel, hubble_deep_field, rocket. ``--photos
set2``, made after the small_* recipes were settled, as a second folder they were never run
on: the other bundled photographs at least 150 px on their shorter side, the first ten by
name (scikit-image's cell, clock_motion, immunohistochemistry, moon, motorcycle_left, page,
retina; scikit-learn's china and flower; matplotlib's grace_hopper). Each image is a random square window (side 12-40 % of
the photograph's shorter side, anywhere inside its region) resized to ``--size`` px.
Training windows come from the left 70 % of each photograph, validation windows from the
right 30 %, so no validation pixel was seen in training. This is the "other folder of
small real images" of docs/evaluation.md: the small_* recipes run on it untouched
(``data.dataset=image_folder data.path=/tmp/patches/train``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = {
    "set1": ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel", "hubble_deep_field",
             "rocket"),
    "set2": ("cell", "china", "clock_motion", "flower", "grace_hopper", "immunohistochemistry", "moon",
             "motorcycle_left", "page", "retina"),
}


def load_photo(name: str) -> np.ndarray:
    """One bundled photograph as an (H, W, 3) uint8 array (no download)."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        photo = load_sample_image(f"{name}.jpg")
    elif name == "grace_hopper":
        import matplotlib.cbook

        with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as img:
            photo = np.asarray(img.convert("RGB"))
    elif name == "clock_motion":
        import skimage.data

        photo = skimage.data.clock()
    elif name == "motorcycle_left":
        import skimage.data

        photo = skimage.data.stereo_motorcycle()[0]
    else:
        import skimage.data

        photo = getattr(skimage.data, name)()
    return np.repeat(photo[:, :, None], 3, axis=2) if photo.ndim == 2 else photo[:, :, :3]


def windows(photo: np.ndarray, count: int, region: tuple[float, float], size: int, rng: np.random.Generator):
    h, w = photo.shape[:2]
    x0, x1 = int(region[0] * w), int(region[1] * w)
    short = min(h, x1 - x0)
    for _ in range(count):
        side = int(rng.uniform(0.12, 0.4) * min(h, w))
        side = min(side, short)
        top = rng.integers(0, h - side + 1)
        left = rng.integers(x0, x1 - side + 1)
        crop = photo[top:top + side, left:left + side]
        yield Image.fromarray(crop).resize((size, size), Image.BILINEAR)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--train-per-class", type=int, default=800)
    p.add_argument("--val-per-class", type=int, default=200)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--photos", choices=sorted(PHOTOS), default="set1")
    a = p.parse_args()
    names = PHOTOS[a.photos]
    rng = np.random.default_rng(a.seed)
    for name in names:
        photo = load_photo(name)
        for split, count, region in (("train", a.train_per_class, (0.0, 0.7)), ("val", a.val_per_class, (0.7, 1.0))):
            folder = a.out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i, img in enumerate(windows(photo, count, region, a.size, rng)):
                img.save(folder / f"{name}_{i:04d}.png")
    print(f"wrote {len(names) * a.train_per_class} train and {len(names) * a.val_per_class} val images under {a.out}")


if __name__ == "__main__":
    main()
