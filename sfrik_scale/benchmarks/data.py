"""``sfrik-scale bench data``: images/s of the two-view pipelines, torchvision vs DALI, on the same JPEGs.

Writes a folder of ImageNet-sized JPEGs (about 500x375, natural-image-like content so
the files weigh ~100 KB like ImageNet's), then times full epochs of the torchvision
loader (``num_workers`` = T processes) and the DALI loader (T CPU threads) with the
same augmentation set at the same size; on a machine with CUDA also the DALI loader
with the mixed (nvJPEG) decoder and GPU augmentation. One epoch of warm-up (worker
start, pipeline build, page cache) is not timed. Throughput counts images (each
yields two views).

Wall-clock images/s depend on what else runs on the machine; the second figure, CPU
time per image of each CPU pipeline run in-process on one thread (``process_time``:
torchvision with ``num_workers=0``, DALI with one thread), does not.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from sfrik_scale.data.pretrain import BACKENDS, DALI, TORCHVISION

#: the measured pipelines: each loader backend, and DALI decoding on the GPU
DALI_GPU = f"{DALI}-gpu"
PIPELINES = (*BACKENDS, DALI_GPU)


@dataclass
class DataMeasurement:
    pipeline: str
    device: str
    threads: int
    images_per_s: float
    seconds: float
    images: int
    cpu_ms_per_image: Optional[float] = None


def write_jpegs(root: str, num_images: int, width: int = 500, height: int = 375, num_classes: int = 4,
                seed: int = 0, quality: int = 90) -> str:
    """``root/class_k/img_i.jpg``: smooth colour fields plus texture and noise; returns ``root``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(num_images):
        folder = os.path.join(root, f"class_{i % num_classes}")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"img_{i:05d}.jpg")
        if os.path.exists(path):
            continue
        coarse = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8)).resize((width, height),
                                                                                        Image.BICUBIC)
        pixels = np.asarray(coarse, dtype=np.float32)
        yy, xx = np.mgrid[0:height, 0:width]
        f = rng.uniform(0.02, 0.15, size=2)
        pixels += 40 * np.sin(f[0] * xx + f[1] * yy)[..., None]
        pixels += rng.normal(0, 12, size=pixels.shape)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, format="JPEG", quality=quality)
    return root


def _time_epochs(loader, epochs: int, clock=time.perf_counter) -> tuple[float, int]:
    loader.set_epoch(0)
    for _ in loader:  # warm-up epoch
        pass
    images, start = 0, clock()
    for epoch in range(1, epochs + 1):
        loader.set_epoch(epoch)
        for view1, _, _ in loader:
            images += view1.shape[0]
        if view1.is_cuda:
            torch.cuda.synchronize()
    return clock() - start, images


def _build(name: str, dataset, batch_size: int, threads: int):
    from sfrik_scale.data import build_loader

    if name == TORCHVISION:
        return build_loader(dataset, micro_batch_size=batch_size, global_batch_size=batch_size, num_workers=threads,
                            persistent_workers=True, pin_memory=False)
    from sfrik_scale.data.dali import build_dali_loader

    return build_dali_loader(dataset, micro_batch_size=batch_size, global_batch_size=batch_size, num_threads=threads,
                             device="gpu" if name == DALI_GPU else "cpu")


def bench_data(root: str, threads: int, batch_size: int, image_size: int, augmentations: str, epochs: int,
               pipelines: List[str], cpu_cost: bool = True) -> List[DataMeasurement]:
    from sfrik_scale.data import AUGMENTATIONS, ImageFolderDataset, TwoViewDataset, TwoViewTransform

    # the folder of JPEGs just written, with the named two-view augmentations
    dataset = TwoViewDataset(ImageFolderDataset(root), TwoViewTransform(*AUGMENTATIONS.get(augmentations)(image_size)),
                             seed=0)
    batch_size = min(batch_size, len(dataset))
    out = []
    for name in pipelines:
        loader = _build(name, dataset, batch_size, threads)
        seconds, images = _time_epochs(loader, epochs)
        row = DataMeasurement(name, "gpu" if name == DALI_GPU else "cpu", threads, images / seconds, seconds, images)
        del loader
        if cpu_cost and name != DALI_GPU:
            # In-process, one thread: process_time counts DALI's thread; torchvision runs in the main process.
            torch_threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                cpu_seconds, cpu_images = _time_epochs(_build(name, dataset, batch_size, 0 if name == TORCHVISION
                                                              else 1), 1, clock=time.process_time)
            finally:
                torch.set_num_threads(torch_threads)
            row.cpu_ms_per_image = 1e3 * cpu_seconds / cpu_images
        out.append(row)
    return out


