"""The SFRIK paper's published memory figures: reference values shown next to ours.

Zheng, Puy, Riccietti, Pérez, Gribonval, "Self-supervised learning with rotation-invariant
kernels", ICLR 2023: ResNet-50, projector 8192-8192-32768, fp16 autocast, LARS, DDP over 8
GPUs of 32 GB, batch sizes global; ``torch.cuda.max_memory_allocated`` on one GPU, reset at
every step and printed in MB of 10^6 bytes by the official code (``// 1e6``), so GB here are
10^9 bytes. Used for display and comparison only: nothing in the simulator is derived from
them.
"""
from __future__ import annotations

#: the methods of the paper's memory comparison, in its column order
PAPER_METHODS = ("vicreg", "sfrik")
#: (q, global batch) -> {method: GB per GPU} (Table of the paper's memory comparison)
PAPER_MEMORY_GB = {
    (32768, 256): {"vicreg": 22.5, "sfrik": 10.3},
    (32768, 512): {"vicreg": 25.4, "sfrik": 13.1},
    (32768, 1024): {"vicreg": 31.1, "sfrik": 18.8},
}
#: (q, global batch) -> relative memory saving of SFRIK over VICReg stated in the text
PAPER_SAVINGS = {(16384, 2048): 0.08}
#: the setting of the paper's runs
PAPER_SETTING = {"backbone": "resnet50", "hidden": "8192-8192", "world_size": 8, "image_size": 224,
                 "gpu_memory_gb": 32}


def paper_gb(method: str, q: int, global_batch: int) -> float | None:
    """The paper's figure for this method and configuration, or None."""
    return PAPER_MEMORY_GB.get((q, global_batch), {}).get(method)
