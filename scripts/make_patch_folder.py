#!/usr/bin/env python
"""Write an ImageFolder of small real images cut from scikit-image's bundled photographs.

    pip install scikit-image      # not a dependency of sfrik-scale; its wheel carries the photos
    python scripts/make_patch_folder.py /tmp/patches        # 8,000 train + 2,000 val PNGs, 32 px

Ten classes, one per photograph (astronaut, brick, camera, chelsea, coffee, coins, grass,
gravel, hubble_deep_field, rocket): each image is a random square window (side 12-40 % of
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

PHOTOS = ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel", "hubble_deep_field",
          "rocket")


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
    a = p.parse_args()
    import skimage.data

    rng = np.random.default_rng(a.seed)
    for name in PHOTOS:
        photo = getattr(skimage.data, name)()
        photo = np.repeat(photo[:, :, None], 3, axis=2) if photo.ndim == 2 else photo[:, :, :3]
        for split, count, region in (("train", a.train_per_class, (0.0, 0.7)), ("val", a.val_per_class, (0.7, 1.0))):
            folder = a.out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i, img in enumerate(windows(photo, count, region, a.size, rng)):
                img.save(folder / f"{name}_{i:04d}.png")
    print(f"wrote {len(PHOTOS) * a.train_per_class} train and {len(PHOTOS) * a.val_per_class} val images under {a.out}")


if __name__ == "__main__":
    main()