def print_data_table(rows: List[DataMeasurement], image_size: int, augmentations: str, jpeg_size: str = "500x375",
                     console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"two-view loaders, '{augmentations}' views at {image_size} px from {jpeg_size} JPEGs, "
                        f"{len(os.sched_getaffinity(0))} CPU cores", caption="img/s: wall clock with the given threads "
                        "(DALI threads = torchvision workers); CPU ms/img: one thread in-process (process_time)")
    # img/s: wall clock with `threads` threads; CPU ms/img: one thread, in-process (robust to a busy machine)
    for col in ("pipeline", "device", "threads", "img/s", "vs tv", "images", "seconds", "CPU ms/img", "vs tv (CPU)"):
        table.add_column(col, justify="left" if col in ("pipeline", "device") else "right")
    base: Optional[float] = next((r.images_per_s for r in rows if r.pipeline == TORCHVISION), None)
    base_cpu: Optional[float] = next((r.cpu_ms_per_image for r in rows if r.pipeline == TORCHVISION), None)
    for r in rows:
        ratio = f"{r.images_per_s / base:.2f}" if base else "-"
        cpu = f"{r.cpu_ms_per_image:.2f}" if r.cpu_ms_per_image else "-"
        cpu_ratio = f"{base_cpu / r.cpu_ms_per_image:.2f}" if base_cpu and r.cpu_ms_per_image else "-"
        table.add_row(r.pipeline, r.device, str(r.threads), f"{r.images_per_s:,.1f}", ratio, str(r.images),
                      f"{r.seconds:.2f}", cpu, cpu_ratio)
    console.print(table)


def add_parser(sub):
    data = sub.add_parser("data", help="images/s of the torchvision and DALI two-view pipelines on generated JPEGs")
    data.add_argument("--dir", default=None, help="folder for the JPEGs (kept; default: a temporary folder)")
    data.add_argument("--images", type=int, default=256, help="number of generated JPEGs")
    data.add_argument("--jpeg-size", default="500x375", help="WxH of the generated JPEGs (ImageNet's typical size)")
    data.add_argument("--threads", type=int, default=None,
                      help="CPU threads: DALI threads = torchvision workers (default: all visible cores)")
    data.add_argument("--batch-size", type=int, default=64, help="images per batch (two views each)")
    data.add_argument("--image-size", type=int, default=224, help="side of the crops in pixels")
    data.add_argument("--augmentations", default="sfrik", help="an AUGMENTATIONS name")
    data.add_argument("--epochs", type=int, default=2, help="timed epochs after one warm-up epoch")
    data.add_argument("--no-cpu-cost", action="store_true", help="skip the one-thread CPU-time measurement")
    data.add_argument("--pipelines", default=None,
                      help="comma-separated subset of torchvision,dali,dali-gpu (default: all that can run here)")
    return data


def main(args) -> int:
    from sfrik_scale.data.dali import dali_available

    threads = args.threads or len(os.sched_getaffinity(0))
    if args.pipelines:
        pipelines = [p.strip() for p in args.pipelines.split(",") if p.strip()]
    else:
        pipelines = [TORCHVISION]
        ok, reason = dali_available()
        if ok:
            pipelines.append(DALI)
            if torch.cuda.is_available():
                pipelines.append(DALI_GPU)
        else:
            print(f"DALI not measured: {reason}")
    unknown = sorted(set(pipelines) - set(PIPELINES))
    if unknown:
        raise ValueError(f"unknown pipeline(s) {unknown}; choose from {', '.join(PIPELINES)}")
    with tempfile.TemporaryDirectory(prefix="sfrik-bench-data-") as tmp:
        try:
            width, height = (int(v) for v in args.jpeg_size.lower().split("x"))
        except ValueError:
            raise ValueError(f"--jpeg-size expects WxH, got {args.jpeg_size!r}") from None
        root = write_jpegs(args.dir or tmp, args.images, width=width, height=height)
        rows = bench_data(root, threads, args.batch_size, args.image_size, args.augmentations, args.epochs, pipelines,
                          cpu_cost=not args.no_cpu_cost)
    print_data_table(rows, args.image_size, args.augmentations, args.jpeg_size)
    return 0
