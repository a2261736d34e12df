"""Tests of sfrik_scale.data: synthetic data, two-view transforms, sharded sampling, bad input."""
from __future__ import annotations

import dataclasses
import gc
import math
import os

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from sfrik_scale.data import (
    AUGMENTATIONS, IMAGENET_MEAN, IMAGENET_STD, BadImageError, FileListDataset, ImageFolderDataset,
    ShardedSampler, SyntheticShapes, TwoViewDataset, TwoViewTransform, ViewAugmentation, build_eval_transform,
    build_eval_dataset, build_loader, build_pretrain_dataset, build_two_view_transform, check_dataset_size,
)
from sfrik_scale.data.transforms import RandomGaussianBlur, blur_kernel_size

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def unnormalize(x: torch.Tensor) -> torch.Tensor:
    return x * STD + MEAN


def binomial_tolerance(p: float, n: int, sigmas: float = 4.5) -> float:
    return sigmas * math.sqrt(p * (1 - p) / n)


# ---------------------------------------------------------------------------------
# Synthetic dataset
# ---------------------------------------------------------------------------------
def test_synthetic_same_index_same_pixels_across_instances_and_workers():
    a = SyntheticShapes(num_samples=16, image_size=24, seed=3, as_tensor=True)
    b = SyntheticShapes(num_samples=16, image_size=24, seed=3, as_tensor=True)
    direct = torch.stack([a[i][0] for i in reversed(range(16))]).flip(0)  # order of access irrelevant
    assert torch.equal(direct, torch.stack([b[i][0] for i in range(16)]))
    loader = DataLoader(b, batch_size=4, num_workers=2, shuffle=False)
    from_workers = torch.cat([x for x, _ in loader])
    assert torch.equal(direct, from_workers)


def test_synthetic_seed_and_split_change_the_images():
    base = SyntheticShapes(num_samples=4, image_size=24, seed=0).render(1)
    assert not np.array_equal(base, SyntheticShapes(num_samples=4, image_size=24, seed=1).render(1))
    assert not np.array_equal(base, SyntheticShapes(num_samples=4, image_size=24, seed=0, split="val").render(1))


def test_synthetic_returns_rgb_uint8_images_and_balanced_labels():
    ds = SyntheticShapes(num_samples=30, num_classes=10, image_size=32)
    img, label = ds[13]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (32, 32)
    assert label == 3
    assert np.bincount(ds.targets).tolist() == [3] * 10


