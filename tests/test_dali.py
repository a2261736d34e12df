"""Tests of sfrik_scale.data.dali / dali_ops on CPU DALI (device_id=None).

Small JPEGs are written with PIL into temporary folders; the whole module runs in
well under a minute on two cores and is skipped when DALI cannot be imported.
"""
from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from sfrik_scale.data import (  # noqa: E402
    AUGMENTATIONS, IMAGENET_MEAN, IMAGENET_STD, BadImageError, FileListDataset, ImageFolderDataset, build_loader,
    build_pretrain_dataset,
)
from sfrik_scale.data import ViewAugmentation, mix_seed  # noqa: E402
from sfrik_scale.data import dali as dali_mod  # noqa: E402
from sfrik_scale.data.dali import build_dali_loader, dali_available  # noqa: E402
from sfrik_scale.data.dali_ops import (  # noqa: E402
    NUM_PARAMS, UNIFORMS_PER_VIEW, P, apply_color, blur_kernels, color_matrices, draw_view_params,
    random_resized_crop_boxes,
    sample_uniforms,
)

pytestmark = pytest.mark.dali

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def unnormalize(x: torch.Tensor) -> torch.Tensor:
    return x * STD + MEAN


def binomial_tolerance(p: float, n: int, sigmas: float = 4.5) -> float:
    return sigmas * math.sqrt(p * (1 - p) / n)


def colourful_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Saturated colour blocks plus mild noise: far from gray after any jitter, natural-ish statistics."""
    blocks = rng.integers(0, 256, size=(3, 4, 3)).astype(np.float32)
    blocks[..., rng.integers(0, 3)] = 255  # at least one saturated channel per block row
    pixels = np.asarray(Image.fromarray(blocks.astype(np.uint8)).resize((width, height), Image.NEAREST), np.float32)
    pixels += rng.normal(0, 6, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def natural_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colour fields, a texture and noise: moderate saturation, like photographs."""
    coarse = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(coarse, np.float32)
    yy, xx = np.mgrid[0:height, 0:width]
    pixels += 30 * np.sin(rng.uniform(0.2, 0.8) * xx + rng.uniform(0.2, 0.8) * yy)[..., None]
    pixels += rng.normal(0, 8, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_listed_jpegs(folder, n: int, width: int = 40, height: int = 32, seed: int = 0) -> str:
    """``n`` JPEGs and a list file labelling image i with label i (labels identify samples)."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    lines = []
    for i in range(n):
        colourful_image(rng, width, height).save(os.path.join(folder, f"img_{i:03d}.jpg"), quality=90)
        lines.append(f"img_{i:03d}.jpg {i}")
    list_file = os.path.join(folder, "list.txt")
    with open(list_file, "w") as f:
        f.write("\n".join(lines) + "\n")
    return list_file


@pytest.fixture(scope="module")
def listed(tmp_path_factory) -> str:
    return write_listed_jpegs(tmp_path_factory.mktemp("listed"), 26)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(1)
    for c in range(2):
        os.makedirs(root / f"class_{c}")
        for i in range(24):
            natural_image(rng, 32, 24).save(root / f"class_{c}" / f"{i:02d}.jpg", quality=90)
    return str(root)


def epoch_batches(loader, epoch: int):
    loader.set_epoch(epoch)
    return list(loader)


def dali_loader(dataset, **kwargs):
    kwargs.setdefault("num_threads", 2)
    kwargs.setdefault("device", "cpu")
    return build_dali_loader(dataset, **kwargs)


# ---------------------------------------------------------------------------------
# Availability
# ---------------------------------------------------------------------------------
def test_dali_available_runs_a_cpu_pipeline_and_reports_a_missing_install(monkeypatch):
    ok, reason = dali_available()
    assert ok, reason
    assert reason.startswith("nvidia-dali")
    dali_available.cache_clear()
    monkeypatch.setitem(__import__("sys").modules, "nvidia.dali", None)  # import now raises ImportError
    try:
        ok, reason = dali_available()
        assert not ok and "nvidia.dali" in reason
    finally:
        dali_available.cache_clear()


# ---------------------------------------------------------------------------------
# Random parameters (pure numpy)
# ---------------------------------------------------------------------------------
def test_random_choices_follow_the_probabilities_of_each_view():
    n = 20_000
    h, w = np.full(n, 375), np.full(n, 500)
    u = sample_uniforms(range(n), 2 * UNIFORMS_PER_VIEW)
    for name in ("sfrik", "simclr", "alignment_uniformity"):
        d1, d2 = AUGMENTATIONS.get(name)(224)
        for desc, uu in ((d1, u[:, :UNIFORMS_PER_VIEW]), (d2, u[:, UNIFORMS_PER_VIEW:])):
            prm = draw_view_params(desc, uu, h, w)
            assert prm.shape == (n, NUM_PARAMS)
            matrices = prm[:, P["color_00"]:P["color_26"] + 1].reshape(-1, 3, 7)
            gray = np.abs(matrices[:, 0] - matrices[:, 1]).max(axis=1) < 1e-6  # equal rows: luma
            for p, freq in ((desc.grayscale_p, gray.mean()), (desc.flip_p, prm[:, P["flip"]].mean()),
                            (desc.blur_p, prm[:, P["blur"]].mean()),
                            (desc.solarize_p, prm[:, P["solarize"]].mean())):
                assert abs(freq - p) <= binomial_tolerance(p, n) + 1e-12, (name, p, freq)
            identity = np.abs(matrices - np.eye(3, 7)).max(axis=(1, 2)) < 1e-6
            p_twist = 1 - (1 - desc.jitter_p) * (1 - desc.grayscale_p)
            assert abs((~identity).mean() - p_twist) <= binomial_tolerance(p_twist, n)
            assert np.all(prm[:, P["twist"]] == ~identity)
            # every colour transform keeps a gray image gray (each step maps the gray axis to itself);
            # [x | 1 | mean]: a uniform image is its own mean
            gray_in = np.concatenate([np.full(3, 100.0), [1.0], np.full(3, 100.0)])
            mapped = matrices @ gray_in
            assert np.abs(mapped - mapped[:, :1]).max() < 1e-3
            sigma = prm[:, P["blur_sigma"]]
            assert sigma.min() >= 0.1 - 1e-6 and sigma.max() <= 2.0 + 1e-6
            window = prm[:, P["blur_window"]]
            assert np.all(window % 2 == 1) and window.max() <= desc.blur_kernel_size
    d1, d2 = AUGMENTATIONS.get("sfrik")(224)
    assert draw_view_params(d1, u[:, :UNIFORMS_PER_VIEW], h, w)[:, P["solarize"]].sum() == 0  # only view 2


def test_crop_boxes_lie_inside_the_image_with_area_and_ratio_in_range():
    n = 5000
    heights = np.random.default_rng(0).integers(20, 400, size=n)
    widths = np.random.default_rng(1).integers(20, 400, size=n)
    u = sample_uniforms(range(n), 22)
    top, left, h, w = random_resized_crop_boxes(u, heights, widths, (0.08, 1.0), (3 / 4, 4 / 3)).T
    assert np.all(top >= 0) and np.all(left >= 0) and np.all(h >= 1) and np.all(w >= 1)
    assert np.all(top + h <= heights) and np.all(left + w <= widths)
    area = h * w / (heights * widths)
    assert area.max() <= 1.0 + 1e-9 and np.quantile(area, 0.01) < 0.15  # small crops do occur
    # Fallback (a tall strip where no attempt fits): torchvision's centre crop with clamped ratio.
    box = random_resized_crop_boxes(np.zeros((1, 22)), np.array([1000]), np.array([10]), (0.9, 1.0), (3 / 4, 4 / 3))
    assert box.tolist() == [[(1000 - 13) // 2, 0, 13, 10]]


def test_blur_kernels_are_torchvision_impulse_responses():
    """The fed 1-D kernel, applied along rows and columns, is torchvision's gaussian_blur of a unit impulse."""
    import torchvision.transforms.v2.functional as TF

    desc = AUGMENTATIONS.get("sfrik")(224)[0]
    prm = draw_view_params(desc, sample_uniforms(range(64), UNIFORMS_PER_VIEW), np.full(64, 300), np.full(64, 400))
    prm[::4, P["blur"]] = 0.0  # some samples are not blurred
    kernels = blur_kernels(prm)
    assert len(kernels) == 64 and all(k.dtype == np.float32 for k in kernels)
    for j, k in enumerate(kernels):
        if not prm[j, P["blur"]]:
            assert k.tolist() == [1.0]
            continue
        w, sigma = int(prm[j, P["blur_window"]]), float(prm[j, P["blur_sigma"]])
        assert len(k) == w and w % 2 == 1 and w <= desc.blur_kernel_size
        impulse = torch.zeros(1, 31, 31, dtype=torch.float64)
        impulse[0, 15, 15] = 1.0
        response = TF.gaussian_blur(impulse, [w, w], [sigma, sigma])[0, 15 - w // 2:16 + w // 2, 15 - w // 2:16 + w // 2]
        np.testing.assert_allclose(np.outer(k, k), response.numpy(), rtol=0, atol=1e-7)


def test_uniforms_are_a_function_of_the_key_only():
    a = sample_uniforms([5, 7, 9], 8)
    b = sample_uniforms([9, 7], 8)
    assert np.array_equal(a[2], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], a[1]) and a.min() >= 0 and a.max() < 1


# ---------------------------------------------------------------------------------
# Pipeline outputs
# ---------------------------------------------------------------------------------
def test_batches_have_shapes_dtypes_and_normalised_range(folder):
    ds = build_pretrain_dataset("image_folder", root=folder, augmentations="sfrik", image_size=24, seed=0)
    loader = dali_loader(ds, micro_batch_size=8, global_batch_size=16, seed=0)
    assert len(loader) == 48 // 16 * 2
    batches = epoch_batches(loader, 0)
    assert len(batches) == len(loader)
    lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
    for view1, view2, labels in batches:
        assert view1.shape == view2.shape == (8, 3, 24, 24)
        assert view1.dtype == view2.dtype == torch.float32 and labels.dtype == torch.int64
        assert labels.min() >= 0 and labels.max() <= 1
        for v in (view1, view2):
            assert torch.isfinite(v).all()
            assert (v >= lo - 1e-4).all() and (v <= hi + 1e-4).all()
        assert not torch.equal(view1, view2)
    # the per-sample views differ
    v1 = torch.cat([b[0] for b in batches])
    v2 = torch.cat([b[1] for b in batches])
    assert ((v1 - v2).abs().flatten(1).amax(1) > 0.1).all()


def test_in_memory_dataset_is_fed_as_pixels():
    ds = build_pretrain_dataset("synthetic", augmentations="alignment_uniformity", image_size=16, seed=0,
                                num_samples=32)
    loader = dali_loader(ds, micro_batch_size=8, global_batch_size=16)
    assert not loader.source.encoded
    (view1, view2, labels), *_ = epoch_batches(loader, 0)
    assert view1.shape == (8, 3, 16, 16) and labels.dtype == torch.int64


def test_grayscale_is_measured_at_its_probability_in_both_views(tmp_path):
    list_file = write_listed_jpegs(tmp_path, 64, width=24, height=24, seed=3)
    ds = FileListDataset(list_file)
    desc1, desc2 = AUGMENTATIONS.get("sfrik")(16)
    loader = dali_loader(ds, augmentations=(desc1, desc2), micro_batch_size=32, global_batch_size=64, seed=5)
    gray, total = 0, 0
    for epoch in range(4):
        for view1, view2, _ in epoch_batches(loader, epoch):
            for v in (view1, view2):
                rgb = unnormalize(v) * 255
                spread = (rgb.amax(1) - rgb.amin(1)).flatten(1).amax(1)  # max channel difference per view
                gray += int((spread <= 2.5).sum())
                total += len(v)
    p = desc1.grayscale_p
    assert abs(gray / total - p) <= binomial_tolerance(p, total), (gray, total)


def test_solarisation_inverts_bright_pixels_only_where_described(tmp_path):
    path = tmp_path / "flat.png"
    Image.new("RGB", (20, 20), (200, 60, 130)).save(path)
    with open(tmp_path / "list.txt", "w") as f:
        f.write("\n".join("flat.png 0" for _ in range(8)) + "\n")
    ds = FileListDataset(str(tmp_path / "list.txt"))
    plain = dataclasses.replace(AUGMENTATIONS.get("sfrik")(16)[0], jitter_p=0.0, grayscale_p=0.0, blur_p=0.0,
                                solarize_p=0.0)
    loader = dali_loader(ds, augmentations=(plain, dataclasses.replace(plain, solarize_p=1.0)),
                         micro_batch_size=8, global_batch_size=8)
    ((view1, view2, _),) = epoch_batches(loader, 0)
    rgb1 = (unnormalize(view1) * 255).round().amax(dim=(2, 3))
    rgb2 = (unnormalize(view2) * 255).round().amax(dim=(2, 3))
    assert torch.allclose(rgb1, torch.tensor([200.0, 60, 130]).expand(8, 3), atol=1)
    assert torch.allclose(rgb2, torch.tensor([55.0, 60, 125]).expand(8, 3), atol=1)  # >= 128 -> 255 - v


apply_matrix = apply_color  # (H, W, 3) uint8 through a (3, 7) colour transform [M | T | K], as the graph does


def one_step_matrix(name: str, factor: float) -> np.ndarray:
    """The colour matrix of a single jitter step with the given factor (hue: fraction of the wheel)."""
    desc = ViewAugmentation(**{**{k: 0.0 for k in ("brightness", "contrast", "saturation", "hue")}, name: 0.5})
    lo, hi = (-0.5, 0.5) if name == "hue" else (0.5, 1.5)
    u = np.zeros((1, 8))
    u[0, ("brightness", "contrast", "saturation", "hue").index(name)] = (factor - lo) / (hi - lo)
    return color_matrices(desc, u, np.array([True]), np.array([False]))[0]


def test_colour_matrix_reproduces_torchvision_colour_operators():
    import torchvision.transforms.v2.functional as TF

    img = np.asarray(natural_image(np.random.default_rng(4), 48, 40))
    pil = Image.fromarray(img)

    def levels(a, b) -> np.ndarray:
        return np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))

    for factor in (0.6, 1.3):
        assert levels(apply_matrix(img, one_step_matrix("brightness", factor)),
                      TF.adjust_brightness(pil, factor)).max() <= 1
        assert levels(apply_matrix(img, one_step_matrix("saturation", factor)),
                      TF.adjust_saturation(pil, factor)).max() <= 1
        # contrast pivots on the image's mean grey, as torchvision's (which rounds that mean to a level)
        assert levels(apply_matrix(img, one_step_matrix("contrast", factor)),
                      TF.adjust_contrast(pil, factor)).max() <= 1
    # on a dark image (white strokes on black, like the digits) the background stays black under contrast < 1
    # once the pivot is the image's own grey; pivoting on 128 lifted it to (1 - c) x 128 = 51 at c = 0.6
    dark = np.zeros((16, 16, 3), np.uint8)
    dark[4:12, 7:9] = 255
    out = apply_matrix(dark, one_step_matrix("contrast", 0.6))
    assert out[0, 0].max() <= 14 and levels(out, TF.adjust_contrast(Image.fromarray(dark), 0.6)).max() <= 1
    gray = color_matrices(ViewAugmentation(), np.zeros((1, 8)), np.array([False]), np.array([True]))[0]
    assert levels(apply_matrix(img, gray), np.asarray(TF.rgb_to_grayscale(pil, 3))).max() <= 1
    # hue: a rotation about the gray axis, a linear stand-in for the HSV shift (see dali_ops): exact at a
    # third of the wheel; for smaller shifts on these saturated colours it moves towards torchvision's
    # result (about 2/3 of the way at +-0.1) but is not equal to it.
    assert levels(apply_matrix(img, one_step_matrix("hue", 1 / 3)), TF.adjust_hue(pil, 1 / 3)).mean() <= 1.0
    for shift in (0.1, -0.1, 0.2):
        reference = TF.adjust_hue(pil, shift)
        rotated = levels(apply_matrix(img, one_step_matrix("hue", shift)), reference).mean()
        assert rotated < 0.75 * levels(img, reference).mean(), shift


