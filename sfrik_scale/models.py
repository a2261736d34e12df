"""Backbone + projector: the network whose outputs the SSL losses consume.

A model is ``SSLModel(backbone, feature_dim, projector_spec)``: an image backbone with its
classification head removed, followed by the VICReg/SFRIK-style MLP projector
(Linear-BatchNorm-ReLU blocks, last Linear without bias) described by a spec string such as
``"8192-8192-32768"``. ``forward(x)`` returns the raw projector output z of shape (batch, q);
losses normalise it themselves.

Backbones come by name from :data:`BACKBONES` (small built-ins: ``"tiny_cnn"`` for demos and tests,
``"small_resnet"`` for images of 64 px or less, see :class:`SmallResNet`) or from
torchvision (any classification model: ``resnet18``, ``resnet50``, ``mobilenet_v3_small``,
``vit_b_16``, ...), always with ``weights=None``.

Parameter names: a torchvision backbone keeps exactly torchvision's parameter and buffer
names; only the head layer is swapped for ``nn.Identity`` (e.g. ``fc`` for ResNets,
``classifier.3`` for MobileNetV3). Exported backbone weights therefore load into the plain
torchvision classifier with ``load_state_dict(strict=False)``, reporting only the head as
missing; see :func:`backbone_state_dict_for_torchvision`.

Distributed: this module makes no collective calls and imports neither deepspeed nor
torch.distributed (docs/architecture.md: only comm talks to the process group). Parallelism is applied from outside: the trainer calls
:func:`convert_sync_batchnorm` and then ``deepspeed.initialize``.

Example:
    >>> model = build_model("tiny_cnn", "64-64-128")
    >>> z = model(torch.randn(4, 3, 32, 32))      # (4, 128)
"""
from __future__ import annotations

import difflib
import re
from collections import OrderedDict
from typing import Any, Callable, Mapping, Optional

import torch
import torchvision
from torch import nn

from sfrik_scale.registry import Registry

__all__ = [
    "BACKBONES",
    "register_backbone",
    "build_backbone",
    "torchvision_classifier",
    "remove_classifier_head",
    "TinyCNN",
    "SmallResNet",
    "parse_projector_spec",
    "Projector",
    "SSLModel",
    "build_model",
    "convert_sync_batchnorm",
    "backbone_state_dict_for_torchvision",
]

BackboneFactory = Callable[[], tuple[nn.Module, int]]

#: Built-in backbones by name; each factory returns ``(backbone, feature_dim)``.
#: torchvision classifiers are not listed here but are reachable through :func:`build_backbone`.
BACKBONES: Registry[BackboneFactory] = Registry("backbone")

# Attributes under which torchvision classifiers keep their head, in lookup order.
_HEAD_ATTRIBUTES = ("fc", "classifier", "heads", "head")

# Extra constructor arguments for torchvision models whose defaults do not suit SSL:
# auxiliary classifiers make training-mode forward return a namedtuple, and an unset
# init_weights only emits a FutureWarning. The same arguments build the reference model
# in torchvision_classifier(), so exported weights load with matching keys.
_TORCHVISION_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}

# Input side used only when a feature dimension must be measured by a dummy forward;
# 224 is accepted by every torchvision classifier (ViTs require exactly it).
_PROBE_IMAGE_SIZE = 224


def _torchvision_classifier_names() -> list[str]:
    # module=torchvision.models lists classification models only (no detection/segmentation).
    return sorted(torchvision.models.list_models(module=torchvision.models))


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator registering a backbone factory ``() -> (backbone, feature_dim)`` under ``name``.

    Refuses duplicates (via :class:`~sfrik_scale.registry.Registry`) and names of torchvision
    classifiers, which would otherwise be silently shadowed in :func:`build_backbone`.
    """
    if name in _torchvision_classifier_names():
        raise ValueError(
            f"backbone name {name!r} is a torchvision classifier; "
            "register the custom backbone under another name"
        )
    return BACKBONES.register(name)


def build_backbone(name: str) -> tuple[nn.Module, int]:
    """Backbone ``name`` without its classification head, and its feature dimension.

    Registered backbones (:data:`BACKBONES`) are looked up first, then torchvision
    classifiers, built with ``weights=None`` (nothing is ever downloaded).

    Returns:
        ``(backbone, feature_dim)``: ``backbone(x)`` maps images (batch, 3, H, W) to
        features (batch, feature_dim). A torchvision backbone carries
        ``backbone.torchvision_name`` and ``backbone.removed_head`` (dotted path of the
        layer replaced by ``nn.Identity``), used when exporting weights.

    Raises:
        ValueError: unknown name; the message lists valid names and close matches.
    """
    if name in BACKBONES:
        return BACKBONES.get(name)()
    tv_names = _torchvision_classifier_names()
    if name not in tv_names:
        close = difflib.get_close_matches(name, list(BACKBONES) + tv_names, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown backbone {name!r}.{hint} Registered: {', '.join(BACKBONES.names()) or '(none)'}; "
            f"torchvision classifiers ({len(tv_names)}) include resnet18, resnet34, resnet50, "
            "mobilenet_v3_small, vit_b_16 (see torchvision.models.list_models(module=torchvision.models))."
        )
    model = torchvision_classifier(name)
    head_path, feature_dim = remove_classifier_head(model)
    # Plain attributes (not parameters): they survive deepcopy and do not enter the state dict.
    model.torchvision_name = name
    model.removed_head = head_path
    return model, feature_dim


def torchvision_classifier(name: str) -> nn.Module:
    """The full torchvision classifier ``name`` (``weights=None``), built exactly as
    :func:`build_backbone` builds it before removing the head.

    This is the model exported backbone weights are meant to load into.
    """
    return torchvision.models.get_model(name, weights=None, **_TORCHVISION_KWARGS.get(name, {}))


def remove_classifier_head(model: nn.Module, probe_image_size: int = _PROBE_IMAGE_SIZE) -> tuple[str, int]:
    """Replace ``model``'s classification layer by ``nn.Identity`` in place.

    The head is the first of the attributes ``fc``, ``classifier``, ``heads``, ``head``.
    If it is a Linear (or 1x1 Conv2d, as in SqueezeNet) it is replaced whole; if it is a
    container, only its last Linear/Conv2d is, so the layers before it (VGG's hidden MLP,
    ConvNeXt's LayerNorm, MobileNetV3's 1024-wide layer) stay in the backbone. Replacing a
    single layer keeps every other parameter name identical to torchvision's.

    The feature dimension is the replaced layer's input width; when layers with parameters
    follow it (so that width may not be the output width), it is measured by one forward of a
    (1, 3, probe_image_size, probe_image_size) zero image in eval mode.

    Returns:
        ``(head_path, feature_dim)`` with ``head_path`` the dotted name of the replaced layer.

    Raises:
        ValueError: no recognisable head.
    """
    head_attr = next((a for a in _HEAD_ATTRIBUTES if isinstance(getattr(model, a, None), nn.Module)), None)
    if head_attr is None:
        raise ValueError(
            f"{type(model).__name__} has none of the head attributes {_HEAD_ATTRIBUTES}; "
            "cannot remove its classification head"
        )
    head = getattr(model, head_attr)
    named = list(head.named_modules())  # registration order; ("", head) comes first
    candidates = [i for i, (_, m) in enumerate(named) if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not candidates:
        raise ValueError(f"{type(model).__name__}.{head_attr} contains no Linear or Conv2d layer to remove")
    index = candidates[-1]
    sub_path, layer = named[index]
    in_width = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels

    if sub_path:
        parent_path, _, leaf = sub_path.rpartition(".")
        parent = head.get_submodule(parent_path) if parent_path else head
        setattr(parent, leaf, nn.Identity())
        head_path = f"{head_attr}.{sub_path}"
    else:
        setattr(model, head_attr, nn.Identity())
        head_path = head_attr

    # Modules registered after the removed layer (its own children excluded) may change the width.
    later = [m for p, m in named[index + 1 :] if not (sub_path and p.startswith(sub_path + "."))]
    if any(True for m in later for _ in m.parameters(recurse=False)):
        return head_path, _measure_feature_dim(model, probe_image_size)
    return head_path, in_width


def _measure_feature_dim(backbone: nn.Module, image_size: int) -> int:
    """Width of ``backbone``'s output on one zero image (eval mode, no grad)."""
    was_training = backbone.training
    device = next(backbone.parameters()).device
    backbone.eval()  # eval: BatchNorm with batch 1 would fail in training mode
    try:
        with torch.no_grad():
            out = backbone(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        backbone.train(was_training)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{type(backbone).__name__} without its head returns {shape}, expected (batch, features)")
    return int(out.shape[1])


class TinyCNN(nn.Module):
    """A few stride-2 conv-BN-ReLU blocks and a global average pool, for CPU demos and tests.

    Shapes: (batch, 3, H, W) -> (batch, widths[-1]); any H, W >= 1.
    """

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for width in widths:
            # bias=False: the following BatchNorm's shift makes a conv bias redundant.
            layers += [nn.Conv2d(in_ch, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            in_ch = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


@register_backbone("tiny_cnn")
def _tiny_cnn() -> tuple[nn.Module, int]:
    net = TinyCNN()
    return net, net.feature_dim


class _BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN, identity (or 1x1 conv-BN) shortcut, ReLU after the sum."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet for small images (<= 64 px), sized to pretrain on a few CPU cores.

    Like the CIFAR ResNets of solo-learn and the SSL literature, the stem is a single 3x3
    convolution with no max-pool (ImageNet's 7x7 stride-2 stem + max-pool would shrink a
    32 px image to 8 px before the first block); unlike them it takes ``stem_stride`` 2 by
    default, so the first stage runs at half resolution: at 32 px the same network with a
    stride-1 stem took 6.5x longer per training step on 2 CPU cores (1.9 s against 0.29 s,
    batch 256, two views), too slow for a CPU budget. Then one stage
    of ``blocks[i]`` basic blocks per width, each stage after the first halving the
    resolution, and a global average pool.

    Shapes: (batch, 3, H, W) -> (batch, widths[-1]); at 32 px the stages run at 16, 8 and
    4 px with the defaults.
    """

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128), blocks: tuple[int, ...] = (1, 1, 1),
                 stem_stride: int = 2) -> None:
        super().__init__()
        if len(widths) != len(blocks) or not widths or min(blocks) < 1:
            raise ValueError(f"widths {widths} and blocks {blocks} must be non-empty, of equal length, blocks >= 1")
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, stride=stem_stride, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        stages: list[nn.Module] = []
        in_ch = widths[0]
        for i, (width, count) in enumerate(zip(widths, blocks)):
            for j in range(count):
                stages.append(_BasicBlock(in_ch, width, stride=2 if i > 0 and j == 0 else 1))
                in_ch = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.stages(self.stem(x))), 1)


@register_backbone("small_resnet")
def _small_resnet() -> tuple[nn.Module, int]:
    net = SmallResNet()
    return net, net.feature_dim


_WIDTH = re.compile(r"\d+")


def parse_projector_spec(spec: str) -> list[int]:
    """Layer widths of a projector spec: ``"8192-8192-32768"`` -> ``[8192, 8192, 32768]``.

    Raises:
        ValueError naming ``spec``: not a string, empty, a part that is not a plain positive
        integer (``"8192-x"``, ``"8192--1"``, ``"1.5"``), a zero width, or a last width q < 2
        (embeddings live on the sphere S^{q-1}; the kernels need q >= 2).
    """
    if not isinstance(spec, str):
        raise ValueError(f"projector spec must be a string like '8192-8192-32768', got {spec!r}")
    if not spec.strip():
        raise ValueError(f"projector spec {spec!r} is empty; expected widths like '8192-8192-32768'")
    parts = [p.strip() for p in spec.split("-")]
    bad = [p for p in parts if not _WIDTH.fullmatch(p)]
    if bad:
        raise ValueError(
            f"projector spec {spec!r}: {bad[0]!r} is not a positive integer width; "
            "expected widths separated by '-', like '8192-8192-32768'"
        )
    widths = [int(p) for p in parts]
    if any(w <= 0 for w in widths):
        raise ValueError(f"projector spec {spec!r}: widths must be positive, got {widths}")
    if widths[-1] < 2:
        raise ValueError(f"projector spec {spec!r}: the output width q = {widths[-1]} must be at least 2")
    return widths


class Projector(nn.Sequential):
    """MLP projector from a spec string (VICReg/SFRIK layout).

    ``Projector(2048, "8192-8192-32768")`` is
    Linear(2048, 8192)-BN-ReLU, Linear(8192, 8192)-BN-ReLU, Linear(8192, 32768, bias=False).
    The last Linear has no bias: the loss only sees directions (z is normalised), and a bias
    would merely shift the embedding mean the regulariser pushes to zero.

    Shapes: (batch, in_dim) -> (batch, out_dim), ``out_dim`` = q = last width.
    BatchNorm1d needs batch >= 2 in training mode.
    """

    def __init__(self, in_dim: int, spec: str) -> None:
        widths = parse_projector_spec(spec)
        if isinstance(in_dim, bool) or not isinstance(in_dim, int) or in_dim <= 0:
            raise ValueError(f"projector in_dim must be a positive int, got {in_dim!r}")
        layers: list[nn.Module] = []
        dims = [in_dim] + widths
        for d_in, d_out in zip(dims[:-2], dims[1:-1]):
            layers += [nn.Linear(d_in, d_out), nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(dims[-2], dims[-1], bias=False))
        super().__init__(*layers)
        self.spec = spec
        self.in_dim = in_dim
        self.widths = widths
        self.out_dim = widths[-1]


class SSLModel(nn.Module):
    """Backbone followed by a projector; ``forward`` returns the raw embeddings z.

    Args:
        backbone: maps images (batch, C, H, W) to features (batch, feature_dim).
        feature_dim: the backbone's output width (the projector's input width).
        projector_spec: widths like ``"8192-8192-32768"``; q = last width.

    Attributes: ``backbone``, ``projector``, ``feature_dim``, ``q``.

    Distributed: none here; the model is replicated/partitioned by DeepSpeed from outside
    and BatchNorm statistics are per rank unless :func:`convert_sync_batchnorm` was applied.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, projector_spec: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = Projector(feature_dim, projector_spec)
        self.feature_dim = feature_dim
        self.q = self.projector.out_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features, (batch, C, H, W) -> (batch, feature_dim), used by evaluation."""
        h = self.backbone(x)
        # Shape-only check (no host sync): a wrong feature_dim otherwise fails deep in the projector.
        if h.ndim != 2 or h.shape[1] != self.feature_dim:
            raise ValueError(
                f"backbone returned features of shape {tuple(h.shape)}, expected (batch, {self.feature_dim})"
            )
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings z, (batch, C, H, W) -> (batch, q), not normalised."""
        return self.projector(self.features(x))


def build_model(backbone: str, projector: str) -> SSLModel:
    """``SSLModel`` from a backbone name (see :func:`build_backbone`) and a projector spec.

    Example:
        >>> build_model("resnet50", "8192-8192-32768").q
        32768
    """
    net, feature_dim = build_backbone(backbone)
    return SSLModel(net, feature_dim, projector)


def convert_sync_batchnorm(model: nn.Module, process_group: Optional[Any] = None) -> nn.Module:
    """Replace every BatchNorm*D in ``model`` (backbone and projector) by ``nn.SyncBatchNorm``.

    SSL methods need batch statistics over the global batch, not per-rank slices. Call this
    BEFORE ``deepspeed.initialize``: the engine (ZeRO partitioning, hooks, the optimizer's
    parameter groups) captures the modules and parameters it is given, so a later swap would
    leave it tracking modules that are no longer in the model.

    Parameter and buffer names are unchanged, so checkpoints and exported weights stay
    compatible. Without an initialised process group SyncBatchNorm computes ordinary
    per-process BatchNorm statistics, so single-process CPU runs are unaffected.

    Args:
        model: any module; converted modules are new objects sharing the original parameters.
        process_group: the group to synchronise over (default: the whole world). Typed
            ``Any`` so this module need not import torch.distributed.

    Returns:
        The converted model (``model`` itself unless it is a BatchNorm layer).
    """
    return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)


def backbone_state_dict_for_torchvision(
    model: nn.Module | Mapping[str, torch.Tensor],
) -> "OrderedDict[str, torch.Tensor]":
    """Backbone weights keyed as torchvision names them, detached on CPU, for export.

    Accepts an :class:`SSLModel` (possibly wrapped, e.g. a DeepSpeed engine or DDP, through
    ``.module``), a bare backbone module, or an SSLModel state dict (keys ``backbone.*``,
    optionally prefixed ``module.``), e.g. a consolidated ZeRO-3 state dict (under ZeRO-3 the
    live module's parameters are partitioned; consolidate first).

    For a torchvision backbone the result loads into :func:`torchvision_classifier` (name)
    with ``load_state_dict(sd, strict=False)``: missing keys are exactly the removed head's
    (``backbone.removed_head + ".weight"`` / ``".bias"``), unexpected keys none. The state
    dict's ``_metadata`` (per-module versions) is kept, re-keyed like the tensors: some
    torchvision models (MNASNet) refuse to load without it, so a plain ``dict`` input lacking
    ``_metadata`` may not load into those.
    """
    if isinstance(model, Mapping):
        state, metadata = OrderedDict(model), getattr(model, "_metadata", None)
        if state and all(k.startswith("module.") for k in state):  # saved from a wrapper
            state, metadata = _strip_prefix(state, metadata, "module.")
        if any(k.startswith("backbone.") for k in state):  # an SSLModel state dict
            state, metadata = _strip_prefix(state, metadata, "backbone.")
    else:
        module = model
        while not isinstance(module, SSLModel) and isinstance(getattr(module, "module", None), nn.Module):
            module = module.module  # unwrap DeepSpeedEngine / DistributedDataParallel
        state = (module.backbone if isinstance(module, SSLModel) else module).state_dict()
        metadata = getattr(state, "_metadata", None)
    out = OrderedDict((k, v.detach().cpu()) for k, v in state.items())
    if metadata is not None:
        out._metadata = metadata  # type: ignore[attr-defined]
    return out


def _strip_prefix(
    state: "OrderedDict[str, torch.Tensor]", metadata: Optional[dict], prefix: str
) -> "tuple[OrderedDict[str, torch.Tensor], Optional[dict]]":
    """Keep the entries under ``prefix`` (e.g. ``"backbone."``) with the prefix removed."""
    state = OrderedDict((k[len(prefix) :], v) for k, v in state.items() if k.startswith(prefix))
    if metadata is not None:
        # Metadata keys are module paths without the trailing dot: "backbone", "backbone.layer1".
        root = prefix[:-1]
        metadata = OrderedDict(
            ("" if k == root else k[len(prefix) :], v)
            for k, v in metadata.items()
            if k == root or k.startswith(prefix)
        )
    return state, metadata


# ----------------------------------------------------------------------------------------
# Normalisation in fp32 under bf16/fp16 training.
# ----------------------------------------------------------------------------------------
_LOW_PRECISION = (torch.bfloat16, torch.float16)


class _BatchNormFP32SavedLow(torch.autograd.Function):
    """Training-mode batch norm computed in fp32 that keeps its input for backward in the
    input's own (low) precision: an fp32 copy of every BatchNorm input would otherwise stay
    alive until backward (1.4 GB per GPU for ResNet-50 at 32 images in bf16)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):  # type: ignore[override]
        w = None if weight is None else weight.float()
        b = None if bias is None else bias.float()
        out, save_mean, save_invstd = torch.native_batch_norm(x.float(), w, b, running_mean, running_var,
                                                              True, momentum, eps)
        ctx.save_for_backward(x, weight, save_mean, save_invstd)
        ctx.eps, ctx.bias_dtype = eps, None if bias is None else bias.dtype
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight, save_mean, save_invstd = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
                ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            grad_out.float(), x.float(), None if weight is None else weight.float(), None, None,
            save_mean, save_invstd, True, ctx.eps, mask)
        gx = None if gx is None else gx.to(x.dtype)
        gw = None if gw is None or weight is None else gw.to(weight.dtype)
        gb = None if gb is None or ctx.bias_dtype is None else gb.to(ctx.bias_dtype)
        return gx, gw, gb, None, None, None, None


class _FP32BatchNormMixin:
    """BatchNorm whose statistics and affine transform run in fp32 for bf16/fp16 inputs.

    DeepSpeed's bf16/fp16 modes cast every parameter, BatchNorm's weight and bias included,
    to low precision, while its running statistics stay fp32. Low-precision batch statistics
    are fragile (variances of near-constant channels, e.g. 1x1 feature maps, come out 0 or
    NaN in bf16) and CPU batch_norm refuses mixed dtypes, so, as autocast does, the layer
    computes in fp32 and returns the input's dtype. Gradients reach the low-precision
    parameters through the casts. fp32 inputs take the ordinary path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # mirrors nn.modules.batchnorm._BatchNorm
        if x.dtype not in _LOW_PRECISION:
            return super().forward(x)
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        stats_fp32 = all(b is None or b.dtype == torch.float32 for b in (self.running_mean, self.running_var))
        if use_batch_stats and stats_fp32 and torch.is_grad_enabled():
            return _BatchNormFP32SavedLow.apply(
                x, self.weight, self.bias, self.running_mean if track else None,
                self.running_var if track else None, factor, self.eps)
        stats = [None if b is None or not track else (b if b.dtype == torch.float32 else b.float())
                 for b in (self.running_mean, self.running_var)]
        out = nn.functional.batch_norm(
            x.float(), stats[0], stats[1],
            None if self.weight is None else self.weight.float(),
            None if self.bias is None else self.bias.float(),
            use_batch_stats, factor, self.eps)
        for buf, new in zip((self.running_mean, self.running_var), stats):
            if buf is not None and new is not None and new is not buf:
                buf.copy_(new)  # statistics kept in low precision by someone else: write back
        return out.to(x.dtype)


_FP32_CLASSES: dict[type, type] = {}


def batchnorm_in_fp32(model: nn.Module) -> nn.Module:
    """Make every BatchNorm{1,2,3}d of ``model`` compute in fp32 under bf16/fp16 (in place).

    Call before ``deepspeed.initialize`` for bf16/fp16 runs. The layers keep their class
    hierarchy, parameters, buffers and state-dict keys; only ``forward`` changes, and only
    for low-precision inputs. SyncBatchNorm (CUDA) is left alone: its CUDA kernels accept
    low-precision inputs with fp32 statistics.
    """
    for module in model.modules():
        cls = type(module)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, nn.SyncBatchNorm) \
                and not isinstance(module, _FP32BatchNormMixin):
            if cls not in _FP32_CLASSES:
                _FP32_CLASSES[cls] = type(f"FP32{cls.__name__}", (_FP32BatchNormMixin, cls), {})
            module.__class__ = _FP32_CLASSES[cls]
    return model