def test_synthetic_classes_are_separable_by_nearest_class_mean():
    # Class structure: a nearest-class-mean classifier on raw pixels of the train split,
    # evaluated on the val split, beats chance (0.1) by far, although every sample varies.
    train = SyntheticShapes(num_samples=600, num_classes=10, image_size=16, split="train")
    val = SyntheticShapes(num_samples=200, num_classes=10, image_size=16, split="val")
    x = np.stack([train.render(i) for i in range(len(train))]).reshape(len(train), -1) / 255.0
    y = np.array(train.targets)
    means = np.stack([x[y == c].mean(0) for c in range(10)])
    xv = np.stack([val.render(i) for i in range(len(val))]).reshape(len(val), -1) / 255.0
    pred = ((xv[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == np.array(val.targets)).mean() > 0.4  # 0.63 with these seeds; chance is 0.1


def test_synthetic_rejects_too_many_classes():
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticShapes(num_classes=106)


# ---------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sfrik", "vicreg", "simclr", "alignment_uniformity"])
def test_two_view_transform_shapes_dtypes_and_ranges(name):
    transform = build_two_view_transform(name, image_size=24)
    img = SyntheticShapes(num_samples=1, image_size=40)[0][0]
    for view in transform(img):
        assert view.shape == (3, 24, 24) and view.dtype == torch.float32
        pixels = unnormalize(view)
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_two_view_transform_accepts_uint8_tensors_and_grayscale_pil():
    transform = build_two_view_transform("sfrik", image_size=16)
    tensor_img = SyntheticShapes(num_samples=1, image_size=20, as_tensor=True)[0][0]
    assert transform(tensor_img)[0].shape == (3, 16, 16)
    assert transform(Image.new("L", (20, 20), 90))[1].shape == (3, 16, 16)


def test_vicreg_set_matches_the_recipe():
    v1, v2 = AUGMENTATIONS.get("sfrik")(224)
    assert (v1.crop_scale, v1.interpolation, v1.flip_p) == ((0.08, 1.0), "bicubic", 0.5)
    assert (v1.brightness, v1.contrast, v1.saturation, v1.hue, v1.jitter_p) == (0.4, 0.4, 0.2, 0.1, 0.8)
    assert (v1.grayscale_p, v1.blur_sigma, v1.blur_kernel_size) == (0.2, (0.1, 2.0), 23)
    assert (v1.blur_p, v1.solarize_p, v2.blur_p, v2.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    s1, s2 = AUGMENTATIONS.get("simclr")(224)
    assert s1 == s2 and (s1.brightness, s1.hue, s1.blur_p, s1.solarize_p) == (0.8, 0.2, 0.5, 0.0)


def _colourful_images(n: int, size: int = 24):
    ds = SyntheticShapes(num_samples=n, image_size=size, seed=7)
    return [ds[i][0] for i in range(n)]


def test_grayscale_frequency_is_about_0_2_in_each_view():
    n = 400
    dataset = TwoViewDataset(SyntheticShapes(num_samples=n, image_size=16, seed=7),
                             build_two_view_transform("sfrik", image_size=16), seed=0)
    gray = np.zeros((n, 2), dtype=bool)
    for i in range(n):
        for v, view in enumerate(dataset[i][:2]):
            x = unnormalize(view)
            gray[i, v] = bool((x - x.mean(0, keepdim=True)).abs().max() < 1e-4)
    for rate in gray.mean(0):
        assert abs(rate - 0.2) < binomial_tolerance(0.2, n)


def test_solarization_never_in_view1_and_about_0_2_in_view2():
    # A uniform bright image stays uniform through crop, flip, blur and grayscale, and
    # jitter keeps it >= 0.6 * 250 = 150 > 128: the view is dark iff it was solarised.
    n = 400
    transform = build_two_view_transform("sfrik", image_size=8)
    bright = Image.new("RGB", (12, 12), (250, 250, 250))
    torch.manual_seed(0)
    solarized = np.array([[unnormalize(v).mean().item() < 0.5 for v in transform(bright)] for _ in range(n)])
    assert solarized[:, 0].sum() == 0
    assert abs(solarized[:, 1].mean() - 0.2) < binomial_tolerance(0.2, n)


def test_views_differ():
    transform = build_two_view_transform("sfrik", image_size=16)
    torch.manual_seed(0)
    for img in _colourful_images(20):
        v1, v2 = transform(img)
        assert not torch.allclose(v1, v2)


def test_augmentations_are_a_function_of_seed_epoch_and_index():
    dataset = build_pretrain_dataset("synthetic", image_size=16, num_samples=8, seed=5)
    state = torch.get_rng_state()
    a1, a2, _ = dataset[(2, 3)]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is untouched
    b1, b2, _ = dataset[(2, 3)]
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    c1, _, _ = dataset[(3, 3)]
    assert not torch.equal(a1, c1)


def test_blur_kernel_is_about_a_tenth_of_the_image_and_odd():
    assert [blur_kernel_size(s) for s in (224, 96, 64, 32, 16)] == [23, 11, 7, 3, 3]


@pytest.mark.parametrize("size,kernel", [(32, 3), (64, 7)])
def test_separable_blur_matches_torchvision_gaussian_blur(size, kernel):
    img = torch.randint(0, 256, (3, size, size), dtype=torch.uint8)
    torch.manual_seed(1)
    ours = RandomGaussianBlur(kernel, (0.1, 2.0), p=1.0)(img)
    torch.manual_seed(1)
    sigma = torch.empty(1).uniform_(0.1, 2.0).item()
    reference = TF.gaussian_blur(img, [kernel, kernel], [sigma, sigma])
    assert (ours.int() - reference.int()).abs().max() <= 1


def test_view_description_rejects_unknown_keys_and_bad_probabilities():
    with pytest.raises(ValueError, match="blurr_p"):
        TwoViewTransform({"size": 16, "blurr_p": 0.5}, {"size": 16})
    with pytest.raises(ValueError, match="solarize_p"):
        ViewAugmentation(size=16, solarize_p=1.5)


def test_eval_transform_resizes_to_256_over_224_then_center_crops():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8))
    out = build_eval_transform(224)(img)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    reference = T.Compose([T.Resize(256, antialias=True), T.CenterCrop(224), T.PILToTensor()])(img)
    assert torch.allclose(unnormalize(out) * 255, reference.float(), atol=1e-3)


# ---------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shards_are_disjoint_and_cover_the_epoch(world_size):
    n, global_batch = 100, 12
    shards = [list(ShardedSampler(n, rank=r, world_size=world_size, seed=1, global_batch=global_batch))
              for r in range(world_size)]
    epoch_length = n // global_batch * global_batch
    assert all(len(s) == epoch_length // world_size for s in shards)
    seen = [i for s in shards for i in s]
    assert len(set(seen)) == len(seen) == epoch_length
    assert set(seen) <= set(range(n))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_each_global_step_takes_the_same_samples_whatever_the_world_size(world_size):
    n, global_batch = 50, 12
    reference = ShardedSampler(n, seed=4, global_batch=global_batch).global_indices()
    per_rank = global_batch // world_size
    shards = [list(ShardedSampler(n, rank=r, world_size=world_size, seed=4, global_batch=global_batch))
              for r in range(world_size)]
    for step in range(n // global_batch):
        step_samples = {i for s in shards for i in s[step * per_rank:(step + 1) * per_rank]}
        assert step_samples == set(reference[step * global_batch:(step + 1) * global_batch].tolist())


def test_permutation_is_shared_by_ranks_and_changes_each_epoch():
    a, b = ShardedSampler(40, 0, 2, seed=0, global_batch=8), ShardedSampler(40, 1, 2, seed=0, global_batch=8)
    assert torch.equal(a.global_indices(), b.global_indices())
    first = a.global_indices()
    a.set_epoch(1)
    assert not torch.equal(first, a.global_indices())


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_resume_mid_epoch_continues_with_the_unseen_samples(world_size):
    n, global_batch, steps_done = 103, 6 * world_size, 3
    full = [list(ShardedSampler(n, r, world_size, seed=2, global_batch=global_batch)) for r in range(world_size)]
    for sampler_epoch in (0, 5):
        uninterrupted = []
        for r in range(world_size):
            s = ShardedSampler(n, r, world_size, seed=2, global_batch=global_batch)
            s.set_epoch(sampler_epoch)
            uninterrupted.append(list(s))
        seen_global = steps_done * global_batch
        for r in range(world_size):
            saved = ShardedSampler(n, r, world_size, seed=2, global_batch=global_batch)
            saved.set_epoch(sampler_epoch)
            state = saved.state_dict(seen_global)
            resumed = ShardedSampler(n, r, world_size, seed=2, global_batch=global_batch)
            resumed.load_state_dict(state)
            resumed.set_epoch(sampler_epoch)  # the training loop's call keeps the position
            local_done = seen_global // world_size
            assert list(resumed) == uninterrupted[r][local_done:]
            assert len(resumed) == len(uninterrupted[r]) - local_done
            resumed.set_epoch(sampler_epoch + 1)  # the next epoch starts from its beginning
            assert len(resumed) == len(full[r])


def test_resume_on_a_different_world_size_sees_exactly_the_rest_of_the_epoch():
    n, global_batch = 60, 12
    one = ShardedSampler(n, 0, 1, seed=9, global_batch=global_batch)
    seen = set(list(one)[:24])
    rest = []
    for r in range(3):
        s = ShardedSampler(n, r, 3, seed=9, global_batch=global_batch)
        s.set_position(0, 24)
        rest += list(s)
    assert seen.isdisjoint(rest) and seen | set(rest) == set(one.global_indices().tolist())


def test_sampler_rejects_inconsistent_resume_and_batch():
    with pytest.raises(ValueError, match="multiple of world_size"):
        ShardedSampler(100, 0, 3, global_batch=16)
    s = ShardedSampler(100, 0, 2, seed=0, global_batch=8)
    with pytest.raises(ValueError, match="seed"):
        s.load_state_dict(ShardedSampler(100, 0, 2, seed=1, global_batch=8).state_dict(8))


def test_without_drop_last_shards_are_padded_to_a_multiple_of_world_size():
    shards = [list(ShardedSampler(10, r, 3, shuffle=False, drop_last=False)) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]
    assert set(i for s in shards for i in s) == set(range(10))


# ---------------------------------------------------------------------------------
# Loader
# ---------------------------------------------------------------------------------
def test_loader_yields_two_view_batches_with_equal_steps_on_every_rank():
    dataset = build_pretrain_dataset("synthetic", image_size=16, num_samples=50, seed=0)
    lengths = []
    for rank in range(2):
        loader = build_loader(dataset, micro_batch_size=4, global_batch_size=16, rank=rank, world_size=2)
        batches = list(loader)
        lengths.append(len(batches))
        v1, v2, labels = batches[0]
        assert v1.shape == v2.shape == (4, 3, 16, 16) and labels.dtype == torch.int64
    assert lengths == [48 // 2 // 4] * 2


def test_loader_leaves_the_global_torch_rng_untouched():
    dataset = build_pretrain_dataset("synthetic", image_size=8, num_samples=16)
    loader = build_loader(dataset, micro_batch_size=4, global_batch_size=8)
    state = torch.get_rng_state()
    list(loader)
    assert torch.equal(torch.get_rng_state(), state)


def test_loader_output_does_not_depend_on_the_number_of_workers():
    dataset = build_pretrain_dataset("synthetic", image_size=16, num_samples=24, seed=1)
    outputs = []
    for workers in (0, 2):
        loader = build_loader(dataset, micro_batch_size=4, global_batch_size=8, rank=1, world_size=2,
                              seed=3, num_workers=workers, persistent_workers=False)
        loader.set_epoch(2)
        outputs.append([torch.cat(b[:2]) for b in loader])
    assert all(torch.equal(a, b) for a, b in zip(*outputs))


def test_unknown_dataset_option_is_rejected_naming_it():
    with pytest.raises(ValueError, match="frist_k_per_class"):
        build_pretrain_dataset("synthetic", frist_k_per_class=3)


def test_eval_dataset_gives_normalised_center_crops():
    img, label = build_eval_dataset("synthetic", image_size=24, num_samples=4)[1]
    assert img.shape == (3, 24, 24) and img.dtype == torch.float32 and label == 1


def test_loader_rejects_global_batch_not_divisible_by_micro_times_world():
    dataset = build_pretrain_dataset("synthetic", image_size=16, num_samples=50)
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        build_loader(dataset, micro_batch_size=4, global_batch_size=12, world_size=2)


# ---------------------------------------------------------------------------------
# Files and bad input
# ---------------------------------------------------------------------------------
def _jpeg_bytes(seed: int, size: int = 16) -> bytes:
    import io

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _make_folder(root, counts):
    """root/<class>/<i>.jpg with ``counts[class]`` valid JPEGs; returns the root path."""
    for k, (c, n) in enumerate(sorted(counts.items())):
        os.makedirs(root / c, exist_ok=True)
        for i in range(n):
            (root / c / f"{i:03d}.jpg").write_bytes(_jpeg_bytes(100 * k + i))
    return root


BAD_FILES = {
    "corrupt": lambda: b"\xff\xd8\xff\xe0" + bytes(np.random.default_rng(0).integers(0, 256, 400, dtype=np.uint8)),
    "truncated": lambda: _jpeg_bytes(1, size=64)[:300],
    "not_an_image": lambda: b"<html>404 not found</html>",
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_file_is_skipped_counted_and_replaced_by_the_next_sample(tmp_path, kind):
    root = _make_folder(tmp_path, {"a": 3, "b": 2})
    (root / "a" / "001.jpg").write_bytes(BAD_FILES[kind]())
    ds = ImageFolderDataset(root)
    img, label = ds[1]
    assert np.array_equal(np.asarray(img), np.asarray(ds[2][0])) and label == 0  # next sample stands in
    assert list(ds.bad_files) == [str(root / "a" / "001.jpg")] and ds.bad_files.replacements == 1
    assert len([ds[i] for i in range(len(ds))]) == 5


def test_unreadable_file_is_skipped_and_counted(tmp_path):
    root = _make_folder(tmp_path, {"a": 2})
    os.symlink(tmp_path / "missing.jpg", root / "a" / "002.jpg")  # a dangling link: open() fails
    ds = ImageFolderDataset(root)
    assert ds[2][1] == 0 and len(ds.bad_files) == 1
    assert "FileNotFoundError" in ds.bad_files.as_dict()[str(root / "a" / "002.jpg")]


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_strict_mode_raises_naming_the_file(tmp_path, kind):
    root = _make_folder(tmp_path, {"a": 2})
    (root / "a" / "000.jpg").write_bytes(BAD_FILES[kind]())
    with pytest.raises(BadImageError, match="000.jpg"):
        ImageFolderDataset(root, strict=True)[0]


def test_strict_mode_raises_through_loader_workers(tmp_path):
    root = _make_folder(tmp_path, {"a": 4, "b": 4})
    (root / "b" / "002.jpg").write_bytes(b"not a jpeg")
    dataset = build_pretrain_dataset("image_folder", root=str(root), image_size=8, strict=True)
    # Persistent workers (the default): torch needs 5 s to shut down a non-persistent worker after an error.
    loader = build_loader(dataset, micro_batch_size=4, global_batch_size=8, num_workers=1)
    with pytest.raises(Exception, match="002.jpg"):
        list(loader)
    del loader
    gc.collect()  # shut the worker down now, not while a later test forks its own


def test_bad_files_met_in_workers_reach_the_loader(tmp_path):
    root = _make_folder(tmp_path, {"a": 4, "b": 4})
    (root / "a" / "001.jpg").write_bytes(b"not a jpeg")
    (root / "b" / "003.jpg").write_bytes(_jpeg_bytes(5, size=64)[:200])
    dataset = build_pretrain_dataset("image_folder", root=str(root), image_size=8)
    loader = build_loader(dataset, micro_batch_size=4, global_batch_size=8, num_workers=2, persistent_workers=False)
    batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [4, 4]  # no batch lost a sample
    assert sorted(loader.bad_files) == [str(root / "a" / "001.jpg"), str(root / "b" / "003.jpg")]
    assert loader.bad_files.replacements == 2


def test_non_image_extension_is_ignored_and_listed(tmp_path):
    root = _make_folder(tmp_path, {"a": 2})
    (root / "a" / "notes.txt").write_text("hello")
    ds = ImageFolderDataset(root)
    assert len(ds) == 2 and ds.ignored_files == [str(root / "a" / "notes.txt")]


def test_empty_class_folder_raises_naming_it(tmp_path):
    root = _make_folder(tmp_path, {"a": 2, "b": 0})
    with pytest.raises(ValueError, match=r"class folder.*'.*b'"):
        ImageFolderDataset(root)


def test_empty_class_folder_allowed_keeps_its_label_and_warns(tmp_path):
    root = _make_folder(tmp_path, {"a": 0, "b": 2})
    with pytest.warns(UserWarning, match=r"1 class folder.*a'"):
        ds = ImageFolderDataset(root, allow_empty_classes=True)
    assert ds.classes == ["a", "b"] and ds.targets == [1, 1] and ds.empty_classes == ["a"]


def test_dataset_smaller_than_one_global_batch_is_rejected_before_training(tmp_path):
    dataset = build_pretrain_dataset("image_folder", root=str(_make_folder(tmp_path, {"a": 3, "b": 2})), image_size=8)
    with pytest.raises(ValueError, match="5 samples, fewer than one global batch of 8"):
        check_dataset_size(dataset, 8)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        build_loader(dataset, micro_batch_size=4, global_batch_size=8)


def test_empty_dataset_is_rejected(tmp_path):
    (tmp_path / "list.txt").write_text("# no images\n")
    with pytest.raises(ValueError, match="empty"):
        check_dataset_size(FileListDataset(tmp_path / "list.txt"), 4)


def test_image_folder_matches_torchvision_order(tmp_path):
    root = _make_folder(tmp_path, {"dog": 3, "cat": 2, "emu": 1})
    os.makedirs(root / "cat" / "sub")
    (root / "cat" / "sub" / "x.jpg").write_bytes(_jpeg_bytes(9))
    assert ImageFolderDataset(root).samples == ImageFolder(str(root)).samples


def test_first_k_per_class_keeps_the_first_k_sorted_files(tmp_path):
    root = _make_folder(tmp_path, {"a": 4, "b": 2})
    ds = ImageFolderDataset(root, first_k_per_class=3)
    assert [os.path.relpath(p, root) for p, _ in ds.samples] == ["a/000.jpg", "a/001.jpg", "a/002.jpg",
                                                                  "b/000.jpg", "b/001.jpg"]


def test_file_list_reads_paths_labels_and_first_k(tmp_path):
    root = _make_folder(tmp_path / "imgs", {"a": 3, "b b": 2})
    (tmp_path / "list.txt").write_text(
        "# path label\na/002.jpg 0\na/000.jpg 0\n\nb b/001.jpg 1\na/001.jpg 0\nb b/000.jpg 1\n")
    ds = FileListDataset(tmp_path / "list.txt", root=root, first_k_per_class=2)
    assert [(os.path.relpath(p, root), y) for p, y in ds.samples] == [
        ("a/000.jpg", 0), ("a/001.jpg", 0), ("b b/000.jpg", 1), ("b b/001.jpg", 1)]
    assert ds[2][0].size == (16, 16) and ds.classes == ["0", "1"]


def test_file_list_malformed_line_names_the_line(tmp_path):
    (tmp_path / "list.txt").write_text("a.jpg 0\nb.jpg cat\n")
    with pytest.raises(ValueError, match=r"list.txt:2"):
        FileListDataset(tmp_path / "list.txt")


def test_file_list_missing_file_is_skipped_and_counted(tmp_path):
    _make_folder(tmp_path, {"a": 2})
    (tmp_path / "list.txt").write_text("a/000.jpg 0\na/gone.jpg 1\na/001.jpg 0\n")
    ds = FileListDataset(tmp_path / "list.txt")
    assert ds[1][1] == 0 and list(ds.bad_files) == [str(tmp_path / "a" / "gone.jpg")]


def test_small_images_are_evaluated_whole_and_large_ones_with_the_reference_border() -> None:
    from sfrik_scale.data.transforms import build_eval_transform, eval_resize_size

    assert eval_resize_size(224) == 256 and eval_resize_size(96) == 110
    assert eval_resize_size(32) == 32 and eval_resize_size(64) == 64
    img = Image.fromarray(np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3) % 251)
    out = build_eval_transform(32)(img)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    expected = (torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255 - mean) / std
    torch.testing.assert_close(out, expected)  # nothing cropped, nothing resampled


def test_small_view_set_crops_at_least_thirty_percent_jitters_only_brightness_contrast_and_flips() -> None:
    from sfrik_scale.data.transforms import AUGMENTATIONS

    v1, v2 = AUGMENTATIONS.get("small")(32)
    au, _ = AUGMENTATIONS.get("alignment_uniformity")(32)
    assert v1 == v2 and v1.crop_scale == (0.3, 1.0) and v1.size == 32 and v1.flip_p == 0.5
    assert (v1.saturation, v1.hue, v1.grayscale_p) == (0.0, 0.0, 0.0) and v1.jitter_p == au.jitter_p == 1.0
    assert dataclasses.replace(v1, crop_scale=au.crop_scale, flip_p=au.flip_p, saturation=au.saturation,
                               hue=au.hue, grayscale_p=au.grayscale_p) == au
    assert AUGMENTATIONS.get("small_flip")(32) == (v1, v2)  # the older name of the same set


@pytest.mark.parametrize("dataset, flip, expected", [
    ("digits", None, 0.0),        # a mirrored digit is another symbol: the dataset vetoes the set's flips
    ("digits", True, 0.5),        # unless asked for (the ablation of docs/evaluation.md)
    ("synthetic", None, 0.5),     # the set's own
    ("synthetic", False, 0.0),    # a folder of letters: data.flip=false
    ("image_folder", None, 0.5),
])
def test_flips_follow_data_flip_and_whether_the_dataset_is_mirror_invariant(tmp_path, dataset, flip, expected):
    from sfrik_scale.data import build_pretrain_dataset, mirror_invariant
    from sfrik_scale.data.transforms import AUGMENTATIONS

    assert mirror_invariant(dataset) == (dataset != "digits")
    extra = {}
    if dataset == "image_folder":
        for c in ("a", "b"):
            (tmp_path / c).mkdir()
            Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / c / "x.png")
        extra = dict(root=str(tmp_path))
    ds = build_pretrain_dataset(dataset, augmentations="small", image_size=16, seed=0, flip=flip, **extra)
    small, _ = AUGMENTATIONS.get("small")(16)
    # only the flip probability changes: on digits the views are exactly those drawn before flips were added
    assert ds.transform.desc1 == ds.transform.desc2 == dataclasses.replace(small, flip_p=expected)


def test_the_augmented_probe_flips_only_where_the_dataset_allows_it():
    from sfrik_scale.eval.data import classifier_train_transform

    half = np.zeros((16, 16, 3), np.uint8)
    half[:, 8:] = 255  # dark left half, bright right half: a flip swaps them
    img = Image.fromarray(half)

    def flipped(flip: bool) -> list[bool]:
        t = classifier_train_transform(16, (1.0, 1.0), flip=flip)
        torch.manual_seed(0)
        return [bool(out[:, :, :8].mean() > out[:, :, 8:].mean()) for out in (t(img) for _ in range(32))]

    assert not any(flipped(False))  # digits: a mirrored digit is another symbol
    assert 0 < sum(flipped(True)) < 32


def test_the_pretrain_loader_chooses_its_backend_and_dataset_options(monkeypatch):
    from types import SimpleNamespace

    from sfrik_scale.data import dali as dali_module
    from sfrik_scale.data.pretrain import build_pretrain_loader, choose_backend

    settings = SimpleNamespace(dataset="synthetic", augmentations="small", image_size=16, loader="torchvision",
                               synthetic_size=64, num_classes=4, num_workers=0, num_threads=1, skip_bad_files=True,
                               path=None, images_per_class=None)
    data = build_pretrain_loader(settings, rank=0, world_size=1, device=torch.device("cpu"), micro_batch_size=16,
                                 global_batch_size=16, seed=0)
    assert data.backend == "torchvision" and len(data.dataset) == 64
    view1, view2, labels = next(iter(data.loader))
    assert view1.shape == view2.shape == (16, 3, 16, 16) and int(labels.max()) < 4
    monkeypatch.setattr(dali_module, "dali_available", lambda: (False, "no DALI in this test"))
    notices = []
    assert choose_backend("auto", notices.append) == "torchvision"
    assert notices == ["data.loader=auto: DALI unavailable (no DALI in this test); using torchvision"]
    with pytest.raises(ValueError, match="data.loader=dali but DALI does not work here .no DALI in this test."):
        choose_backend("dali")