@pytest.fixture(scope="module")
def squares(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("squares")
    rng = np.random.default_rng(6)
    lines = []
    for i in range(16):
        natural_image(rng, 20, 20).save(folder / f"sq_{i:02d}.png")  # lossless: DALI and PIL see the same pixels
        lines.append(f"sq_{i:02d}.png {i}")
    (folder / "list.txt").write_text("\n".join(lines) + "\n")
    return str(folder / "list.txt")


@pytest.mark.parametrize("name", ["sfrik", "simclr"])
def test_views_equal_torchvision_operators_given_the_same_random_choices(squares, name):
    """With the crop pinned to the whole image, each DALI view is flip, colour matrix, blur, solarisation and
    normalisation (torchvision's functional operators) applied with the loader's own random choices."""
    import torchvision.transforms.v2.functional as TF

    ds = FileListDataset(squares)
    descs = [dataclasses.replace(d, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
             for d in AUGMENTATIONS.get(name)(20)]
    seed, epoch = 3, 1
    loader = dali_loader(ds, augmentations=tuple(descs), micro_batch_size=8, global_batch_size=16, seed=seed)
    checked = 0
    for view1, view2, labels in epoch_batches(loader, epoch):
        u = sample_uniforms([mix_seed(seed, dali_mod._DALI_STREAM, epoch, int(i)) for i in labels],
                            2 * UNIFORMS_PER_VIEW)
        for k, (desc, views) in enumerate(zip(descs, (view1, view2))):
            prm = draw_view_params(desc, u[:, k * UNIFORMS_PER_VIEW:(k + 1) * UNIFORMS_PER_VIEW],
                                   np.full(len(labels), 20), np.full(len(labels), 20))
            for j, index in enumerate(labels.tolist()):
                x = np.array(Image.open(ds.samples[index][0]).convert("RGB"))
                if prm[j, P["twist"]]:
                    x = apply_matrix(x, prm[j, P["color_00"]:P["color_26"] + 1].reshape(3, 7))
                t = torch.from_numpy(x).permute(2, 0, 1)
                if prm[j, P["blur"]]:
                    w, sigma = int(prm[j, P["blur_window"]]), float(prm[j, P["blur_sigma"]])
                    t = TF.gaussian_blur(t, [w, w], [sigma, sigma])
                if prm[j, P["solarize"]]:
                    t = torch.where(t >= desc.solarize_threshold, 255 - t, t)
                if prm[j, P["flip"]]:
                    t = t.flip(-1)
                expected = (t.float() / 255 - MEAN[0]) / STD[0]
                assert (views[j] - expected).abs().max() * 255 * min(IMAGENET_STD) <= 2.01, (name, k, index)
                checked += 1
    assert checked == 2 * 16


def test_dali_and_torchvision_agree_in_distribution(tmp_path):
    """Per-channel mean and std of each view, over 512 samples of 64 texture images, agree within
    0.15 (means) and 0.1 (stds) in normalised units (0.034 / 0.023 of the [0, 1] range).

    At this sample size two torchvision runs with different seeds differ by up to ~0.1 (means) and
    ~0.06 (stds), mostly from the jitter's random factors; DALI's own offset (colour matrix clamped
    once) is small in the means. Dropping the colour jitter moves the stds by ~0.15;
    the finer semantics are checked sample by sample above."""
    rng = np.random.default_rng(7)
    for c in range(2):
        os.makedirs(tmp_path / f"c{c}")
        for i in range(32):
            base = rng.uniform(50, 200, 3)
            yy, xx = np.mgrid[0:24, 0:32]
            wave = 35 * np.sin(rng.uniform(0.5, 1.5) * xx + rng.uniform(0.5, 1.5) * yy)[..., None]
            pixels = base + wave * rng.uniform(0.3, 1, 3) + rng.normal(0, 20, (24, 32, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(tmp_path / f"c{c}" / f"{i}.jpg")
    ds = build_pretrain_dataset("image_folder", root=str(tmp_path), augmentations="sfrik", image_size=16, seed=0)

    def stats(loader):
        views = [[], []]
        for epoch in range(8):
            for view1, view2, _ in epoch_batches(loader, epoch):
                views[0].append(view1)
                views[1].append(view2)
        return [(torch.cat(v).mean(dim=(0, 2, 3)), torch.cat(v).std(dim=(0, 2, 3))) for v in views]

    kw = dict(micro_batch_size=32, global_batch_size=64, seed=0)
    for (m_tv, s_tv), (m_dl, s_dl) in zip(stats(build_loader(ds, **kw)), stats(dali_loader(ds, **kw))):
        assert (m_tv - m_dl).abs().max() < 0.15, (m_tv, m_dl)
        assert (s_tv - s_dl).abs().max() < 0.1, (s_tv, s_dl)


# ---------------------------------------------------------------------------------
# Order, sharding, resume
# ---------------------------------------------------------------------------------
def test_shards_are_disjoint_cover_the_epoch_and_match_torchvision_order(listed):
    ds = build_pretrain_dataset("file_list", list_file=listed, augmentations="sfrik", image_size=16, seed=0)
    world, micro, global_batch = 3, 2, 6
    seen, lengths = [], []
    for rank in range(world):
        kw = dict(micro_batch_size=micro, global_batch_size=global_batch, rank=rank, world_size=world, seed=4)
        dl = dali_loader(ds, **kw)
        labels = [int(x) for _, _, y in epoch_batches(dl, 2) for x in y]
        tv_labels = [int(x) for _, _, y in epoch_batches(build_loader(ds, **kw), 2) for x in y]
        assert labels == tv_labels  # same samples, same order as the torchvision loader
        seen.append(labels)
        lengths.append(len(dl))
    assert len(set(lengths)) == 1 and lengths[0] == 26 // global_batch * global_batch // (world * micro)
    flat = [x for s in seen for x in s]
    assert len(flat) == len(set(flat)) == 24  # disjoint, covering the epoch (2 of 26 dropped)
    sampler = dl.sharded_sampler
    assert sorted(flat) == sorted(sampler.global_indices().tolist())


def test_resume_mid_epoch_continues_with_the_unseen_samples_and_the_same_views(listed):
    ds = build_pretrain_dataset("file_list", list_file=listed, augmentations="sfrik", image_size=16, seed=0)
    kw = dict(micro_batch_size=4, global_batch_size=8, seed=1)
    full = epoch_batches(dali_loader(ds, **kw), 1)
    resumed_loader = dali_loader(ds, **kw)
    resumed_loader.set_position(1, 8)  # one global step of epoch 1 done (from the checkpoint)
    resumed = epoch_batches(resumed_loader, 1)  # the trainer's usual set_epoch keeps the position
    assert len(resumed) == len(full) - 2
    for (a1, a2, ay), (b1, b2, by) in zip(full[2:], resumed):
        assert torch.equal(ay, by) and torch.equal(a1, b1) and torch.equal(a2, b2)
    # the next epoch starts from its beginning again
    assert len(epoch_batches(resumed_loader, 2)) == len(full)


def test_an_abandoned_epoch_does_not_leak_into_the_next(listed):
    ds = build_pretrain_dataset("file_list", list_file=listed, augmentations="sfrik", image_size=16, seed=0)
    loader = dali_loader(ds, micro_batch_size=4, global_batch_size=8)
    loader.set_epoch(0)
    first = next(iter(loader))  # break after one batch, batches still in flight
    again = epoch_batches(loader, 0)  # rebuilds the pipeline
    loader.close()
    reference = epoch_batches(dali_loader(ds, micro_batch_size=4, global_batch_size=8), 0)
    assert [torch.equal(a[2], b[2]) and torch.equal(a[0], b[0]) for a, b in zip(again, reference)] == [True] * 6
    # zero-copy outputs outlive the pipeline that produced them
    assert torch.equal(first[0], reference[0][0]) and torch.equal(first[1], reference[0][1])


# ---------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------
@pytest.fixture()
def bad_folder(tmp_path):
    """27 good JPEGs in two classes plus 5 bad files, one of each kind (32 samples: 4 global batches)."""
    rng = np.random.default_rng(2)
    for c in range(2):
        os.makedirs(tmp_path / f"c{c}")
        for i in range(14 - c):
            colourful_image(rng, 40, 32).save(tmp_path / f"c{c}" / f"good_{i:02d}.jpg", quality=90)
    good = (tmp_path / "c0" / "good_00.jpg").read_bytes()
    bad = {
        "c0/truncated.jpg": good[: len(good) - 40],  # cut inside the scan: the header still parses
        "c0/garbage.jpg": b"this is not an image at all" * 20,
        "c1/empty.jpg": b"",
        "c1/text.png": b"PNG? no, plain text",
        "c1/vanished.jpg": good,
    }
    for rel, data in bad.items():
        (tmp_path / rel).write_bytes(data)
    ds = ImageFolderDataset(str(tmp_path))
    os.remove(tmp_path / "c1" / "vanished.jpg")  # listed, then gone: unreadable
    return ds, {str(tmp_path / rel) for rel in bad}


def test_bad_files_are_skipped_counted_and_named(bad_folder):
    ds, bad = bad_folder
    loader = dali_loader(ds, augmentations="sfrik", image_size=16, micro_batch_size=4, global_batch_size=8)
    for epoch in range(2):
        batches = epoch_batches(loader, epoch)
        assert len(batches) == 8 and all(len(b[2]) == 4 for b in batches)
    assert set(loader.bad_files) == bad
    assert loader.bad_files is ds.bad_files  # the dataset's log: the trainer's summary names them
    reasons = loader.bad_files.as_dict()
    assert "truncated" in reasons[next(p for p in bad if p.endswith("truncated.jpg"))]
    assert "empty" in reasons[next(p for p in bad if p.endswith("empty.jpg"))]
    assert "FileNotFoundError" in reasons[next(p for p in bad if p.endswith("vanished.jpg"))]
    assert loader.bad_files.replacements > 0


def test_strict_mode_stops_at_the_first_bad_file_naming_it(bad_folder):
    ds, bad = bad_folder
    loader = dali_loader(ds, augmentations="sfrik", image_size=16, micro_batch_size=4, global_batch_size=8,
                         strict=True)
    with pytest.raises(BadImageError) as err:
        epoch_batches(loader, 0)
    assert err.value.path in bad and err.value.path in str(err.value)


@pytest.mark.parametrize("strict", [False, True])
def test_a_file_that_only_dali_fails_to_decode_is_found_and_the_batch_replayed(bad_folder, monkeypatch, strict):
    ds, bad = bad_folder
    truncated = next(p for p in bad if p.endswith("truncated.jpg"))
    ds.samples = [s for s in ds.samples if s[0] not in bad or s[0] == truncated]

    def header_only(data):  # let the truncated JPEG through to DALI's decoder
        from PIL import Image as PILImage
        import io
        with PILImage.open(io.BytesIO(data)) as img:
            return img.format, img.size[1], img.size[0]

    monkeypatch.setattr(dali_mod, "check_encoded", header_only)
    loader = dali_loader(ds, augmentations="sfrik", image_size=16, micro_batch_size=4, global_batch_size=8,
                         strict=strict)
    if strict:
        with pytest.raises(BadImageError, match="truncated.jpg"):
            epoch_batches(loader, 0)
        return
    batches = epoch_batches(loader, 0)
    assert len(batches) == 28 // 8 * 2 and all(len(b[2]) == 4 for b in batches)
    assert list(loader.bad_files) == [truncated]
    assert "DALI could not decode" in loader.bad_files.as_dict()[truncated]


def test_empty_class_folder_empty_dataset_and_too_small_dataset_fail_before_training(tmp_path, listed):
    os.makedirs(tmp_path / "tree" / "full")
    os.makedirs(tmp_path / "tree" / "empty")
    Image.new("RGB", (8, 8)).save(tmp_path / "tree" / "full" / "a.jpg")
    with pytest.raises(ValueError, match="without any image"):
        build_pretrain_dataset("image_folder", root=str(tmp_path / "tree"))
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="empty"):
        dali_loader(FileListDataset(str(tmp_path / "empty.txt")), augmentations="sfrik", image_size=16,
                    micro_batch_size=2, global_batch_size=2)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        dali_loader(FileListDataset(listed), augmentations="sfrik", image_size=16, micro_batch_size=16,
                    global_batch_size=32)


@pytest.mark.slow
def test_bench_data_prints_both_pipelines(tmp_path):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-m", "sfrik_scale.cli", "bench", "data", "--dir", str(tmp_path),
                           "--images", "8", "--jpeg-size", "64x48", "--image-size", "32", "--batch-size", "4",
                           "--epochs", "1", "--threads", "1", "--pipelines", "torchvision,dali"],
                          env={**env, "COLUMNS": "160"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torchvision" in proc.stdout and "dali" in proc.stdout and "CPU ms/img" in proc.stdout
    # Both pipelines counted the same images: the 8 JPEGs once (1 timed epoch).
    from .test_benchmarks import table_rows

    rows = {row[0]: row for row in table_rows(proc.stdout) if row[0] in ("torchvision", "dali")}
    assert rows["torchvision"][5] == rows["dali"][5] == "8", rows


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixed_decoder_yields_cuda_views(folder):
    ds = build_pretrain_dataset("image_folder", root=folder, augmentations="sfrik", image_size=24, seed=0)
    loader = build_dali_loader(ds, micro_batch_size=8, global_batch_size=16, num_threads=2, device="gpu")
    view1, view2, labels = next(iter(loader))
    assert view1.is_cuda and view2.is_cuda and labels.is_cuda and view1.shape == (8, 3, 24, 24)


def test_cpu_colour_pass_equals_the_float_reference():
    """The CPU graph's colour jitter (K mean folded into coord_transform's translation, uint8 out in one
    pass) equals `apply_color`'s float64 round-and-clamp, saturated pixels included, to within one level
    where float32 and float64 round an exact half differently."""
    from nvidia.dali import fn, pipeline_def

    from sfrik_scale.data.dali_ops import ViewInputs, _color_twist

    rng = np.random.default_rng(9)
    imgs = [np.asarray(natural_image(rng, 24 + 4 * i, 20)) for i in range(6)]
    desc = ViewAugmentation(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, jitter_p=1.0, grayscale_p=0.0)
    params = np.zeros((len(imgs), NUM_PARAMS), np.float32)
    u = rng.random((len(imgs), 8))
    params[:, P["color_00"]:P["color_26"] + 1] = color_matrices(
        desc, u, np.ones(len(imgs), bool), np.array([False, False, False, True, False, True])).reshape(len(imgs), -1)
    params[:, P["twist"]] = 1.0

    @pipeline_def(batch_size=len(imgs), num_threads=1, device_id=None)
    def pipe():
        x = fn.external_source(source=lambda: imgs, layout="HWC", batch=True)
        prm = fn.external_source(source=lambda: list(params), batch=True)
        return _color_twist(x, ViewInputs(prm, None), desc)

    p = pipe()
    p.build()
    (out,) = p.run()
    saturated = 0
    for i, img in enumerate(imgs):
        expected = apply_color(img, params[i, P["color_00"]:P["color_26"] + 1].reshape(3, 7).astype(np.float64))
        got = np.array(out[i])
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1, i
        saturated += int(((expected == 0) | (expected == 255)).sum())
    assert saturated > 0  # the clamp was exercised
