"""Test-only entry point of tests/test_elastic.py: ``sfrik_scale.pretrain`` with two additions.

* A backbone without BatchNorm, ``elastic_test_cnn`` (with a one-layer projector, ``model.projector=Q``,
  the model has no BatchNorm at all). On CPU BatchNorm statistics are per rank (SyncBatchNorm is
  CUDA-only), so a model with BatchNorm trains differently on 1, 2 and 3 ranks; without it the
  trajectory is the same on any number of ranks, which is what makes an elastic resume checkable.
* Each rank writes the dataset keys ``(epoch, index)`` it loaded, in order, to
  ``RUN_DIR/samples/<ELASTIC_RUN_LABEL>_rank<r>.json`` when the run ends (torchvision loader,
  ``data.num_workers=0``: nothing is prefetched, so a key loaded is a key trained on).

    python -m tests._elastic_entry OVERRIDES...
    deepspeed --num_gpus N --module tests._elastic_entry OVERRIDES...
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from torch import nn

from sfrik_scale import pretrain
from sfrik_scale.data import TwoViewDataset
from sfrik_scale.models import register_backbone

FEATURES = 32


class PlainCNN(nn.Module):
    """Two strided convolutions with ReLU, global average pooling: (batch, 3, H, W) -> (batch, 32)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.Conv2d(16, FEATURES, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.net(x)


@register_backbone("elastic_test_cnn")
def _plain_cnn():
    return PlainCNN(), FEATURES


def main(argv: list[str]) -> int:
    keys: list = []
    original = TwoViewDataset.__getitem__

    def recording_getitem(self, key):
        keys.append(list(key) if isinstance(key, tuple) else [0, int(key)])
        return original(self, key)

    TwoViewDataset.__getitem__ = recording_getitem
    try:
        return pretrain.main(argv)
    finally:
        run_dir = next((a.split("=", 1)[1] for a in argv if a.startswith("train.run_dir=")), None)
        if run_dir is not None and Path(run_dir).is_dir():
            folder = Path(run_dir) / "samples"
            folder.mkdir(exist_ok=True)
            name = f"{os.environ.get('ELASTIC_RUN_LABEL', 'run')}_rank{os.environ.get('RANK', '0')}.json"
            (folder / name).write_text(json.dumps(keys))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
