"""What every evaluation command sets up first: output folder, monitor, backbone, labelled splits.

`prepare` is called on every rank with the same arguments; it loads the backbone (the same
weights everywhere), builds the train split (restricted to the labelled subset) and the
val split, and describes them for the result file. Rank 0 writes the labelled subset it
used to ``OUT/labelled_subset.txt``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from torch import nn
from torch.utils.data import Dataset

from ..monitor import Monitor
from ..topology import Topology
from .common import print_header
from .data import EvalDataSpec, num_classes_of
from .source import BackboneSource, load_backbone
from .subsets import LabelSubset, dataset_labels, write_subset_file

SUBSET_FILE = "labelled_subset.txt"


@dataclass
class EvalSetup:
    """Everything a command needs once `prepare` has run."""

    kind: str
    topo: Topology
    out_dir: Path
    monitor: Monitor
    source: BackboneSource
    backbone: nn.Module
    feature_dim: int
    spec: EvalDataSpec
    train_base: Dataset
    val_base: Optional[Dataset]
    train_indices: Optional[np.ndarray]   # the labelled subset (None: all)
    num_classes: int
    data: dict = field(default_factory=dict)  # description for the result file

    @property
    def console(self):
        return self.monitor.console


def open_backbone(source: BackboneSource, out_dir: Path, topo: Topology, *, seed: int = 0, progress: bool = True,
                  tensorboard: bool = True, image_size: Optional[int] = None):
    """The output folder (made on rank 0), the monitor and the frozen backbone on this rank's
    device: (out_dir, monitor, backbone, feature_dim). Shared by every evaluation command."""
    out_dir = Path(out_dir)
    if topo.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    monitor = Monitor(out_dir, topo.is_main, tensorboard=tensorboard, progress=progress)
    backbone, feature_dim = load_backbone(source, seed=seed, image_size=image_size)
    backbone.to(topo.device)
    return out_dir, monitor, backbone, feature_dim


def prepare(kind: str, source: BackboneSource, spec: EvalDataSpec, out_dir: Path, topo: Topology, *,
            subset: Optional[LabelSubset] = None, seed: int = 0, progress: bool = True, tensorboard: bool = True,
            benchmark: Optional[str] = None, need_val: bool = True, header: tuple = ()) -> EvalSetup:
    """Build the backbone and the labelled splits; print the header on rank 0."""
    out_dir, monitor, backbone, feature_dim = open_backbone(source, out_dir, topo, seed=seed, progress=progress,
                                                            tensorboard=tensorboard, image_size=spec.image_size)
    train_base = spec.build("train")
    val_base = spec.build("val") if need_val else None
    subset = subset or LabelSubset()
    indices = subset.select(train_base)
    labels = dataset_labels(train_base)
    num_classes = num_classes_of(train_base, labels)
    if topo.is_main and indices is not None:
        write_subset_file(out_dir / SUBSET_FILE, train_base, indices)
    labelled = len(train_base) if indices is None else len(indices)
    data = {**spec.describe(), "benchmark": benchmark or spec.benchmark_name(),
            "transfer": not spec.same_data_as(source.pretrain), "num_classes": num_classes,
            "train_images": len(train_base), "labelled_images": labelled,
            "labelled_fraction": labelled / max(len(train_base), 1),
            "val_images": len(val_base) if val_base is not None else None, **subset.describe()}
    setup = EvalSetup(kind, topo, out_dir, monitor, source, backbone, feature_dim, spec, train_base, val_base,
                      indices, num_classes, data)
    print_header(monitor.console, f"sfrik-scale {kind}", [
        ("backbone", f"{source.label()} (features {feature_dim})"),
        ("data", f"{spec.dataset} '{data['benchmark']}': {labelled} labelled of {len(train_base)} train images"
                 + (f", {len(val_base)} val" if val_base is not None else "") + f", {num_classes} classes, "
                 f"{spec.image_size} px" + (" (transfer)" if data["transfer"] else "")),
        ("processes", f"{topo.world_size} ({topo.launcher}), device {topo.device}"),
        ("output", str(out_dir)),
        *header,
    ])
    return setup
