"""The DALI graphs: two views from one `ViewAugmentation` description each.

Imported only by ``sfrik_scale.data.dali`` once DALI is known to import (rule 6: the
heavy optional dependency stays lazy); nothing here touches files or the sampler.

Randomness lives on the Python side. For every sample the loader draws the random
choices of both views (`draw_view_params`) from uniforms that are a pure function of
``(seed, epoch, index)`` (`sample_uniforms`), and feeds them to the pipeline next to
the encoded bytes; the graph itself has no random operator. So, as with the
torchvision pipeline, a sample's views do not depend on the rank, the world size,
the thread that decodes it, or where a run was resumed, and a batch can be replayed
bit-identically (the loader does so after a decode failure).

One view, in the torchvision order (``sfrik_scale.data.transforms``), one builder per
operator in `VIEW_OPS`, an operator with probability 0 left out, one with probability
1 applied without a branch, others under a per-sample DALI conditional (only the
selected samples are processed):

    resize of the crop box (RandomResizedCrop) -> colour jitter (p) and grayscale (p)
    -> gaussian blur (p) -> solarisation (p) -> flip + normalise + HWC->CHW float32

The flip moves to the last operator: it commutes with every colour operator and with
the symmetric blur, and ``crop_mirror_normalize`` does it for free. Jitter and
grayscale are one affine colour matrix per sample (``coord_transform``), composed in
Python in the jitter's random order (`color_matrices`).

Known differences from torchvision, all inside the tolerance of the distribution
test (tests/test_dali.py): the colour matrix is clamped once (torchvision clamps after
each jitter step); contrast pivots on the mean grey of the view before the colour
operators, carried through the preceding jitter steps (torchvision takes the mean of the
clamped intermediate image; an earlier version pivoted on mid-grey 128, which on dark
images such as white-on-black digits lifted the background to grey: docs/evaluation.md);
the hue shift is a rotation about the gray axis, a linear stand-in for the HSV shift
(DALI's own ``hsv``/``color_twist`` rotate in YIQ, which skews the blue channel); the
blur kernel is cut at 3 sigma (0.3 % of its mass; torchvision's spans 10 % of the
image side); on CPU the blur is two 1-D passes (``fn.filter``) rounded to uint8 between
them (at most one level off a single rounding); resampling kernels (cubic with
antialiasing) are DALI's, not PIL's.

Cost on CPU (one thread, 224 px views from 500x375 JPEGs, `sfrik-scale bench data`):
decoding ~1 ms per image, then per view resize ~1.7 ms, colour matrix ~1.5 ms (84 % of
the samples), blur ~0.4 ms, solarisation ~0.2 ms, normalisation ~0.3 ms. DALI's CPU
``gaussian_blur`` took 2-2.5 ms for the same kernel, hence the separable ``fn.filter``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.math as dali_math
import nvidia.dali.types as types
from nvidia.dali import pipeline_def
from nvidia.dali.pipeline import Pipeline

from sfrik_scale.data.transforms import ViewAugmentation

# ---------------------------------------------------------------------------------
# Per-sample random parameters (numpy, vectorised over the batch).
# ---------------------------------------------------------------------------------
PARAM_FIELDS: Tuple[str, ...] = (
    "crop_top", "crop_left", "crop_bottom", "crop_right",  # crop box in input pixels (rows, cols)
    "flip",                                                # 1: mirror horizontally
    "twist",                                               # 1: apply the colour matrix below
    *(f"color_{r}{c}" for r in range(3) for c in range(7)),  # 3 x 7 colour matrix [M | T | K], row-major
    "blur", "blur_sigma", "blur_window",
    "solarize",
)
"""Layout of the float32 parameter vector fed per sample and per view."""
P = {name: i for i, name in enumerate(PARAM_FIELDS)}
NUM_PARAMS = len(PARAM_FIELDS)

_CROP_ATTEMPTS = 10  # as torchvision's RandomResizedCrop
UNIFORMS_PER_VIEW = 2 * _CROP_ATTEMPTS + 2 + 14
"""Uniforms consumed per view: 2 per crop attempt, 2 for the crop position, 14 for the other choices."""

LUMA = np.array([0.299, 0.587, 0.114])
"""ITU-R 601-2 luma weights: PIL's "L" conversion, used by torchvision's saturation and grayscale."""


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Vectorised SplitMix64 finaliser on uint64 (wrapping arithmetic, as in ``sfrik_scale.data.mix_seed``)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def sample_uniforms(keys: Sequence[int], n: int) -> np.ndarray:
    """``(len(keys), n)`` float64 uniforms in [0, 1): row i is a pure function of ``keys[i]``.

    Counter-based (SplitMix64 of key + counter), so a batch costs a few numpy calls
    instead of one generator per sample.
    """
    k = np.asarray([int(key) & ((1 << 64) - 1) for key in keys], dtype=np.uint64).reshape(-1, 1)
    with np.errstate(over="ignore"):
        counters = np.arange(1, n + 1, dtype=np.uint64).reshape(1, -1) * np.uint64(0xD1B54A32D192ED03)
        bits = _splitmix64(_splitmix64(k) + counters)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def random_resized_crop_boxes(u: np.ndarray, heights: np.ndarray, widths: np.ndarray,
                              scale: Tuple[float, float], ratio: Tuple[float, float]) -> np.ndarray:
    """torchvision's ``RandomResizedCrop.get_params`` on a batch: ``(B, 4)`` (top, left, height, width).

    ``u``: (B, 2 * 10 + 2) uniforms (area and log-ratio per attempt, then the position).
    The first of 10 attempts that fits is kept; otherwise the centre crop with the
    aspect ratio clamped to ``ratio``, exactly as torchvision.
    """
    h_in = heights.astype(np.float64).reshape(-1, 1)
    w_in = widths.astype(np.float64).reshape(-1, 1)
    area = h_in * w_in
    a = _CROP_ATTEMPTS
    target = area * (scale[0] + (scale[1] - scale[0]) * u[:, 0:2 * a:2])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[:, 1:2 * a:2])
    w = np.rint(np.sqrt(target * aspect))  # Python's round(): half to even, like np.rint
    h = np.rint(np.sqrt(target / aspect))
    fits = (w > 0) & (w <= w_in) & (h > 0) & (h <= h_in)
    first = np.argmax(fits, axis=1)
    rows = np.arange(len(first))
    ch, cw = h[rows, first], w[rows, first]
    top = np.floor(u[:, 2 * a] * (heights - ch + 1))   # randint(0, H - h + 1)
    left = np.floor(u[:, 2 * a + 1] * (widths - cw + 1))
    # Fallback (no attempt fits): centre crop, aspect ratio clamped to the allowed range.
    miss = ~fits.any(axis=1)
    if miss.any():
        H, W = heights[miss].astype(np.float64), widths[miss].astype(np.float64)
        in_ratio = W / H
        fw, fh = W.copy(), H.copy()
        narrow, wide = in_ratio < min(ratio), in_ratio > max(ratio)
        fh[narrow] = np.rint(fw[narrow] / min(ratio))
        fw[wide] = np.rint(fh[wide] * max(ratio))
        ch[miss], cw[miss] = fh, fw
        top[miss], left[miss] = (H - fh) // 2, (W - fw) // 2
    return np.stack([top, left, ch, cw], axis=1)


def _hue_rotations(degrees: np.ndarray) -> np.ndarray:
    """(B, 3, 3) rotations of RGB about the gray axis (1, 1, 1) (Rodrigues).

    A linear stand-in for torchvision's HSV hue shift, exact at 0 and +-120 degrees
    (it permutes the primaries) and close in between; DALI's own hue (a rotation in
    YIQ) leaves gamut for large shifts and skews the blue channel.
    """
    t = np.radians(degrees).reshape(-1, 1, 1)
    k = np.full(3, 1.0 / math.sqrt(3.0))
    cross = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.cos(t) * np.eye(3) + np.sin(t) * cross + (1.0 - np.cos(t)) * np.outer(k, k)


def color_matrices(desc: ViewAugmentation, u: np.ndarray, jitter: np.ndarray, gray: np.ndarray) -> np.ndarray:
    """(B, 3, 7) colour transforms [M | T | K] on 0-255 RGB: jitter where ``jitter``, then grayscale where ``gray``.

    A pixel x of an image whose mean colour is mu becomes ``M x + T + K mu`` (`apply_color`).
    ``u``: (B, 8) uniforms: 4 factors, then 4 ranks giving the jitter's random order,
    as torchvision's ``ColorJitter``: brightness ``b x``, contrast ``c x + (1 - c) g`` with g
    the mean grey of the image at that step (unknown before decoding: hence K, as the
    mean of an affine image is the affine map of its mean), saturation
    ``s x + (1 - s) luma(x)``, hue a rotation about the gray axis. Grayscale replaces every
    channel by the luma. One transform, clamped once at the end (torchvision clamps after
    each step).
    """
    n = len(u)
    factors = {}
    for k, name in enumerate(("brightness", "contrast", "saturation")):
        f = getattr(desc, name)
        lo, hi = max(0.0, 1.0 - f), 1.0 + f
        factors[name] = np.where(jitter, lo + (hi - lo) * u[:, k], 1.0).reshape(-1, 1, 1)
    hue = np.where(jitter, 360.0 * desc.hue * (2.0 * u[:, 3] - 1.0), 0.0)
    eye = np.broadcast_to(np.eye(3), (n, 3, 3))
    to_luma = np.broadcast_to(np.outer(np.ones(3), LUMA), (n, 3, 3))
    # Each step maps the image (m x + t + k mu) to (sm (m x + t + k mu) + st + sk (its mean)), where
    # its mean is (m + k) mu + t; sk (contrast only) blends towards the mean grey.
    contrast = factors["contrast"]
    steps = [  # (linear part, offset, mean part) of each jitter step, per sample
        (factors["brightness"] * eye, np.zeros((n, 3)), np.zeros((n, 3, 3))),
        (contrast * eye, np.zeros((n, 3)), (1.0 - contrast) * to_luma),
        (factors["saturation"] * eye + (1.0 - factors["saturation"]) * to_luma, np.zeros((n, 3)), np.zeros((n, 3, 3))),
        (_hue_rotations(hue), np.zeros((n, 3)), np.zeros((n, 3, 3))),
    ]
    order = np.argsort(u[:, 4:8], axis=1)  # a uniformly random permutation per sample
    m, t, k = np.array(eye), np.zeros((n, 3)), np.zeros((n, 3, 3))
    for position in range(4):
        for step, (sm, st, sk) in enumerate(steps):
            chosen = (order[:, position] == step).reshape(-1, 1)
            new_t = np.einsum("bij,bj->bi", sm + sk, t) + st
            new_k = sm @ k + sk @ (m + k)
            m = np.where(chosen[:, :, None], sm @ m, m)
            t = np.where(chosen, new_t, t)
            k = np.where(chosen[:, :, None], new_k, k)
    g = gray.reshape(-1, 1)
    m = np.where(g[:, :, None], to_luma @ m, m)
    t = np.where(g, np.einsum("bij,bj->bi", to_luma, t), t)
    k = np.where(g[:, :, None], to_luma @ k, k)
    return np.concatenate([m, t[:, :, None], k], axis=2)


def apply_color(img: np.ndarray, mtk: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 through a (3, 7) `color_matrices` transform, rounded and clamped to uint8
    (what the graph's ``_color_twist`` computes; the numpy reference of the tests)."""
    x = img.reshape(-1, 3).astype(np.float64)
    out = x @ mtk[:, :3].T + mtk[:, 3] + mtk[:, 4:] @ x.mean(axis=0)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(img.shape)


