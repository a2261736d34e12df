"""What a data-parallel engine holds on one rank, replayed on fake tensors.

The simulator runs the real model and loss on fake tensors and lets one of these emulators
do what the engine of the run would do around them, allocation for allocation: cast and
flatten the parameters, keep master weights and optimizer state (whole or this rank's
partition), collect gradients (in the parameters' ``.grad``, in reduction buckets, in
gradient partitions), flatten them for the all-reduce, and step the optimiser. Every
buffer is a real (fake) tensor created at the moment the engine creates it, so the
tracker sees the same timeline, and phase peaks come out of the same accounting as
activations. Sizes follow from the parameter shapes, the world size, the ZeRO stage, the
dtypes and the engine's configured bucket sizes: nothing is fitted to measurements.

Emulated engines:
  * :class:`DDPAmpEngine`: the paper's runs (PyTorch 1.10 DDP + ``torch.cuda.amp``): fp32
    weights, fp32 ``.grad`` kept between steps (``zero_grad`` zeroed them in place before
    PyTorch 2.0), DDP's flat gradient buckets (a second copy of every gradient:
    ``gradient_as_bucket_view`` was off), VICReg's LARS with one momentum buffer, fp16
    weight copies made by autocast (cached for the forward, saved for backward).
  * :class:`DeepSpeedEngine`: this project's trainer on DeepSpeed (the version installed
    here), ZeRO stage 0 (the engine's flattened all-reduce; with bf16/fp16 the unfused mixed
    precision optimizer: fp32 master copies and fp32 gradients at the step), stages 1 and 2
    (``DeepSpeedZeroOptimizer``: low-precision flat parameters, this rank's fp32 partition,
    the contiguous reduction bucket of ``reduce_bucket_size`` elements, the gradient
    partition) and stage 3 (partitioned parameters gathered per module around its forward
    and backward, persistent small parameters, the reduction bucket and the flat gradient
    partition allocated at start-up, DeepSpeed's memory-efficient ``F.linear``). The optimiser is this project's LARS
    (:mod:`sfrik_scale.optim`), stepped on the tensors the engine hands it (whole layers,
    or one flat partition with its layer map).

Known simplifications (see docs/memory.md): CUDA allocator block splitting and the cuDNN/
cuBLAS workspaces are not modelled; ZeRO-3 prefetching is modelled as gathering the next
modules in execution order up to ``prefetch_bucket_size`` elements; stage 1 reduces
through the same bucket and partition as stage 2, after backward; gradient accumulation
(micro-batch < global / world) and optimizer offload are not modelled.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import nn

from ..optim import DEFAULT_OPTIMIZER
from ..profiling.accounting import TensorByteTracker
from .reference import paper_lars_step

#: DDP's default bucket cap and first bucket (torch.nn.parallel.DistributedDataParallel)
DDP_BUCKET_BYTES = 25 * 2**20
DDP_FIRST_BUCKET_BYTES = 1 * 2**20
#: DeepSpeed's element count per flattened all-reduce of stage 0 (engine.MEMORY_OPT_ALLREDUCE_SIZE)
DS_ALLREDUCE_ELEMENTS = 500_000_000
#: DeepSpeed pads each flat parameter group to a multiple of (this x world size) elements
DS_ALIGNMENT_FACTOR = 2


@dataclass
class DeepSpeedBuckets:
    """The ZeRO settings that size engine buffers (DeepSpeed's defaults unless configured)."""

    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    overlap_comm: Optional[bool] = None  # None: DeepSpeed's default (True for stage 3 only)
    contiguous_gradients: bool = True
    prefetch_bucket_size: int = 50_000_000
    param_persistence_threshold: int = 100_000

    @classmethod
    def from_ds_config(cls, ds_config: dict) -> "DeepSpeedBuckets":
        """The settings a ds_config dict (``build_ds_config``) gives, DeepSpeed's defaults elsewhere."""
        zero = dict(ds_config.get("zero_optimization", {}))
        keys = {"reduce_bucket_size": ("reduce_bucket_size", int),
                "allgather_bucket_size": ("allgather_bucket_size", int),
                "overlap_comm": ("overlap_comm", bool), "contiguous_gradients": ("contiguous_gradients", bool),
                "stage3_prefetch_bucket_size": ("prefetch_bucket_size", int),
                "prefetch_bucket_size": ("prefetch_bucket_size", int),
                "stage3_param_persistence_threshold": ("param_persistence_threshold", int),
                "param_persistence_threshold": ("param_persistence_threshold", int)}
        values = {name: cast(zero[key]) for key, (name, cast) in keys.items() if zero.get(key) is not None}
        return cls(**values)


class _Engine:
    """Shared plumbing: the tracker, categories, and the hook that files gradients."""

    #: dtype of the images fed to the model
    input_dtype = torch.float32

    def __init__(self, model: nn.Module, tracker: TensorByteTracker) -> None:
        self.model = model
        self.tracker = tracker
        self.params = [p for p in model.parameters() if p.requires_grad]

    def alloc(self, category: str, fn, *args, **kwargs) -> torch.Tensor:
        with self.tracker.category(category):
            return fn(*args, **kwargs)

    def forward_context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def step(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


# ------------------------------------------------------------------------------ the paper's DDP + AMP
@dataclass(frozen=True)
class PaperAssumptions:
    """What the simulation of the paper's runs assumes about its engine (the defaults), each
    switchable to measure its weight (docs/memory.md, "What the paper path assumes").

    Attributes:
        gradient_as_bucket_view: DDP's ``gradient_as_bucket_view``; off (the default then and
            now): every ``.grad`` is a separate tensor and DDP's buckets a second copy.
        grad_set_to_none: ``optimizer.zero_grad(set_to_none=True)``; off (PyTorch < 2.0's
            default): ``.grad`` is zeroed in place and kept between steps.
        autocast_cache: autocast's cache of fp16 weight copies within one forward context
            (on in ``torch.cuda.amp.autocast``); off: each use of a weight casts it again.
    """

    gradient_as_bucket_view: bool = False
    grad_set_to_none: bool = False
    autocast_cache: bool = True


class DDPAmpEngine(_Engine):
    """PyTorch 1.10 DDP + autocast fp16 + GradScaler + VICReg's LARS, as in the paper's runs."""

    def __init__(self, model: nn.Module, tracker: TensorByteTracker, device: torch.device,
                 assumptions: PaperAssumptions = PaperAssumptions()) -> None:
        super().__init__(model, tracker)
        self.device = device
        self.assumptions = assumptions
        self.momentum: dict = {}
        if not (assumptions.gradient_as_bucket_view or assumptions.grad_set_to_none):
            with tracker.category("gradients"):  # .grad survives zero_grad (set_to_none=False before 2.0)
                for p in self.params:
                    p.grad = torch.zeros_like(p)
        with tracker.category("gradient_buffers"):  # DDP's flat buckets, reverse registration order
            self.buckets, views = _ddp_buckets(self.params)
        if assumptions.gradient_as_bucket_view:  # .grad are views of the buckets: no storage of their own
            for p, view in views:
                p.grad = view
        with tracker.category("optimizer_state"):  # one LARS momentum buffer per parameter
            for p in self.params:
                self.momentum[p] = torch.zeros_like(p)

    def forward_context(self):
        return fake_autocast(self.device, torch.float16, cache=self.assumptions.autocast_cache)

    def backward(self, loss: torch.Tensor) -> None:
        # GradScaler: a scaled scalar; AccumulateGrad adds into the existing .grad in place and
        # DDP's hook copies each gradient into its bucket view (in place, no allocation).
        (loss.float() * 65536.0).backward()

    def step(self) -> None:
        with self.tracker.category("optimizer_step"):
            paper_lars_step(self.params, self.momentum)  # unscale_: in place, per-device flags only
        for p in self.params:  # optimizer.zero_grad(): in place before PyTorch 2.0
            if self.assumptions.grad_set_to_none and not self.assumptions.gradient_as_bucket_view:
                p.grad = None  # backward's AccumulateGrad creates it again
            else:
                p.grad.zero_()


def _ddp_buckets(params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    """DDP's flat buckets, and (parameter, its view in its bucket) pairs."""
    buckets, views, current, cap = [], [], [], DDP_FIRST_BUCKET_BYTES

    def close(group: list[torch.Tensor]) -> None:
        flat = torch.empty(sum(t.numel() for t in group), dtype=group[0].dtype, device=group[0].device)
        offset = 0
        for t in group:
            views.append((t, flat[offset:offset + t.numel()].view_as(t)))
            offset += t.numel()
        buckets.append(flat)

    for p in reversed(params):
        current.append(p)
        if sum(t.numel() * t.element_size() for t in current) >= cap:
            close(current)
            current, cap = [], DDP_BUCKET_BYTES
    if current:
        close(current)
    return buckets, views


@contextlib.contextmanager
def fake_autocast(device: torch.device, dtype: torch.dtype, cache: bool = True) -> Iterator[None]:
    """Autocast to ``dtype`` for ``device``'s type, state set directly (``torch.autocast``
    refuses some device/dtype pairs and disables itself for a CUDA device on a machine
    without one), with the weight-cast cache on, as ``torch.cuda.amp.autocast()`` has it
    (``cache=False``: off, a what-if).
    The simulator uses it on the CPU, whose autocast casts convolutions and linear layers
    to fp16 as CUDA's does."""
    kind = torch.device(device).type
    prev_enabled, prev_dtype = torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)
    prev_cache = torch.is_autocast_cache_enabled()
    torch.set_autocast_enabled(kind, True)
    torch.set_autocast_dtype(kind, dtype)
    torch.set_autocast_cache_enabled(cache)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled(kind, prev_enabled)
        torch.set_autocast_dtype(kind, prev_dtype)
        torch.set_autocast_cache_enabled(prev_cache)


# ------------------------------------------------------------------------------ DeepSpeed
_LOW = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class DeepSpeedEngine(_Engine):
    """This project's trainer on DeepSpeed: ZeRO ``stage`` 0-3, ``precision`` fp32/bf16/fp16,
    ``world`` data-parallel ranks (this is rank 0), LARS with this project's layer maps.
    ``cuda``: the run is on GPUs (torch's AdamW then takes its multi-tensor path, whose
    temporaries span all parameters at once)."""

    def __init__(self, model: nn.Module, tracker: TensorByteTracker, stage: int, precision: str, world: int,
                 buckets: Optional[DeepSpeedBuckets] = None, optimizer: str = DEFAULT_OPTIMIZER,
                 batchnorm_fp32: bool = True, cuda: bool = True) -> None:
        from ..optim import build_optimizer

        super().__init__(model, tracker)
        self.stage, self.precision, self.world = stage, precision, world
        self.dtype = _LOW[precision]
        self.input_dtype = self.dtype
        self.buckets = buckets or DeepSpeedBuckets()
        if self.buckets.overlap_comm is None:
            self.buckets.overlap_comm = stage == 3
        self.mixed = self.dtype != torch.float32
        # The trainer's optimiser (its decay / no-decay groups); like DeepSpeed, the emulator
        # later swaps each group's parameters for what the engine steps (fp32 copies, partitions).
        self.optimizer = build_optimizer(optimizer, model, lr=0.1)
        self.groups = [list(g["params"]) for g in self.optimizer.param_groups]
        if cuda and "foreach" in self.optimizer.defaults:  # torch optimisers go multi-tensor on CUDA
            for group in self.optimizer.param_groups:
                group["foreach"] = True
        if self.mixed:
            from ..models import batchnorm_in_fp32

            if batchnorm_fp32:
                batchnorm_in_fp32(model)  # the trainer does this before deepspeed.initialize
            with tracker.category("parameters"):
                for p in self.params:  # DeepSpeed casts parameters only; buffers stay fp32
                    p.data = p.data.to(self.dtype)
        self._grad_hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]
        if stage == 0:
            self._setup_stage0()
        elif stage in (1, 2):
            self._setup_stage12()
        else:
            self._setup_stage3()
        with tracker.category("optimizer_state"):  # steady state: the optimiser's state exists
            self._ensure_state(all_params=True)

    def forward_context(self) -> contextlib.AbstractContextManager:
        return _zero3_linear() if self.stage == 3 else contextlib.nullcontext()

    # ---------------------------------------------------------------- stage 0
    def _setup_stage0(self) -> None:
        if self.mixed:  # FP16_UnfusedOptimizer: an fp32 copy per parameter, stepped instead
            with self.tracker.category("master_weights"):
                self.master = [p.detach().clone().float().requires_grad_(True) for p in self.params]
            copy_of = {id(p): m for p, m in zip(self.params, self.master)}
            for group in self.optimizer.param_groups:
                group["params"] = [copy_of[id(p)] for p in group["params"]]

    def _stage0_backward_end(self) -> None:
        # engine.allreduce_gradients -> buffered_allreduce_fallback: flatten up to 5e8 elements
        # per bucket (a copy), all-reduce, copy back; the flat copy is freed afterwards.
        grads = [p.grad for p in self.params if p.grad is not None]
        bucket, numel = [], 0
        for g in grads:
            bucket.append(g)
            numel += g.numel()
            if numel > DS_ALLREDUCE_ELEMENTS:
                self._flat_roundtrip(bucket)
                bucket, numel = [], 0
        if bucket:
            self._flat_roundtrip(bucket)

    def _flat_roundtrip(self, bucket: list[torch.Tensor]) -> None:
        flat = self.alloc("gradient_buffers", torch.cat, [g.reshape(-1) for g in bucket])
        offset = 0
        for g in bucket:
            g.view(-1).copy_(flat[offset:offset + g.numel()])
            offset += g.numel()
        del flat

    def _stage0_step(self) -> None:
        with self.tracker.category("optimizer_step"):
            if self.mixed:
                # grad norm (fp32 per gradient), fp32 gradients for every master copy, step,
                # fp32 gradients dropped, master copied into the low-precision weights
                for p in self.params:
                    if p.grad is not None:
                        p.grad.float().norm()
                for m, p in zip(self.master, self.params):
                    m.grad = p.grad.to(torch.float32) if p.grad is not None else torch.zeros_like(m)
                with self.tracker.category("optimizer_state"):
                    self._ensure_state()
                self.optimizer.step()
                for m, p in zip(self.master, self.params):
                    m.grad = None
                    p.data.copy_(m.data)
            else:
                with self.tracker.category("optimizer_state"):
                    self._ensure_state()
                self.optimizer.step()
        for p in self.params:
            p.grad = None

    def _ensure_state(self, all_params: bool = False) -> None:
        """Create the optimiser's lazily made state now, in its own category. LARS: its momentum
        (one buffer per stepped tensor). AdamW and LAMB create their two moments themselves
        at the first step (filed under optimizer_step in a one-step simulation: run two)."""
        init_state = getattr(self.optimizer, "init_state", None)
        if init_state is None:
            return
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if all_params or p.grad is not None:
                    init_state(p)

    # ---------------------------------------------------------------- stages 1 and 2
    def _setup_stage12(self) -> None:
        from ..optim import LayerSegments

        align = DS_ALIGNMENT_FACTOR * self.world
        self.flat, self.partitions, self.layouts = [], [], []
        with self.tracker.category("parameters"):
            for group in self.groups:
                total = sum(p.numel() for p in group)
                padded = int(math.ceil(total / align) * align)
                flat = torch.empty(padded, dtype=self.dtype, device=group[0].device)
                offset = 0
                for p in group:  # parameters become views into the flat buffer
                    p.data = flat[offset:offset + p.numel()].view_as(p)
                    offset += p.numel()
                self.flat.append(flat)
        with self.tracker.category("master_weights"):
            for flat in self.flat:
                size = flat.numel() // self.world
                self.partitions.append(flat[:size].detach().clone().float().requires_grad_(True))
        for group, part in zip(self.groups, self.partitions):  # this rank's layer map (rank 0)
            starts, lengths, layers, offset = [], [], [], 0
            for index, p in enumerate(group):
                if offset < part.numel():
                    starts.append(offset)
                    lengths.append(min(p.numel(), part.numel() - offset))
                    layers.append(index)
                offset += p.numel()
            self.layouts.append(LayerSegments(numel=part.numel(), starts=starts, lengths=lengths, layers=layers,
                                              num_layers=len(group), reduce=self.world > 1))
        for group, part, layout in zip(self.optimizer.param_groups, self.partitions, self.layouts):
            group["params"] = [part]  # DeepSpeed hands the optimiser this rank's flat fp32 partition
            if hasattr(self.optimizer, "set_layer_segments"):  # LARS/LAMB (AdamW is elementwise)
                self.optimizer.set_layer_segments(part, layout)
        self.ipg: list[torch.Tensor] = []
        self.ipg_used = 0
        # the gradient partition (``grads_in_partition``): made at the first reduction and kept
        # for the rest of the run, so it exists from the start in steady state
        with self.tracker.category("gradients"):
            self.grad_partitions = [torch.empty(part.numel(), dtype=self.dtype, device=part.device)
                                    for part in self.partitions]

    def _stage12_collect(self, p: torch.Tensor) -> None:
        """A gradient goes into the contiguous bucket; its own storage is released."""
        if not self.ipg:
            with self.tracker.category("gradient_buffers"):
                n = 2 if self.buckets.overlap_comm else 1
                self.ipg = [torch.empty(self.buckets.reduce_bucket_size, dtype=self.dtype, device=p.device)
                            for _ in range(n)]
        if self.ipg_used + p.numel() > self.buckets.reduce_bucket_size:
            self._reduce_bucket()
        if p.numel() > self.buckets.reduce_bucket_size:  # oversized: reduced from its own storage
            self._reduce_into_partition(p.numel())
            p.grad = None
            return
        dest = self.ipg[0][self.ipg_used:self.ipg_used + p.numel()]
        dest.copy_(p.grad.reshape(-1))
        p.grad = None
        self.ipg_used += p.numel()

    def _reduce_bucket(self) -> None:
        if self.ipg_used:
            self._reduce_into_partition(self.ipg_used)
        self.ipg_used = 0

    def _reduce_into_partition(self, numel: int) -> None:
        """Reduce(-scatter) of ``numel`` bucketed elements: this rank's slice lands in its
        gradient partition, in place (the collective allocates no tensor on this rank)."""

    def _stage12_backward_end(self) -> None:
        if self.stage == 1:  # stage 1 reduces after backward, from the parameters' .grad
            for p in self.params:
                if p.grad is not None:
                    self._stage12_collect(p)
        self._reduce_bucket()
        self.ipg = []  # the bucket is released at the end of the reduction

    def _stage12_step(self) -> None:
        with self.tracker.category("optimizer_step"):
            for index, part in enumerate(self.partitions):
                source = self.grad_partitions[index]
                layout = self.layouts[index]
                for start, length in zip(layout.starts, layout.lengths):  # global grad norm, per gradient in fp32
                    torch.linalg.vector_norm(source[start:start + length].to(torch.float32))
                flat = source.reshape(-1).clone()  # flatten(averaged_gradients)
                part.grad = flat.to(torch.float32)
                del flat
            with self.tracker.category("optimizer_state"):
                self._ensure_state()
            self.optimizer.step()
            for part, flat in zip(self.partitions, self.flat):
                part.grad = None
                flat[:part.numel()].copy_(part.detach())  # low-precision partition, then all-gather in place

    # ---------------------------------------------------------------- stage 3
    def _setup_stage3(self) -> None:
        from ..optim import LayerSegments

        b = self.buckets
        self.persistent = {p for p in self.params if p.numel() <= b.param_persistence_threshold}
        self.shards: dict = {}
        self._shapes = {p: tuple(p.shape) for p in self.params}
        with self.tracker.category("parameters"):
            for p in self.params:  # each parameter keeps only its 1/world shard
                if p in self.persistent:
                    continue
                self.shards[p] = torch.empty(int(math.ceil(p.numel() / self.world)), dtype=self.dtype,
                                             device=p.device)
                p.data = torch.empty(0, dtype=self.dtype, device=p.device)
        # the optimiser steps every parameter's 1/world slice, persistent ones included (those
        # additionally keep their full low-precision weights in the model)
        numel = {p: int(math.ceil(math.prod(self._shapes[p]) / self.world)) for p in self.params}
        device = self.params[0].device
        self.partitions = []
        with self.tracker.category("master_weights"):  # fp32 flat partition per parameter group
            for group in self.groups:
                self.partitions.append(torch.empty(sum(numel[p] for p in group), dtype=torch.float32,
                                                   device=device).requires_grad_(True))
        with self.tracker.category("gradient_buffers"):  # the contiguous reduction bucket, at start-up
            self.ipg = [torch.empty(b.reduce_bucket_size, dtype=self.dtype, device=device)]
        with self.tracker.category("gradients"):  # the flat gradient partition, at start-up
            self.grad_flat = torch.zeros(sum(numel.values()), dtype=self.dtype, device=device)
        for group, opt_group, part in zip(self.groups, self.optimizer.param_groups, self.partitions):
            starts, lengths, offset = [], [], 0
            for p in group:
                starts.append(offset)
                lengths.append(numel[p])
                offset += numel[p]
            layout = LayerSegments(numel=offset, starts=starts, lengths=lengths, layers=list(range(len(group))),
                                   num_layers=len(group), reduce=self.world > 1)
            opt_group["params"] = [part]
            if hasattr(self.optimizer, "set_layer_segments"):
                self.optimizer.set_layer_segments(part, layout)
        # execution order of the modules owning partitioned weights, for prefetching: the
        # registration order until the first step has recorded the real one
        self.order = [m for m in self.model.modules() if any(p in self.shards for p in m.parameters(recurse=False))]
        self._position = {m: i for i, m in enumerate(self.order)}
        self._recorded: list[nn.Module] = []
        self._hooks = []
        for module in self.order:
            self._hooks.append(module.register_forward_pre_hook(self._z3_pre_forward))
            self._hooks.append(module.register_forward_hook(self._z3_post_forward))

    def _gather(self, module: nn.Module) -> None:
        for p in module.parameters(recurse=False):
            if p in self.shards and p.numel() == 0:
                with self.tracker.category("parameters_gathered"):
                    p.data = torch.empty(self._shapes[p], dtype=self.dtype, device=p.device)

    def _release(self, module: nn.Module) -> None:
        for p in module.parameters(recurse=False):
            if p in self.shards and p.numel() != 0:
                p.data = torch.empty(0, dtype=self.dtype, device=p.device)

    def _z3_pre_forward(self, module: nn.Module, args: Any) -> None:
        self._recorded.append(module)
        self._gather(module)
        # prefetch: the next modules in execution order, up to prefetch_bucket_size elements
        budget = self.buckets.prefetch_bucket_size
        for nxt in self.order[self._position.get(module, len(self.order)) + 1:]:
            size = sum(math.prod(self._shapes[p]) for p in nxt.parameters(recurse=False) if p in self.shards)
            if size > budget:
                break
            budget -= size
            self._gather(nxt)

    def _z3_post_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        from torch.autograd.graph import register_multi_grad_hook
        from torch.utils._pytree import tree_flatten

        # backward of this call: gather when gradients reach its outputs, release once its
        # inputs' gradients are computed (each call, each view, separately, as ZeRO-3's hooks do)
        outs = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
        ins = [t for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
        if outs:
            register_multi_grad_hook(outs, lambda grads, m=module: self._gather(m), mode="any")
        if ins:
            register_multi_grad_hook(ins, lambda grads, m=module: self._release(m))
        self._release(module)

    def _stage3_collect(self, p: torch.Tensor) -> None:
        # reduce-scatter through the bucket into this rank's gradient partition; the full
        # gradient is released, and so is the gathered weight once its gradient is done
        p.grad = None
        if p in self.shards:
            p.data = torch.empty(0, dtype=self.dtype, device=p.device)

    def _stage3_step(self) -> None:
        with self.tracker.category("optimizer_step"):
            offset = 0
            for part in self.partitions:  # fp32 gradients of each flat partition
                part.grad = self.grad_flat[offset:offset + part.numel()].to(torch.float32)
                offset += part.numel()
            with self.tracker.category("optimizer_state"):
                self._ensure_state()
            self.optimizer.step()
            for part in self.partitions:
                part.grad = None
        if self._recorded:  # from now on prefetch in the order the first step ran
            seen: dict = {}
            for m in self._recorded:
                seen.setdefault(m, len(seen))
            self.order = list(seen)
            self._position = dict(seen)
            self._recorded = []

    # ---------------------------------------------------------------- the step
    def _on_grad(self, p: torch.Tensor) -> None:
        self.tracker.retag(p.grad, "gradients")
        if self.stage == 2:
            self._stage12_collect(p)
        elif self.stage == 1 and not self.ipg:
            with self.tracker.category("gradient_buffers"):  # setup_buckets at the first gradient
                n = 2 if self.buckets.overlap_comm else 1
                self.ipg = [torch.empty(self.buckets.reduce_bucket_size, dtype=self.dtype, device=p.device)
                            for _ in range(n)]
        elif self.stage == 3:
            self._stage3_collect(p)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        if self.stage == 0 and self.world > 1:
            self._stage0_backward_end()
        elif self.stage in (1, 2):
            self._stage12_backward_end()
        elif self.stage == 3:
            for module in self.model.modules():
                self._release(module)

    def step(self) -> None:
        if self.stage == 0:
            self._stage0_step()
        elif self.stage in (1, 2):
            self._stage12_step()
        else:
            self._stage3_step()


@contextlib.contextmanager
def _zero3_linear() -> Iterator[None]:
    """``F.linear`` as a ZeRO-3 run has it: DeepSpeed's ``zero3_linear_wrap``.

    DeepSpeed installs it for every stage-3 engine (``Init(module=...)`` when the model
    was not built under ``deepspeed.zero.Init``, and it persists): its autograd function
    saves the weight parameter itself, so a released (partitioned) weight frees its
    gathered storage, where plain ``F.linear`` would keep it alive through a saved view.
    """
    import torch.nn.functional as F
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    original = F.linear
    F.linear = zero3_linear_wrap
    try:
        yield
    finally:
        F.linear = original
