"""The DALI two-view loader: same order, sharding, resume and bad-file rules as torchvision.

DALI decodes and augments; Python decides *what* is decoded. The loader walks the
same `ShardedSampler` as the torchvision loader and feeds the pipeline, batch by
batch, through ``fn.external_source``: the encoded bytes of this rank's samples and
the per-sample random choices of both views (``sfrik_scale.data.dali_ops``). Hence,
for the same seed and dataset, the DALI and torchvision loaders yield the same
samples in the same order on every rank, and:

- sharding: rank r takes every world_size-th sample of the epoch's permutation
  (disjoint shards covering the epoch), and every rank yields the same number of
  micro-batches, ``epoch_length / global_batch x accumulation`` (drop-last to whole
  global batches, a different tail every epoch);
- resume: ``set_position(epoch, samples_seen_global)`` from the checkpoint; the next
  iteration yields exactly the unseen samples, with the views an uninterrupted run
  would have drawn (the views are a function of (seed, epoch, index));
- ``fn.readers.file`` was the alternative: it shards and shuffles by itself, but its
  shuffle is a buffer, not a permutation shared with the checkpoint, so it can neither
  resume mid-epoch exactly nor match the torchvision order, and it cannot skip a bad
  file.

Bad input (the `BadFileLog` rules of ``sfrik_scale.data.folder``): every file is read
and checked on the Python side before it is fed (readable, non-empty, an image header
PIL recognises, a JPEG that reaches its end-of-image marker after its last scan, a
PNG that reaches IEND); formats DALI cannot decode (GIF) are transcoded. Whatever
still fails to decode in DALI fails its batch: the loader finds the file with a
one-sample decoder, records it, rebuilds the pipeline and replays the batches in
flight, bit-identically. By default a bad file is recorded in ``bad_files`` and its
item served by the next readable sample in index order (with its own random
choices unchanged); ``strict=True`` raises `BadImageError` naming the file at once.
An empty dataset or one smaller than one global batch raises ValueError when the
loader is built.

Datasets without files (``synthetic``) are fed as decoded HWC uint8 arrays instead
of bytes; the rest of the graph is the same.

Devices: ``device="cpu"`` runs everything on CPU threads (``device_id=None``);
``"gpu"`` decodes with the "mixed" nvJPEG decoder and augments on the GPU, yielding
CUDA tensors. ``"auto"``: gpu when CUDA is available.
"""
from __future__ import annotations

import functools
import io
import re
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Deque, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from sfrik_scale.data.folder import BadFileLog, BadImageError, check_dataset_size
from sfrik_scale.data.sampler import SamplerPositionMixin, ShardedSampler
from sfrik_scale.data.transforms import AUGMENTATIONS, ViewAugmentation, as_view_augmentation

_DALI_STREAM = 0x0DA1  # keeps the views' uniforms apart from other users of mix_seed(seed, ...)
ENCODED_INPUT, PIXELS_INPUT = "encoded", "images"  # names of the pipelines' image inputs (dali_ops.ENCODED, IMAGES)

# What DALI's image decoder reads (PIL format names); anything else is transcoded.
_DALI_FORMATS = {"JPEG", "MPO", "PNG", "BMP", "TIFF", "PPM", "WEBP", "JPEG2000"}


# ---------------------------------------------------------------------------------
# Availability (data.loader: auto).
# ---------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def dali_available() -> Tuple[bool, str]:
    """(True, description) when DALI imports and runs a tiny CPU decode pipeline, else (False, why).

    Cached: the check (about a second, once) imports DALI and builds a pipeline.
    """
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def

        buf = io.BytesIO()
        Image.new("RGB", (8, 6), (200, 30, 40)).save(buf, format="JPEG")

        @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
        def probe():
            data = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            return fn.resize(fn.decoders.image(data, device="cpu"), size=[4, 4])

        pipe = probe()
        pipe.build()
        pipe.feed_input("encoded", [np.frombuffer(buf.getvalue(), np.uint8)])
        pipe.schedule_run()
        (out,) = pipe.outputs()
        if np.array(out[0]).shape != (4, 4, 3):
            return False, f"DALI test pipeline returned shape {np.array(out[0]).shape}"
        del pipe
        return True, f"nvidia-dali {dali.__version__}"
    except Exception as exc:  # ImportError, missing CUDA libraries, a broken wheel...
        return False, f"{type(exc).__name__}: {exc}".splitlines()[0]


