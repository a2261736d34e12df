"""Where the evaluated backbone comes from: a pretraining run, an export, or a random initialisation.

A source is one of
- a pretraining run directory (``config.yaml`` + ``checkpoints/``): the latest complete
  checkpoint (or ``tag``), consolidated to fp32 from any ZeRO stage by
  `sfrik_scale.checkpoint.consolidated_state_dict`;
- an export directory (``backbone.pt`` + ``export.json``, from ``sfrik-scale export``) or
  the ``backbone.pt`` file itself (then ``backbone=`` names the architecture unless an
  ``export.json`` sits next to it);
- with ``random_init=True``, any of those only for its architecture: the weights are a
  fresh, seeded initialisation (the baseline every SSL method must beat);
- with ``raw_pixels=True``, no network at all: the "features" are the flattened input image
  at the evaluation resolution (3 x S x S values, normalised like the network's input),
  the other baseline every SSL method must beat.

`BackboneSource.to_dict()` is stored in every result file; its ``pretrain`` entry (method,
q, L, epochs, ...) is what ``sfrik-scale report`` tabulates.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from torch import nn

from ..checkpoint import consolidated_state_dict, latest_complete, step_of
from ..losses import LOSS_SPECS
from ..models import build_backbone

EXPORT_INFO = "export.json"
BACKBONE_FILE = "backbone.pt"
RUN_CONFIG = "config.yaml"


@dataclass
class BackboneSource:
    """A resolved source (nothing loaded yet)."""

    path: str
    kind: str                      # "run", "export" or "file"
    backbone: str                  # architecture name for sfrik_scale.models.build_backbone
    run_dir: Optional[str] = None  # the pretraining run, when known
    tag: Optional[str] = None      # checkpoint tag, when known
    step: Optional[int] = None     # optimiser steps of that checkpoint
    random_init: bool = False
    raw_pixels: bool = False       # the flattened input instead of a network
    pretrain: dict = field(default_factory=dict)  # see pretrain_summary

    def to_dict(self) -> dict:
        return asdict(self)

    def label(self) -> str:
        """Short human description for headers."""
        if self.raw_pixels:
            return "raw pixels (the flattened input image)"
        if self.random_init:
            return f"{self.backbone}, random initialisation"
        where = f"{self.tag}" if self.tag else Path(self.path).name
        return f"{self.backbone} from {self.kind} {self.path} ({where})"


def read_run_config(run_dir: str | Path) -> dict:
    """The raw resolved config of a pretraining run (plain YAML, so that configs written by
    older or newer versions still describe themselves); {} when there is none."""
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        return {}
    raw = yaml.safe_load(path.read_text())
    return raw if isinstance(raw, dict) else {}


def pretrain_summary(raw: dict) -> dict:
    """What the comparison table needs from a run config: method, q, L, coefficients, epochs, data."""
    model, loss = raw.get("model") or {}, raw.get("loss") or {}
    data, train = raw.get("data") or {}, raw.get("train") or {}
    projector = str(model.get("projector", ""))
    q = int(projector.split("-")[-1]) if projector and projector.split("-")[-1].isdigit() else None
    method = loss.get("name")
    coeffs = list(loss.get("coeffs") or [])
    legendre = method in LOSS_SPECS and LOSS_SPECS[method].option("coeffs") is not None  # L: SFRIK's degree
    return {"method": method, "q": q, "L": len(coeffs) if legendre and coeffs else None,
            "coeffs": coeffs if legendre else None, "projector": projector or None,
            "epochs": train.get("epochs"), "max_steps": train.get("max_steps"),
            "global_batch_size": train.get("global_batch_size"), "seed": train.get("seed"),
            "dataset": data.get("dataset"), "path": data.get("path"), "image_size": data.get("image_size"),
            "num_classes": data.get("num_classes"), "synthetic_size": data.get("synthetic_size")}


def resolve_source(path: str | Path, tag: Optional[str] = None, backbone: Optional[str] = None,
                   random_init: bool = False, raw_pixels: bool = False) -> BackboneSource:
    """Identify ``path`` (see the module docstring); raises FileNotFoundError/ValueError on bad input."""
    if random_init and raw_pixels:
        raise ValueError("--random-init and --raw-pixels are two different baselines; give one")
    source = _resolve(Path(path).resolve(), tag, backbone, random_init or raw_pixels)
    if raw_pixels:
        source.random_init, source.raw_pixels, source.tag, source.step = False, True, None, None
    return source


def _resolve(p: Path, tag: Optional[str], backbone: Optional[str], random_init: bool) -> BackboneSource:
    if p.is_dir() and (p / RUN_CONFIG).is_file():
        raw = read_run_config(p)
        name = backbone or (raw.get("model") or {}).get("backbone")
        if not name:
            raise ValueError(f"{p / RUN_CONFIG} names no model.backbone; pass --backbone")
        if tag is None and not random_init:
            tag = latest_complete(p)
            if tag is None:
                raise FileNotFoundError(f"no complete checkpoint in {p / 'checkpoints'} (pass --random-init "
                                        "to evaluate the architecture with random weights)")
        return BackboneSource(str(p), "run", name, run_dir=str(p), tag=tag, step=step_of(tag) if tag else None,
                              random_init=random_init, pretrain=pretrain_summary(raw))
    if p.is_dir() and (p / BACKBONE_FILE).is_file():
        return _export_source(p / BACKBONE_FILE, p / EXPORT_INFO, backbone, random_init, kind="export")
    if p.is_file():
        return _export_source(p, p.parent / EXPORT_INFO, backbone, random_init, kind="file")
    if p.is_dir():
        raise FileNotFoundError(f"{p} is neither a pretraining run directory (config.yaml) nor an export "
                                f"directory ({BACKBONE_FILE} + {EXPORT_INFO})")
    raise FileNotFoundError(f"source {p} does not exist")


def _export_source(weights: Path, info_path: Path, backbone: Optional[str], random_init: bool,
                   kind: str) -> BackboneSource:
    info: dict[str, Any] = json.loads(info_path.read_text()) if info_path.is_file() else {}
    name = backbone or info.get("backbone")
    if not name:
        raise ValueError(f"{weights}: no {EXPORT_INFO} next to it names the architecture; pass --backbone NAME")
    run_dir = info.get("run_dir")
    raw = read_run_config(run_dir) if run_dir and Path(run_dir).is_dir() else {}
    summary = pretrain_summary(raw) if raw else pretrain_summary({"model": {"projector": info.get("projector", "")}})
    return BackboneSource(str(weights if kind == "file" else weights.parent), kind, name, run_dir=run_dir,
                          tag=info.get("tag"), step=info.get("step"), random_init=random_init, pretrain=summary)


def load_backbone(source: BackboneSource, seed: int = 0, image_size: Optional[int] = None) -> tuple[nn.Module, int]:
    """``(backbone, feature_dim)`` with the source's weights (fp32, CPU), or a seeded random init,
    or (``raw_pixels``) ``nn.Flatten`` with feature_dim 3 x image_size^2.

    The parameters are identical on every rank: loaded from the same file, or drawn from
    the same seed.
    """
    if source.raw_pixels:
        if not image_size or image_size < 1:
            raise ValueError(f"raw pixels need the evaluation image size, got {image_size!r}")
        return nn.Flatten(), 3 * image_size * image_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module, feature_dim = build_backbone(source.backbone)
    if source.random_init:
        return module, feature_dim
    if source.kind == "run":
        state, _ = consolidated_state_dict(source.run_dir, source.tag)
        weights = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        if not weights:
            raise ValueError(f"checkpoint {source.tag} of {source.run_dir} holds no backbone.* weights")
    else:
        path = Path(source.path)
        path = path / BACKBONE_FILE if path.is_dir() else path
        weights = torch.load(path, map_location="cpu", weights_only=True)
    missing, unexpected = module.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"weights of {source.path} do not fit backbone {source.backbone!r}: "
                         f"missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}")
    return module, feature_dim
