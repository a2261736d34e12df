"""Why a part cannot run on this machine (one line), or None: checked in the parent, cheaply."""
from __future__ import annotations

from importlib.util import find_spec
from typing import Optional


def no_cuda() -> Optional[str]:
    import torch

    if not torch.cuda.is_available():
        return f"no CUDA device (torch {torch.__version__})"
    return None


def deepspeed_missing() -> Optional[str]:
    return None if find_spec("deepspeed") is not None else \
        "DeepSpeed is not importable (scripts/prepare-gpu-carry builds its wheel)"


def dali_skip() -> Optional[str]:
    reason = no_cuda()
    if reason is not None:
        return reason
    try:
        missing = find_spec("nvidia") is None or find_spec("nvidia.dali") is None
    except (ImportError, ValueError):
        missing = True
    if missing:
        return ("DALI is not importable (its 198 MB wheel cannot travel to the lent machine; "
                "run this part on your own GPU with nvidia-dali installed)")
    return None