def _require_dali() -> None:
    ok, reason = dali_available()
    if not ok:
        raise RuntimeError(f"the DALI loader needs a working nvidia-dali ({reason}); use data.loader: torchvision")


def _resolve_device(device: str, device_id: Optional[int]) -> Tuple[str, Optional[int]]:
    if device == "auto":
        device = "gpu" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'gpu', got {device!r}")
    if device == "gpu":
        if not torch.cuda.is_available():
            raise ValueError("device='gpu' needs CUDA; use device='cpu'")
        device_id = torch.cuda.current_device() if device_id is None else int(device_id)
    else:
        device_id = None
    return device, device_id


# ---------------------------------------------------------------------------------
# The Python side: index -> checked bytes (or pixels), with bad-file skipping.
# ---------------------------------------------------------------------------------
class _BadInput(Exception):
    """A file is unusable; the message is the reason recorded in the `BadFileLog`."""


def check_encoded(data: bytes) -> Tuple[str, int, int]:
    """(PIL format, height, width) of an encoded image, or `_BadInput` with the reason.

    Reads headers only (~20 us): empty files, non-images, truncated JPEGs (no
    end-of-image marker after the last start-of-scan) and truncated PNGs (no IEND).
    """
    if not data:
        raise _BadInput("empty file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, (width, height) = img.format, img.size
    except Exception as exc:  # PIL: UnidentifiedImageError, SyntaxError, struct errors...
        message = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(exc))  # no buffer address
        raise _BadInput(f"{type(exc).__name__}: {message}") from None
    if width < 1 or height < 1:
        raise _BadInput(f"image of size {width}x{height}")
    if fmt in ("JPEG", "MPO") and not data.endswith(b"\xff\xd9"):
        # Slow path only for files with trailing bytes after EOI (or without EOI):
        # entropy-coded data never contains 0xFFD9 or 0xFFDA, so EOI must follow the last SOS.
        last_scan = data.rfind(b"\xff\xda")
        if last_scan < 0 or data.rfind(b"\xff\xd9") < last_scan:
            raise _BadInput("truncated JPEG (no end-of-image marker after the last scan)")
    elif fmt == "PNG" and data.rfind(b"IEND") < 0:
        raise _BadInput("truncated PNG (no IEND chunk)")
    return fmt, height, width


