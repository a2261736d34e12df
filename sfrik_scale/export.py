"""``sfrik-scale export RUN_DIR``: the fp32 backbone and projector weights of a run, from any ZeRO stage.

``backbone.pt`` loads into the torchvision model (only the classification head missing),
``projector.pt`` into the projector, and ``export.json`` says which checkpoint they came from
and how to load them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch

from .checkpoint import consolidated_state_dict, step_of
from .config import Config
from .models import BACKBONES, backbone_state_dict_for_torchvision
from .storage import atomic_write_text


def export_run(run_dir: Union[str, Path], out_dir: Optional[Union[str, Path]] = None,
               tag: Optional[str] = None) -> dict:
    """Write ``backbone.pt`` (loads into the torchvision model with load_state_dict, only the
    classification head missing), ``projector.pt`` and ``export.json`` into ``out_dir``
    (default ``RUN_DIR/export``). Returns the export description."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a pretraining run directory (no config.yaml)")
    cfg = Config.load(run_dir)
    state, tag = consolidated_state_dict(run_dir, tag)
    out = Path(out_dir) if out_dir is not None else run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    projector = {k[len("projector."):]: v for k, v in state.items() if k.startswith("projector.")}
    if not backbone or not projector:
        raise ValueError(f"checkpoint {tag} holds no backbone./projector. weights (keys: {list(state)[:5]}...)")
    torch.save(backbone_state_dict_for_torchvision(backbone), out / "backbone.pt")
    torch.save(projector, out / "projector.pt")
    name = cfg.model.backbone
    how = (f"sfrik_scale.models.build_backbone({name!r})[0].load_state_dict(torch.load('backbone.pt'))"
           if name in BACKBONES else
           f"torchvision.models.get_model({name!r}, weights=None)"
           ".load_state_dict(torch.load('backbone.pt'), strict=False)  # only the head is missing")
    info = {"run_dir": str(run_dir), "tag": tag, "step": step_of(tag), "backbone": name,
            "projector": cfg.model.projector, "files": {"backbone": "backbone.pt", "projector": "projector.pt"},
            "load": how}
    atomic_write_text(out / "export.json", json.dumps(info, indent=2) + "\n")
    return info


def add_commands(subparsers) -> None:
    """``sfrik-scale export RUN_DIR``."""
    export = subparsers.add_parser("export", help="fp32 backbone and projector weights of a run (any ZeRO stage)")
    export.add_argument("run_dir", help="the pretraining run directory")
    export.add_argument("--tag", default=None, help="checkpoint tag (default: the latest complete one)")
    export.add_argument("--out", default=None, help="output folder (default: RUN_DIR/export)")

    def handler(args, extra) -> int:
        print(json.dumps(export_run(args.run_dir, args.out, args.tag), indent=2))
        return 0

    export.set_defaults(handler=handler)
