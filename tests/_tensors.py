"""Test helper: the largest tensor an operation creates (for "never holds a q x q tensor" checks)."""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _Largest(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def largest_tensor_numel(fn: Callable[[], object]) -> int:
    """Elements of the largest tensor any aten operation returns while ``fn()`` runs."""
    with _Largest() as rec:
        fn()
    return rec.largest
