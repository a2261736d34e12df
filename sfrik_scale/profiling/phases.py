"""Phase markers in the training loop; the no-op default costs one attribute lookup.

The trainer wraps each phase of a step in ``with profiler.phase(name):`` (names in
``PHASES``) and calls ``profiler.attach(model)`` once, so that a real profiler can add
module hooks (backbone and projector forward); ``profiler.end_step(step)`` closes a step.
`sfrik_scale.profiling.step.build_profiler` chooses between `NullProfiler` and the real one.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

PHASES = ("data", "backbone_forward", "projector_forward", "loss", "backward", "optimizer_step")


class NullProfiler:
    """Profiling switched off (the default): every call does nothing."""

    enabled = False

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        yield

    def attach(self, model: Any) -> None:
        pass

    def end_step(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass
