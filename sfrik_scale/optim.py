"""Optimisers (LARS, LAMB, AdamW) and the learning-rate schedule, correct under ZeRO.

LARS (You, Gitman & Ginsburg 2017, "Large Batch Training of Convolutional Networks") is
the optimiser of the SFRIK paper, in the exact form of VICReg's official code (Bardes,
Ponce & LeCun 2022), which SFRIK builds on; LAMB (You et al. 2020, "Large Batch
Optimization for Deep Learning: Training BERT in 76 minutes", Algorithm 2) and AdamW are
selectable by name through `OPTIMIZERS` / `build_optimizer`.

Why ZeRO needs care (DeepSpeed issue #490): LARS and LAMB rescale each layer's update by a
trust ratio ||w|| / ||u|| computed over the whole layer. Under ZeRO stage 1/2 (and the
bf16 optimiser wrapper) DeepSpeed flattens every parameter group into one vector, cuts it
into one contiguous partition per data-parallel rank and hands the wrapped optimiser
*only that flat fp32 partition* as its single parameter; under stage 3 it does the same per
"sub-group", each rank holding a slice of every parameter. A plain LARS then takes norms
of a partition that starts and ends in the middle of layers: trust ratios per shard, not
per layer, and results that change with the number of ranks.

The fix: `sfrik_scale.zero_layout.attach_zero_layout(optimizer, engine)`, called right after
``deepspeed.initialize``, records for every flat tensor the optimiser will step a
`LayerSegments` map: which slice of which original parameter ("layer") lies where in this
rank's partition. Each step takes squared norms per segment, all-reduces them (SUM, 2 x
layers floats per flat tensor) over the partition's data-parallel group so that every rank
holds whole-layer norms, and applies each layer's trust ratio to its own segment. Without
ZeRO (stage 0, or the bf16 stage-0 wrapper's per-parameter fp32 copies) each parameter is
its own layer and no collective runs. Flattened tensors without a layout raise instead of
silently getting per-shard ratios.

Example (the ds_config needs "zero_allow_untested_optimizer": true for LARS/LAMB under
ZeRO, and "zero_force_ds_cpu_optimizer": false with optimizer offload):
    >>> opt = build_optimizer("lars", model, lr=scaled_lr(0.4, 2048))
    >>> sched = build_scheduler(opt, base_lr=0.4, global_batch=2048, steps_per_epoch=625,
    ...                         epochs=200, warmup_epochs=10, final_ratio=0.001)
    >>> engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
    ...                                        config=ds_config)
    >>> attach_zero_layout(opt, engine)
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from sfrik_scale import comm
from sfrik_scale.options import Option, in_unit_interval
from sfrik_scale.registry import Registry

__all__ = ["OPTIMIZERS", "LARS", "LAMB", "LayerwiseTrustOptimizer", "LayerSegments", "param_groups",
           "build_optimizer", "optimizer_options", "DEFAULT_OPTIMIZER", "scaled_lr", "WarmupCosine", "build_scheduler"]

OPTIMIZERS: Registry = Registry("optimizer")

#: the optimiser of a run that names none: LARS, as in the SFRIK and VICReg papers
DEFAULT_OPTIMIZER = "lars"

ParamsLike = Union[nn.Module, Iterable[torch.nn.Parameter]]


# ----------------------------------------------------------------------------------------
# Where the layers lie inside one (possibly flattened and partitioned) tensor.
# ----------------------------------------------------------------------------------------
@dataclass
class LayerSegments:
    """The pieces of whole layers inside one 1-D tensor the optimiser updates.

    Attributes:
        numel: length of the tensor.
        starts, lengths: offset and length of each piece, increasing and non-overlapping;
            elements outside every piece (alignment padding) get trust ratio 1.
        layers: the layer each piece belongs to, an index in ``range(num_layers)`` that
            means the same layer on every rank; at most one piece per layer.
        num_layers: layers of the whole parameter group (the length of the all-reduced
            norm vectors), including those with no piece on this rank.
        group: process group over which the pieces of a layer are spread (None: world).
        reduce: whether per-layer norms need the all-reduce (True for ZeRO partitions).
        comm_device: device the all-reduce runs on, when it differs from the tensor's
            (optimizer state offloaded to CPU, collectives on NCCL).
    """

    numel: int
    starts: List[int]
    lengths: List[int]
    layers: List[int]
    num_layers: int
    group: Any = None
    reduce: bool = False
    comm_device: Optional[torch.device] = None
    _cover: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not (len(self.starts) == len(self.lengths) == len(self.layers)):
            raise ValueError(f"starts, lengths and layers differ in length: {len(self.starts)}, "
                             f"{len(self.lengths)}, {len(self.layers)}")
        end = 0
        for start, length, layer in zip(self.starts, self.lengths, self.layers):
            if start < end or length <= 0 or start + length > self.numel or not 0 <= layer < self.num_layers:
                raise ValueError(f"segment (start={start}, length={length}, layer={layer}) overlaps, is empty, "
                                 f"exceeds {self.numel} elements or names no layer of {self.num_layers}")
            end = start + length
        if len(set(self.layers)) != len(self.layers):
            raise ValueError("a layer appears in more than one segment")

    @classmethod
    def whole(cls, tensor: torch.Tensor) -> "LayerSegments":
        """The tensor is one complete layer (no ZeRO): one piece, no collective."""
        return cls(numel=tensor.numel(), starts=[0], lengths=[tensor.numel()], layers=[0], num_layers=1)

    def layer_norms(self, *tensors: torch.Tensor) -> torch.Tensor:
        """L2 norm of every whole layer, for each of ``tensors``.

        Each tensor has this layout's ``numel`` elements. Returns (len(tensors), num_layers)
        float32, identical on every rank of ``group``: squared norms of the local pieces
        are all-reduced (SUM) when ``reduce``. Collective when ``reduce``: every rank of
        ``group`` must call it, in the same order.
        """
        if not self.reduce and self.num_layers == 1 and self.lengths == [self.numel]:
            return torch.stack([t.norm().float() for t in tensors]).unsqueeze(1)  # whole tensor: no scatter
        device = tensors[0].device
        sq = torch.zeros(len(tensors), self.num_layers, dtype=torch.float32, device=device)
        if self.starts:
            index = self._device_tensors(device)[2]
            for row, tensor in enumerate(tensors):
                flat = tensor.reshape(-1)
                pieces = [flat.narrow(0, s, n) for s, n in zip(self.starts, self.lengths)]
                # One multi-tensor kernel for all pieces instead of a launch per layer.
                norms = torch.stack(torch._foreach_norm(pieces)).float()
                sq[row].index_copy_(0, index, norms * norms)
        if self.reduce:
            if self.comm_device is not None and self.comm_device != sq.device:
                sq = comm.all_reduce_(sq.to(self.comm_device), self.group).to(device)
            else:
                comm.all_reduce_(sq, self.group)
        return sq.sqrt()

    def expand(self, per_layer: torch.Tensor) -> torch.Tensor:
        """(numel,) tensor: each layer's value from ``per_layer`` (num_layers,) on its piece, 1 elsewhere.

        A single piece covering the tensor gives the 0-d value itself (broadcasts, no allocation).
        """
        if len(self.starts) == 1 and self.lengths[0] == self.numel:
            return per_layer[self.layers[0]]
        lengths, index, _ = self._device_tensors(per_layer.device)
        values = torch.cat([per_layer, per_layer.new_ones(1)])[index]
        # output_size avoids a device-to-host sync inside repeat_interleave.
        return torch.repeat_interleave(values, lengths, output_size=self.numel)

    def _device_tensors(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Lengths and value indices of pieces *and* gaps in order, and the pieces' layers.

        Built once per device, so that steps copy nothing from the host.
        """
        if device not in self._cover:
            lengths: List[int] = []
            index: List[int] = []
            position = 0
            for start, length, layer in zip(self.starts, self.lengths, self.layers):
                if start > position:  # gap: index num_layers selects the trailing 1
                    lengths.append(start - position)
                    index.append(self.num_layers)
                lengths.append(length)
                index.append(layer)
                position = start + length
            if position < self.numel:
                lengths.append(self.numel - position)
                index.append(self.num_layers)
            self._cover[device] = (torch.tensor(lengths, device=device), torch.tensor(index, device=device),
                                   torch.tensor(self.layers, dtype=torch.long, device=device))
        return self._cover[device]


