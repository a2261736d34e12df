"""scripts/make_patch_folder.py: the stand-in folders of docs/evaluation.md ("Another folder of
small real images"). Validation windows must come only from the part of each photograph that
training never saw, and both photograph sets must load without a download."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_patch_folder.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("make_patch_folder", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_windows_stay_inside_their_region(script):
    # A photograph whose red channel is its column index: every pixel of a resized window
    # lies between the window's first and last column, so the values bound where it was cut.
    h, w = 120, 250
    photo = np.zeros((h, w, 3), np.uint8)
    photo[:, :, 0] = np.arange(w, dtype=np.uint8)[None, :]
    rng = np.random.default_rng(0)
    split = int(0.7 * w)
    train = [np.asarray(img)[:, :, 0] for img in script.windows(photo, 200, (0.0, 0.7), 32, rng)]
    val = [np.asarray(img)[:, :, 0] for img in script.windows(photo, 200, (0.7, 1.0), 32, rng)]
    assert max(int(t.max()) for t in train) <= split - 1
    assert min(int(v.min()) for v in val) >= split
    assert all(t.shape == (32, 32) for t in train + val)
    # the windows vary in size and place: not one crop repeated
    assert len({(int(t.min()), int(t.max())) for t in train}) > 100


@pytest.mark.parametrize("photos", ["set1", "set2"])
def test_the_folder_has_the_documented_layout(script, photos, tmp_path, monkeypatch):
    pytest.importorskip("skimage")
    out = tmp_path / photos
    monkeypatch.setattr(sys, "argv", ["make_patch_folder.py", str(out), "--photos", photos,
                                      "--train-per-class", "3", "--val-per-class", "2"])
    script.main()
    for split, count in (("train", 3), ("val", 2)):
        classes = sorted(p.name for p in (out / split).iterdir())
        assert classes == sorted(script.PHOTOS[photos])
        for name in classes:
            files = sorted((out / split / name).glob("*.png"))
            assert len(files) == count
            with Image.open(files[0]) as img:
                assert img.size == (32, 32) and img.mode == "RGB"


def test_the_two_sets_share_no_photograph(script):
    assert len(script.PHOTOS["set1"]) == len(script.PHOTOS["set2"]) == 10
    assert not set(script.PHOTOS["set1"]) & set(script.PHOTOS["set2"])
