"""Predict the per-GPU memory of a training configuration without its GPUs.

``simulate(Scenario(...))`` builds the real model (``sfrik_scale.models``) on *fake*
tensors (``torch._subclasses.FakeTensorMode``: shapes, dtypes, no storage), lets an engine
emulator (:mod:`.engines`) set up what the data-parallel engine holds, and runs a full
training step: data, forward of both views, the loss, backward, the optimiser step. A
:class:`~.accounting.TensorByteTracker` counts every storage as it is created and freed,
so the result is the peak of live tensor bytes, per phase, in steady state (the engines
start with their optimiser state allocated): the quantity ``torch.cuda.max_memory_allocated``
reports when reset at every step, as the SFRIK paper measured it.

The fake tensors live on the CPU even for a CUDA scenario (autograd's engine needs a real
device for CUDA tensors); the CUDA caching allocator is modelled by rounding every storage
up to its 512-byte blocks, and CUDA autocast by CPU autocast, whose policy for convolutions
and linear layers is the same (the paper's losses spell out CUDA's dtypes themselves).

Two implementations can be simulated:

* ``"paper"``: the paper's runs (official code, PyTorch DDP + fp16 autocast, losses that
  gather the global batch: :mod:`.reference`);
* ``"trainer"``: this project's trainer (DeepSpeed ZeRO 0-3, fp32/bf16/fp16, this
  project's losses, whose collectives run on a fake process group of ``world_size`` ranks
  so that every world-size dependent buffer (ring-exchange blocks, all-reduced q x q
  covariances) exists as it would on rank 0).

Everything runs in this process, on the CPU, in seconds; nothing is fitted to measurements.

Example:
    >>> est = simulate(Scenario(method="sfrik", global_batch=256, world_size=8, implementation="paper"))
    >>> est.peak_gb                                   # decimal GB, as the paper reports
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Iterator, Literal, Optional, Tuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..profiling.accounting import TensorByteTracker
from ..optim import DEFAULT_OPTIMIZER
from .engines import DDPAmpEngine, DeepSpeedBuckets, DeepSpeedEngine, PaperAssumptions

Implementation = Literal["paper", "trainer"]
#: breakdown groups reported by ``MemoryEstimate.grouped`` (and ``sfrik-scale plan``)
GROUPS = {
    "parameters": ("parameters", "buffers", "parameters_gathered", "weight_copies"),
    "gradients": ("gradients", "gradient_buffers"),
    "optimizer_state": ("optimizer_state", "master_weights"),
    "activations": ("activations", "inputs"),
    "loss_workspace": ("loss_workspace",),
    "backward_temporaries": ("backward",),
    "optimizer_step": ("optimizer_step",),
}
PHASE_ORDER = ("data", "backbone_forward", "projector_forward", "loss", "backward", "optimizer_step")


@dataclass(frozen=True)
class Scenario:
    """One training configuration, seen from one GPU (rank 0).

    Attributes:
        method: the loss: "sfrik" or "vicreg" for the paper; any ``sfrik_scale.losses``
            name for the trainer.
        global_batch: images per optimiser step over all ranks (each GPU gets
            ``global_batch / world_size``; no gradient accumulation).
        world_size: data-parallel ranks.
        backbone, projector: as in the config (``model.backbone``, ``model.projector``).
        image_size: square crops fed to the network.
        implementation: "paper" (DDP + fp16 autocast + gathered losses) or "trainer".
        zero_stage, precision: the trainer's DeepSpeed settings (ignored for "paper", which
            is fp16 autocast over fp32 weights).
        device: "cuda" (fake CUDA tensors, 512-byte allocator blocks) or "cpu" (exact bytes).
        chunk_size: ``loss.chunk_size`` (kernel losses: Gram rows per block; VICReg: covariance
            columns per block).
        loss_options: the loss's other options, as (name, value) pairs (``from_config`` copies
            ``cfg.loss``; empty: the loss's defaults). The trainer and the simulator build the
            loss through the same ``sfrik_scale.losses.build_loss_from_config``.
        buckets: DeepSpeed bucket settings (defaults: DeepSpeed's own).
        optimizer: the trainer's ``optim.name`` (lars, adamw, lamb); the paper used LARS.
        batchnorm_fp32: the trainer runs BatchNorm in fp32 under bf16/fp16
            (``models.batchnorm_in_fp32``), which saves an fp32 copy of each BatchNorm input for
            backward; False simulates BatchNorm natively in low precision instead (a what-if).
        paper_assumptions: for "paper", what its DDP/autocast engine is assumed to do
            (:class:`~sfrik_scale.planning.engines.PaperAssumptions`; the defaults are the
            official code's settings, the others what-ifs).
    """

    method: str = "sfrik"
    global_batch: int = 256
    world_size: int = 8
    backbone: str = "resnet50"
    projector: str = "8192-8192-32768"
    image_size: int = 224
    implementation: Implementation = "trainer"
    zero_stage: int = 0
    precision: str = "bf16"
    device: str = "cuda"
    chunk_size: Optional[int] = None
    loss_options: Tuple[Tuple[str, Any], ...] = ()
    buckets: DeepSpeedBuckets = field(default_factory=DeepSpeedBuckets)
    optimizer: str = DEFAULT_OPTIMIZER
    batchnorm_fp32: bool = True
    paper_assumptions: PaperAssumptions = field(default_factory=PaperAssumptions)

    def __post_init__(self) -> None:
        if self.implementation not in ("paper", "trainer"):
            raise ValueError(f"implementation must be 'paper' or 'trainer', got {self.implementation!r}")
        if self.world_size < 1 or self.global_batch < 1:
            raise ValueError(f"world_size and global_batch must be >= 1, got {self.world_size}, {self.global_batch}")
        if self.global_batch % self.world_size:
            raise ValueError(f"global_batch {self.global_batch} is not divisible by world_size {self.world_size}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.implementation == "paper":
            from .reference import PAPER_LOSSES

            if self.method not in PAPER_LOSSES:
                raise ValueError(f"the paper's runs are simulated for {sorted(PAPER_LOSSES)}, not {self.method!r}")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'cuda' or 'cpu', got {self.device!r}")

    @classmethod
    def from_config(cls, cfg: Any, world_size: int, device: str = "cuda") -> "Scenario":
        """The trainer's configuration ``cfg`` (a validated :class:`~sfrik_scale.config.Config`)
        on ``world_size`` GPUs; bucket sizes from the ds_config the trainer would build.
        With gradient accumulation, the per-GPU batch is the micro-batch."""
        from ..ds_config import build_ds_config
        from ..losses import loss_options

        ds = build_ds_config(cfg, world_size)
        options = {k: tuple(v) if isinstance(v, list) else v
                   for k, v in loss_options(cfg.loss.name, cfg.loss).items() if k != "chunk_size"}
        return cls(method=cfg.loss.name, global_batch=ds["train_micro_batch_size_per_gpu"] * world_size,
                   world_size=world_size, backbone=cfg.model.backbone, projector=cfg.model.projector,
                   image_size=cfg.data.image_size, implementation="trainer", zero_stage=cfg.deepspeed.zero_stage,
                   precision=cfg.deepspeed.precision, device=device, chunk_size=cfg.loss.chunk_size,
                   loss_options=tuple(sorted(options.items())), buckets=DeepSpeedBuckets.from_ds_config(ds),
                   optimizer=cfg.optim.name)

    def loss_settings(self) -> SimpleNamespace:
        """The loss's settings as the trainer reads them from ``cfg.loss``: name and options (those
        the loss ``method`` does not take are ignored by `build_loss_from_config`)."""
        return SimpleNamespace(**dict(self.loss_options), name=self.method, chunk_size=self.chunk_size)

    @property
    def per_gpu_batch(self) -> int:
        return self.global_batch // self.world_size

    @property
    def q(self) -> int:
        return int(self.projector.split("-")[-1])

    def label(self, batch: bool = True) -> str:
        impl = ("paper (DDP, fp16 autocast)" if self.implementation == "paper"
                else f"trainer (ZeRO {self.zero_stage}, {self.precision})")
        size = f" N={self.global_batch}" if batch else ""
        return f"{self.method} q={self.q}{size} on {self.world_size} GPUs, {impl}"


@dataclass
class MemoryEstimate:
    """The simulated memory of one rank for a :class:`Scenario` (bytes).

    Attributes:
        peak_bytes: the steady-state (second step) peak of live tensor bytes.
        first_step_peak_bytes: the first step's peak (lazily created state appears here).
        phase_peaks: steady-state peak per phase (absolute bytes).
        peak_phase: the phase where the step peaks.
        breakdown: live bytes per category at the peak.
        start_bytes: bytes live at the start of the steady step (model, engine, optimizer state).
        num_parameters: trainable parameters of the model.
        category_peaks: the largest live bytes of each category at any time in the step
            (their sum exceeds the peak: categories peak at different moments).
    """

    scenario: Scenario
    peak_bytes: int
    first_step_peak_bytes: int
    phase_peaks: dict
    peak_phase: str
    breakdown: dict
    start_bytes: int
    num_parameters: int
    category_peaks: dict = field(default_factory=dict)

    @property
    def peak_gb(self) -> float:
        """Decimal gigabytes (10^9 bytes), the unit of the paper's table."""
        return self.peak_bytes / 1e9

    def grouped(self, which: str = "at_peak") -> dict:
        """The breakdown in the planner's groups: parameters (with low-precision copies and
        gathered ZeRO-3 weights), gradients (with reduction buckets), optimizer_state (with fp32
        master weights), activations (with the input images), loss_workspace (the loss's
        forward and backward), backward_temporaries (activation gradients), optimizer_step
        (temporaries of the step). ``which``:
        "at_peak" (the bytes making up the peak) or "largest" (each category's own maximum
        during the step, e.g. a reduction bucket that exists only after the peak)."""
        source = self.breakdown if which == "at_peak" else self.category_peaks
        out = {g: sum(source.get(c, 0) for c in cats) for g, cats in GROUPS.items()}
        known = {c for cats in GROUPS.values() for c in cats}
        other = sum(v for k, v in source.items() if k not in known)
        if other:
            out["other"] = other
        return out

    def to_dict(self) -> dict:
        s = dataclasses.asdict(self.scenario)
        return {"scenario": s, "peak_bytes": self.peak_bytes, "first_step_peak_bytes": self.first_step_peak_bytes,
                "phase_peaks": self.phase_peaks, "peak_phase": self.peak_phase, "breakdown": self.breakdown,
                "grouped": self.grouped(), "grouped_largest": self.grouped("largest"),
                "start_bytes": self.start_bytes, "num_parameters": self.num_parameters}


def simulate(scenario: Scenario, steps: Optional[int] = None) -> MemoryEstimate:
    """Simulate ``steps`` training steps of ``scenario`` on fake tensors; report the last.

    The engines start in steady state for LARS (its momentum already allocated), so one step
    gives the steady-state peak; AdamW and LAMB create their moments in their first step, so
    the default is then two steps.

    Runs in this process; a torch.distributed process group must not be initialised here
    (the trainer implementation starts, and ends, a fake one of ``world_size`` ranks).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..models import build_model

    s = scenario
    fake_world = s.world_size if s.implementation == "trainer" else 1
    # Fake tensors live on the CPU even for a CUDA scenario: autograd's engine needs a real
    # device for CUDA tensors. CUDA's allocator is modelled by its 512-byte block rounding.
    device = torch.device("cpu")
    round_to = 512 if s.device == "cuda" else 1
    with _fake_process_group(fake_world), shape_only_input_checks():
        mode = FakeTensorMode()
        with mode, torch.device(device):
            model = build_model(s.backbone, s.projector)
        model.train()
        tracker = TensorByteTracker(round_to=round_to)
        tracker.track(list(model.parameters()), category="parameters")
        tracker.track(list(model.buffers()), category="buffers")
        num_parameters = sum(p.numel() for p in model.parameters())
        loss_fn = _build_loss(s, model.q)  # outside fake mode: kernel constants (b_0) need real numbers
        with mode, _AssumedScalars(), tracker, torch.device(device):
            engine = _build_engine(s, model, tracker, device)
            if steps is None:  # an optimiser that makes its state ahead (init_state: LARS) needs one step
                steps = 1 if s.implementation == "paper" or hasattr(engine.optimizer, "init_state") else 2
            records = [_step(s, model, engine, loss_fn, tracker, device) for _ in range(max(1, steps))]
    last = records[-1]
    return MemoryEstimate(scenario=s, peak_bytes=last["peak"], first_step_peak_bytes=records[0]["peak"],
                          phase_peaks=last["phases"], peak_phase=last["peak_phase"], breakdown=last["at_peak"],
                          start_bytes=last["start"], num_parameters=num_parameters,
                          category_peaks=last["category_peaks"])


def _build_engine(s: Scenario, model: nn.Module, tracker: TensorByteTracker, device: torch.device):
    if s.implementation == "paper":
        return DDPAmpEngine(model, tracker, device, s.paper_assumptions)
    return DeepSpeedEngine(model, tracker, s.zero_stage, s.precision, s.world_size,
                           buckets=dataclasses.replace(s.buckets), optimizer=s.optimizer,
                           batchnorm_fp32=s.batchnorm_fp32, cuda=s.device == "cuda")


def _build_loss(s: Scenario, q: int):
    if s.implementation == "paper":
        from .reference import PAPER_LOSSES

        return PAPER_LOSSES[s.method](q, s.world_size)
    from ..losses import build_loss_from_config

    loss = build_loss_from_config(s.loss_settings(), q=q)
    kernel = getattr(loss, "kernel", None)
    if kernel is not None:
        kernel.b0  # computed (by quadrature for some kernels) and cached now, on real numbers
    return lambda z1, z2: loss(z1.float(), z2.float())["loss"]  # the trainer: loss in fp32


def _step(s: Scenario, model: nn.Module, engine: Any, loss_fn, tracker: TensorByteTracker,
          device: torch.device) -> dict:
    from torch.autograd.graph import register_multi_grad_hook

    phases: dict[str, Any] = {}
    start = tracker.current
    tracker.reset_category_peaks()
    step_scope = tracker.open_scope("step", snapshot=True)
    n = s.per_gpu_batch

    def hooked(name: str, module: nn.Module):
        scopes = []
        pre = module.register_forward_pre_hook(lambda m, a: scopes.append(tracker.open_scope(name)))

        def post(m, a, o):
            sc = tracker.close_scope(scopes.pop())
            phases[name] = max(phases.get(name, 0), sc.peak)
        return pre, module.register_forward_hook(post)

    handles = [*hooked("backbone_forward", model.backbone), *hooked("projector_forward", model.projector)]
    try:
        with tracker.scope("data") as sc, tracker.category("inputs"):
            shape = (n, 3, s.image_size, s.image_size)
            if s.device == "cpu":  # the loader's fp32 batch is itself in the measured (host) memory
                host = [torch.empty(shape, dtype=torch.float32, device=device) for _ in range(2)]
                views = [h.to(engine.input_dtype) for h in host]
            else:  # on GPU only the device copy, made directly in the engine's input dtype, counts
                host, views = [], [torch.empty(shape, dtype=engine.input_dtype, device=device) for _ in range(2)]
        phases["data"] = sc.peak
        with engine.forward_context(), tracker.category("activations"):
            z1, z2 = model(views[0]), model(views[1])
        with tracker.scope("loss") as sc, tracker.category("loss_workspace"):
            loss = loss_fn(z1, z2)
        phases["loss"] = sc.peak
        with tracker.scope("backward") as sc, tracker.category("loss_workspace"):
            # the loss's own backward is its workspace; from the embeddings' gradients on, backward
            register_multi_grad_hook([z1, z2], lambda grad: setattr(tracker, "default_category", "backward"),
                                     mode="any")
            engine.backward(loss)
        phases["backward"] = sc.peak
        del loss, z1, z2, views  # the trainer's device copies die with its train_step (the host batch lives on)
        with tracker.scope("optimizer_step") as sc:
            engine.step()
        phases["optimizer_step"] = sc.peak
        del host
    finally:
        for h in handles:
            h.remove()
        tracker.close_scope(step_scope)
    peak_phase = max(PHASE_ORDER, key=lambda k: phases.get(k, -1))
    return {"peak": step_scope.peak, "phases": {k: phases[k] for k in PHASE_ORDER if k in phases},
            "peak_phase": peak_phase, "at_peak": dict(step_scope.at_peak or {}), "start": start,
            "category_peaks": dict(tracker.category_peaks)}


# ------------------------------------------------------------------------------ helpers
class _AssumedScalars(TorchDispatchMode):
    """Host reads of fake values (``float(t)``, ``bool(t)``): fake tensors have no data, so
    the simulator answers 1 (True, 1, 1.0). Only scalars that steer no allocation are read
    on the simulated paths (the Gram's upstream gradient factor); input checks, the only
    value-dependent branches, are replaced by shape-only ones (``shape_only_input_checks``)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            t = args[0]
            return True if t.dtype == torch.bool else (1.0 if t.is_floating_point() else 1)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _fake_process_group(world: int) -> Iterator[None]:
    """A fake torch.distributed world of ``world`` ranks (this process is rank 0), so that
    the project's collectives take their multi-rank code paths without communicating."""
    import torch.distributed as dist

    if world <= 1:
        yield
        return
    if dist.is_initialized():
        raise ValueError("simulate() needs a process without an initialised torch.distributed process group")
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _check_shapes(z: torch.Tensor, kernel: Any = None, group: Any = None, name: str = "z",
                  chunk_size: Optional[int] = None, finite_hint: Any = None) -> None:
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(f"{name} must be (n, q) with q >= 2, got shape {tuple(z.shape)}")
    if kernel is not None and kernel.check_dim(z.shape[1], name) is not None:
        raise ValueError(kernel.check_dim(z.shape[1], name))


def _check_view_shapes(z1: torch.Tensor, z2: torch.Tensor, group: Any = None, kernel: Any = None,
                       q: Optional[int] = None, chunk_size: Optional[int] = None, finite_hints: Any = None) -> None:
    _check_shapes(z1, kernel, name="z1")
    _check_shapes(z2, kernel, name="z2")
    if z1.shape != z2.shape or (q is not None and z1.shape[1] != q):
        raise ValueError(f"views of shapes {tuple(z1.shape)} and {tuple(z2.shape)} do not match q={q}")


@contextlib.contextmanager
def shape_only_input_checks() -> Iterator[None]:
    """Swap the losses' input checks for shape-only ones while simulating.

    The real checks read values (a finiteness flag, agreement across ranks: host syncs)
    that fake tensors do not have; they allocate only a few scalars, so the memory they
    would add is negligible. Patched where the names are looked up: ``gram`` and each loss
    module that imported ``validate_views``.
    """
    from .. import gram, losses

    patched: list[tuple[Any, str, Any]] = []
    targets = [(gram, "validate_embeddings", _check_shapes)]
    for info in pkgutil.iter_modules(losses.__path__):  # every loss module, whatever its name
        module = importlib.import_module(f"{losses.__name__}.{info.name}")
        if hasattr(module, "validate_views"):
            targets.append((module, "validate_views", _check_view_shapes))
        if hasattr(module, "validate_embeddings"):
            targets.append((module, "validate_embeddings", _check_shapes))
    try:
        for module, attr, replacement in targets:
            patched.append((module, attr, getattr(module, attr)))
            setattr(module, attr, replacement)
        yield
    finally:
        for module, attr, original in reversed(patched):
            setattr(module, attr, original)