def _evaluate(closure: Optional[Callable[[], torch.Tensor]]) -> Optional[torch.Tensor]:
    """The loss of the optional ``step(closure)`` argument of torch optimisers."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _shape(p: torch.Tensor) -> Tuple[int, ...]:
    """A parameter's logical shape, also once ZeRO-3 has partitioned it (``ds_shape``)."""
    return tuple(getattr(p, "ds_shape", p.shape))


# ----------------------------------------------------------------------------------------
# Layer-wise trust-ratio optimisers.
# ----------------------------------------------------------------------------------------
class LayerwiseTrustOptimizer(torch.optim.Optimizer):
    """Base of LARS and LAMB: an update rescaled per layer by coeff * ||w|| / ||u||.

    Param-group flags: ``weight_decay`` (0 disables it) and ``layer_adaptation`` (False
    skips the trust ratio), set per group by `param_groups` so that biases and
    normalisation parameters get neither, as VICReg's ``exclude_bias_and_norm`` filters.

    Distributed: the trust ratio is the only non-elementwise part. Per-parameter without
    ZeRO (no collective); under ZeRO, per layer through the `LayerSegments` that
    `attach_zero_layout` registers for each flat partition (one all-reduce per flat tensor
    per step over its data-parallel group; every rank must step). Everything else is
    elementwise, hence correct on any partition.
    """

    def __init__(self, params: Any, defaults: Dict[str, Any]) -> None:
        self._segments: Dict[int, Tuple[torch.Tensor, LayerSegments]] = {}
        self._whole_layers: Dict[int, torch.Tensor] = {}  # tensors known to be whole layers, by id
        self._built_shapes: Dict[int, List[Tuple[int, ...]]] = {}  # by id of the group dict
        super().__init__(params, defaults)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)
        # The tensors the optimiser is given are whole layers; a tensor it did not see here
        # (a ZeRO flat partition) needs a layout before it can get a trust ratio.
        group = self.param_groups[-1]
        self._whole_layers.update({id(p): p for p in group["params"]})
        self._built_shapes[id(group)] = [_shape(p) for p in group["params"]]

    def set_layer_segments(self, tensor: torch.Tensor, segments: LayerSegments) -> None:
        """Declare where whole layers lie in ``tensor`` (a flat partition this optimiser steps)."""
        if segments.numel != tensor.numel():
            raise ValueError(f"segments describe {segments.numel} elements, tensor has {tensor.numel()}")
        self._segments[id(tensor)] = (tensor, segments)

    def declare_whole_layers(self) -> None:
        """Declare the tensors now in the groups whole layers (a wrapper's per-parameter copies).

        Raises RuntimeError unless they have the shapes of the parameters given at construction.
        """
        given = sorted(shape for shapes in self._built_shapes.values() for shape in shapes)
        current = [p for g in self.param_groups for p in g["params"]]
        if sorted(_shape(p) for p in current) != given:
            raise RuntimeError(f"{type(self).__name__} now steps {len(current)} tensors whose shapes are not "
                               f"those of the {len(given)} parameters it was built with: flattened by an "
                               f"unsupported wrapper, layer-wise trust ratios would be wrong")
        self._whole_layers.update({id(p): p for p in current})

    def clear_layer_segments(self) -> None:
        """Forget every registered layout."""
        self._segments.clear()

    def segments_for(self, p: torch.Tensor, group: Dict[str, Any]) -> LayerSegments:
        """Where whole layers lie in ``p`` (a tensor of ``group``): its layout, or ``p`` as one layer.

        A tensor the optimiser was not built with is accepted as a whole layer only if its
        group still has the shapes it was built with (per-parameter master copies; DeepSpeed's
        bf16/fp16 stage-0 wrapper steps those once inside ``deepspeed.initialize``, before
        `attach_zero_layout` can run). Otherwise RuntimeError: a ZeRO/bf16 wrapper flattened
        the layers, and a per-shard trust ratio (DeepSpeed issue #490) would be silently wrong.
        """
        entry = self._segments.get(id(p))
        if entry is not None and entry[0] is p:
            return entry[1]
        if self._whole_layers.get(id(p)) is p or (
                [_shape(q) for q in group["params"]] == self._built_shapes.get(id(group))):
            return LayerSegments.whole(p)
        raise RuntimeError(
            f"{type(self).__name__} is stepping a tensor of shape {tuple(p.shape)} that is not one of its "
            f"layers: a ZeRO/bf16 wrapper flattened them. Call sfrik_scale.zero_layout.attach_zero_layout("
            f"optimizer, engine) after deepspeed.initialize, otherwise trust ratios are computed per "
            f"shard (DeepSpeed issue #490).")

    def _trust_ratio(self, p: torch.Tensor, group: Dict[str, Any], update: torch.Tensor,
                     coeff: float) -> torch.Tensor:
        """coeff * ||w_layer|| / ||u_layer|| per layer (1 where either norm is 0), per element of p."""
        segments = self.segments_for(p, group)
        w_norm, u_norm = segments.layer_norms(p, update)
        ratio = torch.where((w_norm > 0) & (u_norm > 0), coeff * w_norm / u_norm, torch.ones_like(w_norm))
        return segments.expand(ratio).to(update.dtype)


