"""Test helper: run a test on both paths of sfrik_scale.fused, eager and compiled (torch.compile
forced at every size with SFRIK_COMPILE=always), and check that the forced path was taken.

Tolerances do not change with the path: the compiled loops perform the eager operations in
the same order, up to fused multiply-adds and vector-lane partial sums (a few ulps), far
inside the float64 references' rel 1e-10..1e-12 and the low-precision tests' 1e-3..1e-2.
"""
from __future__ import annotations

import os

import pytest

from sfrik_scale import fused

PATHS = ("eager", "compiled")
MODE = {"eager": "never", "compiled": "always"}


def use_path(path: str) -> None:
    """In a spawned rank: take ``path`` for the rest of the process."""
    os.environ[fused.MODE_ENV] = MODE[path]


def path_report() -> tuple[int, object]:
    """(compiled calls so far, the fallback's reason or None): what a rank reports back."""
    return fused.compiled_calls(), fused.disabled_reason()


def check_path(path: str, report: tuple[int, object], before: int = 0) -> None:
    calls, reason = report
    if path == "compiled":
        assert reason is None, f"compiling failed, the test ran eagerly: {reason}"
        assert calls > before, "the compiled path was forced but not taken"
    else:
        assert calls == before, "the eager path ran compiled code"


class Path(str):
    """"eager" or "compiled"; a test whose case has no fusible pass (a degree-1 kernel, a loss
    without one, input rejected before any pass) sets ``expect_compiled = False``."""

    expect_compiled = True


@pytest.fixture(params=PATHS)
def fused_path(request, monkeypatch):
    """The test runs once eagerly and once with every fusible pass compiled; afterwards, the
    compiled run must have run compiled code (and no fallback), the eager one none."""
    monkeypatch.setenv(fused.MODE_ENV, MODE[request.param])
    before = fused.compiled_calls()
    path = Path(request.param)
    yield path
    if path.expect_compiled:
        check_path(path, path_report(), before)
    assert fused.disabled_reason() is None, f"compiling failed, the test ran eagerly: {fused.disabled_reason()}"
