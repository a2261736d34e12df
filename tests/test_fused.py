"""sfrik_scale.fused: when a pass runs compiled, and the eager fallback when compiling fails.
(The compiled kernels and losses themselves are checked against the float64 references in
test_kernels, test_gram and test_losses, on both paths.)"""
from __future__ import annotations

import warnings

import pytest
import torch

from sfrik_scale import fused


def _scaled_sum(x: torch.Tensor, a: float) -> torch.Tensor:
    return (a * x).sum()


@pytest.fixture
def fusible(monkeypatch):
    monkeypatch.delenv(fused.MODE_ENV, raising=False)
    fused.reset()
    yield fused.Fusible(_scaled_sum, "a test pass")
    fused.reset()


def test_mode_defaults_to_auto_and_rejects_an_unknown_value(monkeypatch):
    monkeypatch.delenv(fused.MODE_ENV, raising=False)
    assert fused.mode() == "auto"
    monkeypatch.setenv(fused.MODE_ENV, " Never ")
    assert fused.mode() == "never"
    monkeypatch.setenv(fused.MODE_ENV, "yes")
    with pytest.raises(ValueError, match="SFRIK_COMPILE='yes'"):
        fused.mode()


def test_auto_compiles_only_passes_of_at_least_the_threshold(fusible):
    x = torch.arange(4.0)
    assert float(fusible(x, 2.0, elements=fused.COMPILE_MIN_ELEMENTS - 1)) == 12.0
    assert fusible.compiled_calls == 0
    assert float(fusible(x, 2.0, elements=fused.COMPILE_MIN_ELEMENTS)) == 12.0
    assert fusible.compiled_calls == 1


def test_always_compiles_every_size_and_never_none(fusible, monkeypatch):
    x = torch.arange(4.0)
    with fused.mode_set("never"):
        fusible(x, 2.0, elements=10**9)
    assert fusible.compiled_calls == 0
    with fused.mode_set("always"):
        assert float(fusible(x, 3.0, elements=1)) == 18.0
    assert fusible.compiled_calls == 1
    assert fused.mode() == "auto"  # mode_set restored the environment


def test_other_dtypes_dispatch_modes_and_tensor_subclasses_stay_eager(fusible):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with fused.mode_set("always"):
        fusible(torch.arange(4), 2.0, elements=4)  # an integer tensor
        with Passthrough():
            fusible(torch.arange(4.0), 2.0, elements=4)
        fusible(torch.nn.Parameter(torch.arange(4.0)), 2.0, elements=4)  # a subclass
    assert fusible.compiled_calls == 0


def test_a_compile_failure_runs_eagerly_with_one_notice_and_stays_eager(fusible, monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no C++ compiler found\nsecond line")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    x = torch.arange(4.0)
    with fused.mode_set("always"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert float(fusible(x, 2.0, elements=4)) == 12.0  # the eager result
        assert float(fusible(x, 2.0, elements=4)) == 12.0
    notices = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(notices) == 1 and "\n" not in str(notices[0].message)
    assert "a test pass" in str(notices[0].message) and "no C++ compiler found" in str(notices[0].message)
    assert fused.disabled_reason() == "RuntimeError: no C++ compiler found"
    assert fusible.compiled_calls == 0 and not fused.wants_compile(10**9, x)


def test_an_error_the_eager_function_raises_too_propagates_and_keeps_compiling(fusible):
    with fused.mode_set("always"):
        with pytest.raises((TypeError, RuntimeError)):
            fusible("not a tensor", 2.0, elements=4)
    assert fused.disabled_reason() is None