class LARS(LayerwiseTrustOptimizer):
    """Layer-wise Adaptive Rate Scaling, as in VICReg's / SFRIK's official code.

    Per tensor, with group flags ``weight_decay`` and ``layer_adaptation``:
        u = g + weight_decay * w
        u = eta * ||w|| / ||u|| * u       (layer_adaptation; ratio 1 if a norm is 0)
        mu = momentum * mu + u
        w = w - lr * mu

    Args:
        params: parameters or param-group dicts (use `param_groups` for the SSL exclusions).
        lr: learning rate (the schedule's peak; `build_scheduler` scales it per step).
        weight_decay, momentum, eta: defaults of the paper (1e-6, 0.9, 0.001).
        layer_adaptation: default of the flag for groups that do not set it.

    Distributed: see `LayerwiseTrustOptimizer`.
    """

    def __init__(self, params: Any, lr: float, weight_decay: float = 1e-6, momentum: float = 0.9,
                 eta: float = 0.001, layer_adaptation: bool = True) -> None:
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or eta <= 0:
            raise ValueError(f"invalid LARS hyper-parameters: lr={lr}, weight_decay={weight_decay}, "
                             f"momentum={momentum}, eta={eta}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta,
                                      layer_adaptation=layer_adaptation))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> Optional[torch.Tensor]:
        loss = _evaluate(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                # Out of place: under ZeRO p.grad is DeepSpeed's gradient partition buffer.
                update = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad.clone()
                if group["layer_adaptation"]:
                    update.mul_(self._trust_ratio(p, group, update, group["eta"]))
                mu = self.init_state(p)
                mu.mul_(group["momentum"]).add_(update)
                p.add_(mu, alpha=-group["lr"])
        return loss

    def init_state(self, p: torch.Tensor) -> torch.Tensor:
        """The momentum buffer of ``p``, made (zeros) at its first use. LARS makes its state one
        tensor at a time, so the memory simulator can make it ahead of the step."""
        state = self.state[p]
        if "mu" not in state:
            state["mu"] = torch.zeros_like(p)
        return state["mu"]


class LAMB(LayerwiseTrustOptimizer):
    """LAMB (You et al. 2020, Algorithm 2) with the same exclusions and ZeRO handling as LARS.

    Per tensor, step t:
        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + weight_decay * w
        w = w - lr * ||w|| / ||u|| * u      (layer_adaptation; ratio 1 if a norm is 0)

    A pure-PyTorch implementation: DeepSpeed's FusedLamb needs CUDA, and it would compute
    its ratios per flat shard under ZeRO all the same.

    Distributed: see `LayerwiseTrustOptimizer`.
    """

    def __init__(self, params: Any, lr: float, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01, layer_adaptation: bool = True) -> None:
        if lr < 0 or weight_decay < 0 or eps <= 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid LAMB hyper-parameters: lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      layer_adaptation=layer_adaptation))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> Optional[torch.Tensor]:
        loss = _evaluate(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denom = (exp_avg_sq / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
                update = (exp_avg / (1 - beta1 ** t)).div_(denom)
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                if group["layer_adaptation"]:
                    update.mul_(self._trust_ratio(p, group, update, 1.0))
                p.add_(update, alpha=-group["lr"])
        return loss


# ----------------------------------------------------------------------------------------
# Parameter groups and the registry.
# ----------------------------------------------------------------------------------------
def param_groups(params: ParamsLike, weight_decay: float) -> List[Dict[str, Any]]:
    """Split trainable parameters into the two groups of the SSL recipes.

    Weights (ndim > 1) get ``weight_decay`` and ``layer_adaptation=True``; biases and
    normalisation parameters (ndim <= 1) get neither, as VICReg/SFRIK's LARS filters them
    (``exclude_bias_and_norm``: ``p.ndim == 1``). Empty groups are left out (DeepSpeed
    drops them, which would shift group indices).
    """
    weights, others = [], []
    for p in (params.parameters() if isinstance(params, nn.Module) else params):
        if p.requires_grad:
            (weights if len(_shape(p)) > 1 else others).append(p)
    groups = [{"params": weights, "weight_decay": weight_decay, "layer_adaptation": True},
              {"params": others, "weight_decay": 0.0, "layer_adaptation": False}]
    return [g for g in groups if g["params"]]


#: Adam's moment decay rates, as LAMB and AdamW take them from ``optim.betas``
_BETAS = Option("betas", Tuple[float, float], (0.9, 0.999), "Adam betas (moment decay rates), each in [0, 1).",
                check=in_unit_interval)


@OPTIMIZERS.register("lars", summary=(
    "LARS (biases and normalisation parameters excluded from weight decay and adaptation)"), options=(
    Option("momentum", float, 0.9, "LARS momentum, in [0, 1).", check=in_unit_interval),
    Option("eta", float, 0.02, (
        "LARS trust coefficient (> 0): each layer's step is eta x |w| / |update| times the lr. The ImageNet "
        "recipes use 0.001 (tens of thousands of steps); the demo and small_* recipes 0.02 (a few hundred)."),
        minimum=0.0, strict=True)))
def build_lars(params: ParamsLike, lr: float, weight_decay: float = 1e-6, momentum: float = 0.9,
               eta: float = 0.001) -> LARS:
    """LARS with the paper's defaults and the bias/norm exclusions."""
    return LARS(param_groups(params, weight_decay), lr=lr, momentum=momentum, eta=eta)


@OPTIMIZERS.register("lamb", summary="LAMB (layer-wise adaptive Adam)", options=(_BETAS,))
def build_lamb(params: ParamsLike, lr: float, weight_decay: float = 0.01,
               betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-6) -> LAMB:
    """LAMB with the bias/norm exclusions (weight decay 0.01 as in the LAMB paper)."""
    return LAMB(param_groups(params, weight_decay), lr=lr, betas=betas, eps=eps)


@OPTIMIZERS.register("adamw", summary="torch AdamW", options=(_BETAS,))
def build_adamw(params: ParamsLike, lr: float, weight_decay: float = 0.05,
                betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.AdamW:
    """torch AdamW, biases and norms without decay. Elementwise, hence correct under any ZeRO stage."""
    return torch.optim.AdamW(param_groups(params, weight_decay), lr=lr, betas=betas, eps=eps)


def build_optimizer(name: str, params: ParamsLike, lr: float, **kwargs: Any) -> torch.optim.Optimizer:
    """Build the optimiser registered as ``name`` ("lars", "lamb", "adamw")."""
    return OPTIMIZERS.get(name)(params, lr=lr, **kwargs)


def optimizer_options(name: str, settings: Any) -> Dict[str, Any]:
    """The keyword arguments of the optimiser ``name`` found on ``settings`` (a run's ``cfg.optim``:
    weight_decay, momentum, eta, betas, ...): each builder takes what its signature names."""
    params = inspect.signature(OPTIMIZERS.get(name)).parameters
    return {k: tuple(v) if isinstance(v, list) else v for k in params if k not in ("params", "lr")
            and (v := getattr(settings, k, None)) is not None}


# ----------------------------------------------------------------------------------------
# Learning-rate schedule.
# ----------------------------------------------------------------------------------------
def scaled_lr(base_lr: float, global_batch: int) -> float:
    """Peak learning rate of the linear scaling rule: base_lr * global_batch / 256."""
    return base_lr * global_batch / 256


@dataclass(frozen=True)
class WarmupCosine:
    """Multiplier of the peak lr at optimiser step s (0-based), as in VICReg's code.

    s < warmup_steps: s / warmup_steps (0 at the first step, peak reached at s = warmup_steps);
    then a half cosine from 1 down to ``final_ratio``, reached at s = total_steps and held
    after. A dataclass rather than a lambda so that the scheduler's state_dict pickles.
    """

    warmup_steps: int
    total_steps: int
    final_ratio: float

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        decay_steps = self.total_steps - self.warmup_steps
        progress = min(step - self.warmup_steps, decay_steps) / decay_steps if decay_steps > 0 else 1.0
        q = 0.5 * (1.0 + math.cos(math.pi * progress))
        return q + self.final_ratio * (1.0 - q)


def build_scheduler(optimizer: torch.optim.Optimizer, base_lr: float, global_batch: int, steps_per_epoch: int,
                    epochs: int, warmup_epochs: float = 10, final_ratio: float = 0.001) -> LambdaLR:
    """Linear warm-up then cosine decay, stepped once per optimiser step.

    Sets every group's lr to the peak ``scaled_lr(base_lr, global_batch)`` (times the
    group's optional ``lr_scale``) and returns a LambdaLR applying `WarmupCosine`; the lr
    of step 0 is already set on return. Pass it to ``deepspeed.initialize(lr_scheduler=...)``:
    the engine then calls ``step()`` after each optimiser step (not on overflow-skipped
    fp16 steps); never call it yourself as well.
    """
    if base_lr < 0 or global_batch < 1 or steps_per_epoch < 1 or epochs < 1:
        raise ValueError(f"invalid schedule: base_lr={base_lr}, global_batch={global_batch}, "
                         f"steps_per_epoch={steps_per_epoch}, epochs={epochs}")
    if not 0 <= warmup_epochs <= epochs:
        raise ValueError(f"warmup_epochs={warmup_epochs} must lie in [0, epochs={epochs}]")
    if not 0 <= final_ratio <= 1:
        raise ValueError(f"final_ratio={final_ratio} must lie in [0, 1]")
    peak = scaled_lr(base_lr, global_batch)
    for group in optimizer.param_groups:
        group["lr"] = peak * group.get("lr_scale", 1.0)
        group.pop("initial_lr", None)  # LambdaLR takes its base from "lr"
    schedule = WarmupCosine(warmup_steps=int(round(warmup_epochs * steps_per_epoch)),
                            total_steps=epochs * steps_per_epoch, final_ratio=final_ratio)
    return LambdaLR(optimizer, schedule)