def draw_view_params(desc: ViewAugmentation, u: np.ndarray, heights: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Random choices of one view for a batch: ``(B, NUM_PARAMS)`` float32 laid out as `PARAM_FIELDS`.

    ``u``: (B, UNIFORMS_PER_VIEW) uniforms; ``heights``, ``widths``: (B,) input sizes.
    A choice with probability p is taken when its uniform is < p (never for 0, always for 1).
    """
    if u.shape[1] != UNIFORMS_PER_VIEW or len(u) != len(heights) or len(u) != len(widths):
        raise ValueError(f"need u (B, {UNIFORMS_PER_VIEW}) and (B,) sizes, got {u.shape}, "
                         f"{np.shape(heights)}, {np.shape(widths)}")
    heights, widths = np.asarray(heights), np.asarray(widths)
    out = np.zeros((len(u), NUM_PARAMS), dtype=np.float32)
    c = 2 * _CROP_ATTEMPTS + 2
    top, left, h, w = random_resized_crop_boxes(u[:, :c], heights, widths, desc.crop_scale,
                                                desc.crop_ratio).T
    out[:, P["crop_top"]], out[:, P["crop_left"]] = top, left
    out[:, P["crop_bottom"]], out[:, P["crop_right"]] = top + h, left + w
    rest = u[:, c:]
    out[:, P["flip"]] = rest[:, 0] < desc.flip_p
    jitter = (rest[:, 1] < desc.jitter_p) & any((desc.brightness, desc.contrast, desc.saturation, desc.hue))
    gray = rest[:, 2] < desc.grayscale_p
    out[:, P["twist"]] = jitter | gray
    out[:, P["color_00"]:P["color_26"] + 1] = color_matrices(desc, rest[:, 3:11], jitter, gray).reshape(-1, 21)
    out[:, P["blur"]] = rest[:, 11] < desc.blur_p
    sigma = desc.blur_sigma[0] + (desc.blur_sigma[1] - desc.blur_sigma[0]) * rest[:, 12]
    out[:, P["blur_sigma"]] = sigma
    # The kernel is cut at 3 sigma (dropping 0.3 % of its mass), at most the description's size:
    # the blur costs in proportion to the window, and sigma <= 2 needs at most 13 taps.
    out[:, P["blur_window"]] = np.minimum(2 * np.ceil(3.0 * sigma) + 1, desc.blur_kernel_size)
    out[:, P["solarize"]] = rest[:, 13] < desc.solarize_p
    return out


def blur_kernels(params: np.ndarray) -> List[np.ndarray]:
    """Per sample, the normalised 1-D gaussian of its drawn sigma and window (``[1.0]`` where it is not blurred).

    As torchvision's ``gaussian_blur`` builds it: taps at integer offsets from the centre,
    ``exp(-x^2 / (2 sigma^2))``, divided by their sum.
    """
    out = []
    for blur, sigma, window in params[:, [P["blur"], P["blur_sigma"], P["blur_window"]]]:
        if blur < 0.5:
            out.append(np.ones(1, dtype=np.float32))
            continue
        x = np.arange(int(window), dtype=np.float64) - (int(window) - 1) / 2
        k = np.exp(-0.5 * (x / float(sigma)) ** 2)
        out.append((k / k.sum()).astype(np.float32))
    return out


def view_feeds(desc: ViewAugmentation, params: np.ndarray, view: int, device: str) -> Dict[str, list]:
    """What the loader feeds for view 1 or 2 of a batch: its parameters and, where the graph uses one, its kernels."""
    params_name, kernel_name = (PARAMS1, KERNEL1) if view == 1 else (PARAMS2, KERNEL2)
    feeds = {params_name: list(params)}
    if uses_kernel(desc, device):
        feeds[kernel_name] = blur_kernels(params)
    return feeds


# ---------------------------------------------------------------------------------
# One builder per operator: (images HWC uint8, params, description) -> images.
# ---------------------------------------------------------------------------------
_INTERP = {"bicubic": types.INTERP_CUBIC, "bilinear": types.INTERP_LINEAR, "nearest": types.INTERP_NN}


def _with_probability(p: float, flag, apply: Callable, images):
    """``apply(images)`` where the per-sample ``flag`` is set; no branch for p in {0, 1}."""
    if p <= 0.0:
        return images
    if p >= 1.0:
        return apply(images)
    if flag > 0.5:  # a DALI conditional: only the selected samples run ``apply``
        images = apply(images)
    return images


def _crop(images, v: "ViewInputs", d: ViewAugmentation):
    # Resizing the crop box directly: the crop is never materialised.
    prm = v.params
    return fn.resize(images, size=[d.size, d.size], roi_start=prm[P["crop_top"]:P["crop_left"] + 1],
                     roi_end=prm[P["crop_bottom"]:P["crop_right"] + 1], roi_relative=False,
                     interp_type=_INTERP[d.interpolation], antialias=d.interpolation != "nearest")


def _color_twist(images, v: "ViewInputs", d: ViewAugmentation):
    # Colour jitter (prob. jitter_p) then grayscale (prob. grayscale_p): one colour transform
    # M x + T + K mean(x) per sample, drawn in Python (`color_matrices`), rounded and clamped to uint8.
    jitters = d.jitter_p > 0 and any((d.brightness, d.contrast, d.saturation, d.hue))
    p = 1.0 - (1.0 - (d.jitter_p if jitters else 0.0)) * (1.0 - d.grayscale_p)
    mtk = fn.reshape(v.params[P["color_00"]:P["color_26"] + 1], shape=[3, 7])
    matrix, mean_part = mtk[:, 0:4], mtk[:, 4:7]

    def twist(x):
        mean = fn.reductions.mean(x, axes=[0, 1], dtype=types.FLOAT)  # (3,) mean colour of the HWC view
        k = mean_part.gpu() if v.on_gpu else mean_part
        offset = fn.reductions.sum(k * fn.reshape(mean, shape=[1, 3]), axes=[1])  # K mean, (3,)
        if not v.on_gpu:
            # CPU: K mean folded into the translation, so one pass writes uint8 (coord_transform
            # rounds to nearest and saturates, as the float path's clamp and cast do: test_dali).
            translation = fn.reshape(matrix[:, 3] + offset, shape=[3, 1])
            return fn.coord_transform(x, MT=fn.cat(matrix[:, 0:3], translation, axis=1), dtype=types.UINT8)
        y = fn.coord_transform(x, MT=matrix, dtype=types.FLOAT) + offset
        return fn.cast(dali_math.clamp(y, 0.0, 255.0), dtype=types.UINT8)  # rounds to nearest

    return _with_probability(p, v.params[P["twist"]], twist, images)


def _blur(images, v: "ViewInputs", d: ViewAugmentation):
    if v.kernel is None:  # GPU: DALI's gaussian_blur is fast there; same kernel (window and sigma as drawn)
        return _with_probability(d.blur_p, v.params[P["blur"]], lambda x: fn.gaussian_blur(
            x, window_size=fn.cast(v.params[P["blur_window"]], dtype=types.INT32), sigma=v.params[P["blur_sigma"]]),
            images)
    # CPU: two 1-D passes of ``fn.filter`` with the kernel drawn in Python (`blur_kernels`), reflect
    # padding as torchvision; 4-6x cheaper than the CPU gaussian_blur for the same kernel.
    rows, cols = fn.reshape(v.kernel, shape=[1, -1]), fn.reshape(v.kernel, shape=[-1, 1])
    return _with_probability(d.blur_p, v.params[P["blur"]], lambda x: fn.filter(
        fn.filter(x, rows, border="reflect_101"), cols, border="reflect_101"), images)


def _solarize(images, v: "ViewInputs", d: ViewAugmentation):
    table = [x if x < d.solarize_threshold else 255 - x for x in range(256)]
    return _with_probability(d.solarize_p, v.params[P["solarize"]], lambda x: fn.lookup_table(
        x, keys=list(range(256)), values=table, dtype=types.UINT8), images)


def _flip_normalize(images, v: "ViewInputs", d: ViewAugmentation):
    mirror = fn.cast(v.params[P["flip"]], dtype=types.INT32) if d.flip_p > 0 else 0
    return fn.crop_mirror_normalize(images, mirror=mirror, mean=[255.0 * m for m in d.mean],
                                    std=[255.0 * s for s in d.std], dtype=types.FLOAT, output_layout="CHW")


VIEW_OPS: Tuple[Callable, ...] = (_crop, _color_twist, _blur, _solarize, _flip_normalize)
"""Operator builders applied in this order (see the module docstring)."""


class ViewInputs(NamedTuple):
    """The per-sample inputs of one view inside the graph."""

    params: Any            # (NUM_PARAMS,) float32, `draw_view_params`
    kernel: Optional[Any]  # (w,) float32 blur kernel (`blur_kernels`); None where the view does not use it
    on_gpu: bool = False   # the images are on the GPU (the params stay on the CPU)


def view_graph(images, inputs: ViewInputs, desc: ViewAugmentation):
    """One view: decoded images (HWC uint8) + its inputs -> float32 (3, size, size)."""
    for op in VIEW_OPS:
        images = op(images, inputs, desc)
    return images


# ---------------------------------------------------------------------------------
# Pipelines.
# ---------------------------------------------------------------------------------
ENCODED, IMAGES, PARAMS1, PARAMS2, KERNEL1, KERNEL2 = "encoded", "images", "params1", "params2", "kernel1", "kernel2"
"""Names of the external sources the loader feeds (`view_feeds` says which a view needs)."""


def uses_kernel(desc: ViewAugmentation, device: str) -> bool:
    """Whether the view's graph takes a blur kernel input (CPU pipelines that blur)."""
    return device == "cpu" and desc.blur_p > 0


def _decoded_input(encoded: bool, device: str):
    if encoded:
        data = fn.external_source(name=ENCODED, dtype=types.UINT8, ndim=1)
        # adjust_orientation=False: PIL (the torchvision path) ignores EXIF orientation too,
        # and the crop boxes are drawn in the stored (un-rotated) frame.
        return fn.decoders.image(data, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB,
                                 adjust_orientation=False)
    images = fn.external_source(name=IMAGES, dtype=types.UINT8, ndim=3, layout="HWC")
    return images.gpu() if device == "gpu" else images


def _view_inputs(desc: ViewAugmentation, device: str, params_name: str, kernel_name: str) -> ViewInputs:
    params = fn.external_source(name=params_name, dtype=types.FLOAT, ndim=1)
    kernel = fn.external_source(name=kernel_name, dtype=types.FLOAT, ndim=1) if uses_kernel(desc, device) else None
    return ViewInputs(params, kernel, on_gpu=device == "gpu")


def _two_view_graph(desc1: ViewAugmentation, desc2: ViewAugmentation, encoded: bool, device: str):
    images = _decoded_input(encoded, device)  # decoded once, cropped twice
    return (view_graph(images, _view_inputs(desc1, device, PARAMS1, KERNEL1), desc1),
            view_graph(images, _view_inputs(desc2, device, PARAMS2, KERNEL2), desc2))


def _pipeline_kwargs(batch_size: int, num_threads: int, device: str, device_id: Optional[int], seed: int) -> dict:
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    # prefetch_queue_depth=1: the loader keeps its own queue of scheduled batches, fed one by one.
    # exec_dynamic: outputs stay valid while referenced, so the loader hands them to torch without a copy.
    return dict(batch_size=batch_size, num_threads=num_threads, device_id=device_id if device == "gpu" else None,
                seed=seed & 0x7FFFFFFF, prefetch_queue_depth=1, exec_dynamic=True)


def build_two_view_pipeline(desc1: ViewAugmentation, desc2: ViewAugmentation, *, encoded: bool, device: str,
                            batch_size: int, num_threads: int, device_id: Optional[int] = None,
                            seed: int = 0) -> Pipeline:
    """The built two-view pipeline; outputs ``(view1, view2)``, each (B, 3, size, size) float32.

    Inputs fed per batch: ``encoded`` (1-D uint8 file bytes) or ``images`` (HWC uint8),
    and ``params1`` / ``params2`` ((NUM_PARAMS,) float32 from `draw_view_params`).
    """
    if desc1.size != desc2.size:
        raise ValueError(f"both views need the same size to be batched, got {desc1.size} and {desc2.size}")
    factory = pipeline_def(_two_view_graph, enable_conditionals=True)
    pipe = factory(desc1, desc2, encoded, device, **_pipeline_kwargs(batch_size, num_threads, device, device_id, seed))
    pipe.build()
    return pipe


def build_decode_probe() -> Pipeline:
    """A one-sample CPU decoder, to find which file of a failed batch DALI cannot decode."""
    factory = pipeline_def(lambda: fn.decoders.image(fn.external_source(name=ENCODED, dtype=types.UINT8, ndim=1),
                                                     device="cpu", output_type=types.RGB, adjust_orientation=False))
    pipe = factory(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1, exec_async=False,
                   exec_pipelined=False)
    pipe.build()
    return pipe