def _to_ppm(data: bytes) -> bytes:
    """Transcode a format DALI cannot read (GIF...) to binary PPM, through PIL's RGB conversion."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            rgb = img.convert("RGB")
    except Exception as exc:
        raise _BadInput(f"{type(exc).__name__}: {exc}") from None
    buf = io.BytesIO()
    rgb.save(buf, format="PPM")
    return buf.getvalue()


def _as_hwc_uint8(img: Any) -> np.ndarray:
    if isinstance(img, Image.Image):
        return np.asarray(img.convert("RGB") if img.mode != "RGB" else img)
    arr = img.numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[2] != 3:  # CHW tensor
        arr = arr.transpose(1, 2, 0)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected an RGB image (PIL, HWC or CHW uint8), got {arr.dtype} {arr.shape}")
    return np.ascontiguousarray(arr)


class SampleSource:
    """Reads items of an ``(image, label)`` dataset for DALI.

    File datasets (with ``samples`` = [(path, label)]: ImageFolderDataset,
    FileListDataset) give checked encoded bytes; other datasets give decoded HWC
    uint8 arrays (``encoded`` False). Bad files are recorded in ``bad_files`` (the
    dataset's own log when it has one) and replaced by the next readable sample in
    index order, or raise `BadImageError` when ``strict``.
    """

    def __init__(self, dataset: Any, strict: bool = False) -> None:
        self.dataset = dataset
        self.strict = bool(strict)
        self.samples: Optional[List[Tuple[str, int]]] = getattr(dataset, "samples", None)
        self.encoded = self.samples is not None
        log = getattr(dataset, "bad_files", None)
        self.bad_files: BadFileLog = log if isinstance(log, BadFileLog) else BadFileLog()

    def __len__(self) -> int:
        return len(self.dataset)

    def path(self, index: int) -> Optional[str]:
        return self.samples[index][0] if self.samples is not None else None

    def _read(self, path: str) -> Tuple[np.ndarray, int, int]:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:  # missing, unreadable, a folder...
            raise _BadInput(f"{type(exc).__name__}: {exc}") from None
        fmt, height, width = check_encoded(data)
        if fmt not in _DALI_FORMATS:
            data = _to_ppm(data)
        return np.frombuffer(data, dtype=np.uint8), height, width

    def mark_bad(self, path: str, reason: str) -> None:
        if self.strict:
            raise BadImageError(f"cannot read image {path!r}: {reason}", path)
        self.bad_files.record(path, reason)

    def get(self, index: int) -> Tuple[np.ndarray, int, int, int, Optional[str]]:
        """(payload, label, height, width, path) of ``index`` or of its replacement."""
        if self.samples is None:
            img, label = self.dataset[index]
            arr = _as_hwc_uint8(img)
            return arr, int(label), arr.shape[0], arr.shape[1], None
        n = len(self.samples)
        for offset in range(n):  # the item itself, then the next ones (deterministic replacement)
            path, label = self.samples[(index + offset) % n]
            if path in self.bad_files:
                continue
            try:
                payload, height, width = self._read(path)
            except _BadInput as exc:
                self.mark_bad(path, str(exc))
                continue
            if offset:
                self.bad_files.count_replacement()
            return payload, int(label), height, width, path
        raise BadImageError(f"no readable image among the {n} files of {self.dataset!r}")


def _unwrap(dataset: Any) -> Tuple[Any, Optional[Tuple[ViewAugmentation, ViewAugmentation]], Optional[int]]:
    """(base dataset, view descriptions, augmentation seed) of a TwoViewDataset; (dataset, None, None) otherwise."""
    transform = getattr(dataset, "transform", None)
    if hasattr(dataset, "base") and hasattr(transform, "desc1") and hasattr(transform, "desc2"):
        return dataset.base, (transform.desc1, transform.desc2), getattr(dataset, "seed", None)
    if hasattr(dataset, "base") and not hasattr(dataset, "samples"):  # TransformedDataset
        return dataset.base, None, None
    return dataset, None, None


# ---------------------------------------------------------------------------------
# Driving a pipeline: a queue of scheduled batches, replayed after a decode failure.
# ---------------------------------------------------------------------------------
@dataclass
class _Batch:
    """One fed batch: what went in (to replay it) and the labels to yield with its outputs."""

    indices: List[int]
    inputs: dict
    labels: torch.Tensor
    paths: List[Optional[str]]


class _PipelineDriver:
    """Feeds batches to a DALI pipeline ahead of time and yields their outputs in order.

    ``run(chunks, prepare)``: ``prepare(indices) -> _Batch`` reads a batch's inputs; a
    background thread prepares the next batches while ``depth`` batches are scheduled
    in DALI, so file reading, DALI's threads and the caller's training overlap. A batch
    whose decoding fails is diagnosed sample by sample, then the pipeline is rebuilt
    and every batch in flight prepared and fed again (`_recover`).
    """

    def __init__(self, build: Callable[[], Any], source: SampleSource, depth: int, device: str) -> None:
        self.build, self.source, self.depth, self.device = build, source, max(1, int(depth)), device
        self.pipe = build()
        self.inflight: Deque[_Batch] = deque()
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sfrik-dali-reader")
        self._probe = None

    def _feed(self, batch: _Batch) -> None:
        for name, data in batch.inputs.items():
            self.pipe.feed_input(name, data)
        self.pipe.schedule_run()
        self.inflight.append(batch)

    def close(self) -> None:
        self._reader.shutdown(wait=True, cancel_futures=True)
        self.inflight.clear()
        self.pipe = self._probe = None

    def discard(self) -> None:
        """Drop the batches of an abandoned iteration (their results are never needed)."""
        if self.inflight:
            self.inflight.clear()
            self.pipe = self.build()  # cheaper and safer than waiting for outputs nobody reads

    def run(self, chunks: Sequence[List[int]], prepare: Callable[[List[int]], _Batch]
            ) -> Iterator[Tuple[List[torch.Tensor], _Batch]]:
        self.discard()
        todo = deque(chunks)
        ready: Deque[Future] = deque()

        def next_batch() -> _Batch:
            while todo and len(ready) < 2:  # keep the reader one batch ahead
                ready.append(self._reader.submit(prepare, todo.popleft()))
            return ready.popleft().result()

        try:
            while (todo or ready) and len(self.inflight) < self.depth:
                self._feed(next_batch())
            while self.inflight:
                outputs = self._next_outputs(prepare)
                batch = self.inflight.popleft()
                if todo or ready:  # schedule the next batch before handing this one out
                    self._feed(next_batch())
                yield outputs, batch
        finally:
            for future in ready:
                future.cancel()

    def _next_outputs(self, prepare: Callable[[List[int]], _Batch]) -> List[torch.Tensor]:
        while True:
            try:
                return [_to_torch(out, self.device) for out in self.pipe.outputs()]
            except RuntimeError as exc:
                self._recover(exc, prepare)

    def _recover(self, exc: RuntimeError, prepare: Callable[[List[int]], _Batch]) -> None:
        # The probe is DALI's CPU decoder; a failure it cannot reproduce (an nvJPEG-only one,
        # or no bad file at all) is re-raised as it came, with DALI's message.
        failed = self.inflight[0]
        found = [path for path, data in zip(failed.paths, failed.inputs.get(ENCODED_INPUT, ()))
                 if path is not None and not self._decodes(data)]
        if not found:
            raise exc
        for path in found:
            self.source.mark_bad(path, "DALI could not decode it: " + _dali_reason(exc))
        replay = [b.indices for b in self.inflight]
        self.inflight.clear()
        self.pipe = self.build()
        for indices in replay:  # same indices, same random choices: the replay is bit-identical
            self._feed(prepare(indices))

    def _decodes(self, data: np.ndarray) -> bool:
        from sfrik_scale.data.dali_ops import ENCODED, build_decode_probe

        if self._probe is None:
            self._probe = build_decode_probe()
        try:
            self._probe.feed_input(ENCODED, [data])
            self._probe.schedule_run()
            self._probe.outputs()
            return True
        except RuntimeError:
            self._probe = None  # rebuilt for the next sample: a failed pipeline is not trusted
            return False


def _dali_reason(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if "sample" in line or "decode" in line.lower()]
    return (useful or lines or [type(exc).__name__])[-1][:200]


def _to_torch(tensor_list, device: str) -> torch.Tensor:
    """A DALI output batch as one torch tensor, without a copy when DALI holds it contiguously.

    Zero-copy is safe because the pipelines run DALI's dynamic executor, whose output
    buffers stay valid while referenced (the DLPack capsule holds a reference).
    """
    dense = tensor_list.as_tensor()
    try:
        return torch.from_dlpack(dense)
    except (RuntimeError, TypeError, BufferError):  # no DLPack export: copy
        from nvidia.dali.plugin.pytorch import feed_ndarray

        target = torch.device("cuda", dense.device_id()) if device == "gpu" else torch.device("cpu")
        out = torch.empty(dense.shape(), dtype=torch.float32, device=target)
        stream = torch.cuda.current_stream(target) if device == "gpu" else None
        return feed_ndarray(dense, out, cuda_stream=stream)


# ---------------------------------------------------------------------------------
# Two-view loader.
# ---------------------------------------------------------------------------------
class DaliTwoViewLoader(SamplerPositionMixin):
    """Yields ``(view1, view2, labels)``: (micro, 3, S, S) float32 normalised x2 and (micro,) int64.

    Same interface as ``sfrik_scale.data.TwoViewDataLoader``: ``sharded_sampler``,
    ``set_epoch``, ``set_position``, ``bad_files``, ``len()`` (micro-batches left in
    the epoch on this rank, the same on every rank). Views are on the GPU when the
    pipeline runs there. Build it with `build_dali_loader`.
    """

    def __init__(self, source: SampleSource, sharded_sampler: ShardedSampler, desc1: ViewAugmentation,
                 desc2: ViewAugmentation, *, micro_batch_size: int, seed: int, num_threads: int, device: str,
                 device_id: Optional[int], prefetch: int) -> None:
        from sfrik_scale.data.dali_ops import build_two_view_pipeline

        self.source, self.sharded_sampler = source, sharded_sampler
        self.desc1, self.desc2 = desc1, desc2
        self.micro_batch_size, self.seed = int(micro_batch_size), int(seed)
        self.device, self.device_id, self.num_threads = device, device_id, int(num_threads)
        self.dataset = source.dataset
        build = functools.partial(build_two_view_pipeline, desc1, desc2, encoded=source.encoded, device=device,
                                  batch_size=self.micro_batch_size, num_threads=self.num_threads,
                                  device_id=device_id, seed=self.seed)
        self._driver = _PipelineDriver(build, source, prefetch, device)

    @property
    def bad_files(self) -> BadFileLog:
        return self.source.bad_files

    def __len__(self) -> int:
        return len(self.sharded_sampler) // self.micro_batch_size

    def _prepare(self, epoch: int, indices: List[int]) -> _Batch:
        from sfrik_scale.data import mix_seed
        from sfrik_scale.data.dali_ops import UNIFORMS_PER_VIEW, draw_view_params, sample_uniforms, view_feeds

        items = [self.source.get(i) for i in indices]
        heights = np.array([it[2] for it in items])
        widths = np.array([it[3] for it in items])
        # The random choices belong to the requested index (a replacement keeps them).
        u = sample_uniforms([mix_seed(self.seed, _DALI_STREAM, epoch, i) for i in indices],
                            2 * UNIFORMS_PER_VIEW)
        params1 = draw_view_params(self.desc1, u[:, :UNIFORMS_PER_VIEW], heights, widths)
        params2 = draw_view_params(self.desc2, u[:, UNIFORMS_PER_VIEW:], heights, widths)
        inputs = {ENCODED_INPUT if self.source.encoded else PIXELS_INPUT: [it[0] for it in items],
                  **view_feeds(self.desc1, params1, 1, self.device), **view_feeds(self.desc2, params2, 2, self.device)}
        labels = torch.tensor([it[1] for it in items], dtype=torch.long)
        return _Batch(list(indices), inputs, labels, [it[4] for it in items])

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        epoch = self.sharded_sampler.epoch
        order = list(self.sharded_sampler)
        m = self.micro_batch_size
        chunks = [order[k:k + m] for k in range(0, len(order) - m + 1, m)]  # drop a partial micro-batch
        for (view1, view2), batch in self._driver.run(chunks, functools.partial(self._prepare, epoch)):
            yield view1, view2, batch.labels.to(view1.device)

    def close(self) -> None:
        """Stop the reader thread and free the pipeline; yielded tensors stay valid."""
        self._driver.close()

    def __repr__(self) -> str:
        return (f"DaliTwoViewLoader({self.dataset!r}, micro_batch_size={self.micro_batch_size}, "
                f"device={self.device!r}, num_threads={self.num_threads}, {self.sharded_sampler!r})")


def build_dali_loader(
    dataset: Any,
    *,
    micro_batch_size: int,
    global_batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    num_threads: int = 4,
    augmentations: Union[str, Tuple[Any, Any], None] = None,
    image_size: Optional[int] = None,
    strict: Optional[bool] = None,
    device: str = "auto",
    device_id: Optional[int] = None,
    shuffle: bool = True,
    prefetch: int = 2,
) -> DaliTwoViewLoader:
    """The per-rank DALI two-view loader of ``dataset`` for DeepSpeed's global batch.

    Args:
        dataset: a ``TwoViewDataset`` (``build_pretrain_dataset``: its view
            descriptions are used, so both backends share them), a file dataset
            (``ImageFolderDataset`` / ``FileListDataset``) or any ``(image, label)`` dataset.
        micro_batch_size, global_batch_size, rank, world_size, seed, shuffle: as
            ``sfrik_scale.data.build_loader`` (``seed`` shuffles). The views' random choices
            are keyed by the TwoViewDataset's seed, as on the torchvision path, else by ``seed``.
        num_threads: DALI CPU threads (decoding and CPU augmentation).
        augmentations: an ``AUGMENTATIONS`` name (needs ``image_size``) or a pair of
            view descriptions; default: the TwoViewDataset's.
        strict: stop at the first bad file (`BadImageError`); default: the dataset's ``strict``.
        device: "cpu", "gpu" (mixed decoder, GPU augmentation, CUDA outputs) or "auto".
        device_id: CUDA device of the pipeline (default: the current one).
        prefetch: batches scheduled ahead of the one being consumed.

    Raises ValueError before anything runs when the dataset is empty or smaller than
    one global batch, or the batch sizes are inconsistent; RuntimeError when DALI does not work.

    Example:
        >>> ds = build_pretrain_dataset("image_folder", root="/data/imagenet/train", augmentations="sfrik",
        ...                             image_size=224, seed=0)
        >>> loader = build_dali_loader(ds, micro_batch_size=128, global_batch_size=1024, rank=r, world_size=8,
        ...                            seed=0, num_threads=8, device="gpu")
        >>> loader.set_position(epoch, samples_seen_global)   # only when resuming
        >>> loader.set_epoch(epoch)
        >>> for view1, view2, labels in loader: ...          # (128, 3, 224, 224) float32 on the GPU x2, (128,)
    """
    _require_dali()
    base, descs, dataset_seed = _unwrap(dataset)
    if augmentations is not None:
        if isinstance(augmentations, str):
            if image_size is None:
                raise ValueError("augmentations given by name need image_size")
            descs = AUGMENTATIONS.get(augmentations)(image_size)
        else:
            descs = tuple(augmentations)
    if descs is None:
        raise ValueError("give augmentations (a name or two view descriptions) or a TwoViewDataset")
    desc1, desc2 = (as_view_augmentation(d) for d in descs)
    if micro_batch_size < 1 or global_batch_size % (micro_batch_size * world_size):
        raise ValueError(
            f"global_batch_size ({global_batch_size}) must be a multiple of micro_batch_size ({micro_batch_size}) "
            f"x world_size ({world_size})")
    check_dataset_size(base, global_batch_size)
    device, device_id = _resolve_device(device, device_id)
    source = SampleSource(base, strict=getattr(base, "strict", False) if strict is None else strict)
    sampler = ShardedSampler(len(base), rank=rank, world_size=world_size, seed=seed, shuffle=shuffle,
                             drop_last=True, global_batch=global_batch_size)
    return DaliTwoViewLoader(source, sampler, desc1, desc2, micro_batch_size=micro_batch_size,
                             seed=seed if dataset_seed is None else dataset_seed, num_threads=num_threads,
                             device=device, device_id=device_id, prefetch=prefetch)


__all__ = [
    "DaliTwoViewLoader", "SampleSource", "build_dali_loader",
    "check_encoded", "dali_available",
]
