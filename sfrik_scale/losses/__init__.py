"""Self-supervised losses on two views, all keeping one contract (the distributed contract of docs/architecture.md).

Called as ``loss(z1, z2)`` on this rank's raw projector outputs, shape (batch, q); each
normalises where its method does and returns a dict with a differentiable "loss" and
detached, named components. Distributed: each rank's gradient on its shard, divided by
world size, equals those rows of the single-process gradient on the concatenated batch, so
DeepSpeed/DDP gradient averaging gives the exact single-process parameter gradients. Each
class's ``local_components`` names the components that are this rank's own (they average
over ranks to the single-process value); the others are global, identical on every rank.

Each loss module declares itself with ``SPEC = LossSpec(...)`` (`sfrik_scale.losses.spec`):
its name, class, options (type, default, help, checks), display name and regulariser
component. This package registers every ``SPEC`` it finds, and the configuration, trainer,
memory simulator, reports and tables derive what they need from `LOSS_SPECS`; adding a loss
is one new module (plus a recipe and a test). ``sfrik-scale pretrain --show-config`` lists
the registered losses and their options.

Example:
    >>> import torch
    >>> loss_fn = build_loss("sfrik", q=512, sim_coeff=4000.0)
    >>> out = loss_fn(torch.randn(64, 512), torch.randn(64, 512))
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any, Optional

from torch import nn

from ..options import declarations
from ..registry import Registry
from .align_uniform import AlignUniformLoss
from .contrastive import ContrastiveQuadraticLoss
from .kernel_mmd import KernelMMDLoss
from .sfrik import SFRIKLoss
from .simclr import SimCLRLoss
from .spec import LossSpec, Option
from .vicreg import VICRegLoss

__all__ = ["LOSSES", "LOSS_SPECS", "AlignUniformLoss", "ContrastiveQuadraticLoss", "KernelMMDLoss", "LossSpec",
           "Option", "SFRIKLoss", "SimCLRLoss", "VICRegLoss", "build_loss", "build_loss_from_config",
           "display_name", "loss_options", "loss_parameters", "option_declarations"]

#: name -> loss class; every class takes ``q`` and ``group`` keywords
LOSSES: Registry[type[nn.Module]] = Registry("loss")
#: name -> the `LossSpec` its module declares
LOSS_SPECS: dict[str, LossSpec] = {}


def _discover() -> None:
    """Register the ``SPEC`` of every module of this package (a new loss is one new module)."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name == "spec":
            continue
        spec = getattr(importlib.import_module(f"{__name__}.{info.name}"), "SPEC", None)
        if isinstance(spec, LossSpec):
            LOSSES.register(spec.name)(spec.cls)
            LOSS_SPECS[spec.name] = spec


_discover()


def option_declarations() -> dict[str, list[tuple[str, Option]]]:
    """Every option name any loss declares -> [(loss name, its declaration), ...], in the order
    of first declaration (losses by name); the ``loss`` section of the config is built from it."""
    return declarations((name, LOSS_SPECS[name].options) for name in sorted(LOSS_SPECS))


def display_name(name: Optional[str]) -> Optional[str]:
    """The name tables print for the loss ``name`` ("SFRIK"); unknown names unchanged."""
    spec = LOSS_SPECS.get(name) if name else None
    return spec.display if spec else name


def loss_parameters(name: str) -> tuple[str, ...]:
    """The keyword arguments the loss ``name`` accepts besides ``q`` (e.g. to pick the
    relevant fields of a config section)."""
    params = inspect.signature(LOSSES.get(name)).parameters
    return tuple(p for p in params if p != "q")


def build_loss(name: str, q: int, **kwargs: Any) -> nn.Module:
    """Build the loss registered as ``name`` for embeddings of width ``q``.

    Keyword arguments set to None are dropped (the loss's default applies); an argument the
    loss does not take raises ValueError listing those it does; an unknown name raises
    KeyError listing the registered ones.

    Example:
        >>> build_loss("vicreg", q=8192, sim_coeff=25.0, chunk_size=None)  # None: dropped
        VICRegLoss(sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, eps=0.0001, q=8192)
    """
    cls = LOSSES.get(name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    accepted = loss_parameters(name)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"loss {name!r} does not take {', '.join(unknown)}; it takes {', '.join(accepted)}")
    return cls(q=q, **kwargs)


def loss_options(name: str, settings: Any) -> dict:
    """The keyword arguments of the loss ``name`` found on ``settings``, an object with one
    attribute per option (a run's ``cfg.loss``); an option absent or None keeps the loss's default."""
    return {k: getattr(settings, k) for k in loss_parameters(name) if getattr(settings, k, None) is not None}


def build_loss_from_config(settings: Any, q: int) -> nn.Module:
    """The loss ``settings.name`` with the options on ``settings`` (see `loss_options`).

    The one way a run's loss is built: by the trainer from ``cfg.loss``, and by the memory
    simulator (`sfrik_scale.planning.simulate`) from the scenario's copy of the same options.
    """
    return build_loss(settings.name, q=q, **loss_options(settings.name, settings))
