"""Element-wise hot spots fused into one pass by ``torch.compile``, with an eager fallback.

Eager PyTorch makes one pass over memory per operation. Between the matrix products, the
kernel mean evaluates a Legendre recurrence, its derivative and per-order sums on each
(n, c) Gram block (about 15 operations), and the two-view losses normalise, compare and
differentiate (n, q) embeddings (about 20 passes per view forward and backward). Inductor
turns each such chain into one loop (vectorised C++ on CPU, Triton on GPU) that reads its
inputs once and writes its outputs once; at N = 1024, q = 8192 on a CPU that is most of
the gap between the losses and their matrix-product floor (``sfrik-scale bench loss``).

When: ``SFRIK_COMPILE`` (environment, read at every call, so spawned ranks inherit it)
    ``auto`` (default): compile a pass over at least ``COMPILE_MIN_ELEMENTS`` elements,
        run smaller ones eagerly. Compiling costs seconds per process (about 4 s with
        inductor's on-disk cache warm, 20 s cold), which only large passes repay; the
        test suite's ~100 subprocesses (gloo ranks, tiny training runs) stay below it.
    ``always``: compile every size (the tests that check the compiled path use this).
    ``never``: eager only.
Eager is also used under a dispatch mode or for tensor subclasses (fake tensors of the
planner's simulation, shape recorders), and for dtypes other than fp32/fp64/bf16/fp16.

Fallback: if compiling fails (no C++ compiler, no Triton, an unsupported platform), the
call is rerun eagerly; when the eager run succeeds, one one-line RuntimeWarning says so and
the process stays eager from then on. An error the eager function raises too is the
caller's and propagates unchanged. A differentiable pass (the losses' normalisation) has its
backward compiled together with its forward, at the first call, so a failure shows there.

Numerics: the compiled loop performs the eager operations in the same order (inductor does
not reassociate), but the C++ compiler may contract a * b + c into one fused multiply-add
and reductions are split into vector lanes, so results differ from eager by rounding only
(a few ulps; the float64 reference tests hold the compiled path to the same tolerances).
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Any, Callable, Iterator, Optional

import torch

#: a pass over fewer elements (n x c of a Gram block, n x q of a view) stays eager under "auto".
#: 2^20 fp32 elements are 4 MiB, about 1 ms per eager pass on one CPU core: below that the
#: seconds a compile costs per process are not repaid within a short run.
COMPILE_MIN_ELEMENTS = 1 << 20
#: the environment variable choosing the mode: auto | always | never
MODE_ENV = "SFRIK_COMPILE"
MODES = ("auto", "always", "never")
#: distinct graphs (kernels, dtypes, shapes, grad modes) one fused function may compile
_RECOMPILE_LIMIT = 64
_FUSIBLE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

_disabled_reason: Optional[str] = None
_REGISTERED: list["Fusible"] = []


def mode() -> str:
    """The current mode from ``SFRIK_COMPILE``; a ValueError naming the variable when unknown."""
    value = os.environ.get(MODE_ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{MODE_ENV}={os.environ[MODE_ENV]!r}: expected one of {', '.join(MODES)}")
    return value


@contextlib.contextmanager
def mode_set(value: str) -> Iterator[None]:
    """Run a block under ``SFRIK_COMPILE=value`` (the benchmark's eager rows, tests)."""
    if value not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {value!r}")
    before = os.environ.get(MODE_ENV)
    os.environ[MODE_ENV] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(MODE_ENV, None)
        else:
            os.environ[MODE_ENV] = before


def disabled_reason() -> Optional[str]:
    """Why this process fell back to eager for good (None while compiling is allowed)."""
    return _disabled_reason


def wants_compile(elements: int, *tensors: torch.Tensor) -> bool:
    """Whether a pass over ``elements`` elements of ``tensors`` runs compiled now."""
    current = mode()
    if current == "never" or _disabled_reason is not None:
        return False
    if current == "auto" and elements < COMPILE_MIN_ELEMENTS:
        return False
    for t in tensors:
        if type(t) is not torch.Tensor or t.dtype not in _FUSIBLE_DTYPES:
            return False
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode() is None and not torch.compiler.is_compiling()


# Python numbers (a kernel's coefficients, q) are compile-time constants guarded by value;
# only tensor sizes are symbolic, and only where marked (args_with_dynamic_sizes). Symbolic
# floats are not safe here: torch 2.14 bakes the first value of a symbolic `alpha=` into the
# graph (a Legendre kernel compiled after another with other coefficients got the first's
# derivative; tests/test_fused.py holds this). Past the recompile limit dynamo would run
# eagerly without a word: make it an error, hence the fallback notice.
_DYNAMO_SETTINGS = dict(specialize_int=True, specialize_float=True, automatic_dynamic_shapes=False,
                        recompile_limit=_RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True)


def args_with_dynamic_sizes(args: tuple) -> tuple:
    """The arguments, each tensor replaced by a view of itself with every dimension marked
    dynamic: one graph serves every size (and inductor's on-disk cache serves other processes,
    gloo ranks, whatever their shapes); the caller's tensors are not marked."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            a = a.view(a.shape)
            for dim in range(a.ndim):
                torch._dynamo.maybe_mark_dynamic(a, dim)
        out.append(a)
    return tuple(out)


class _DropNoCudaNotice(logging.Filter):
    """torch's C++-extension helper logs "No CUDA runtime is found" on CPU-only machines the
    first time inductor imports it: true and irrelevant here, so not printed."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No CUDA runtime is found" not in record.getMessage()


class Fusible:
    """A pure tensor function run compiled for large inputs and eagerly otherwise.

    ``fn`` must not mutate its inputs (a failed compile is retried eagerly on the same
    arguments). Non-tensor arguments become compile-time constants: each distinct value
    compiles its own graph (up to 64 per function; past that, the fallback below). Tensor
    sizes are symbolic: they do not recompile, except that equal sizes among the inputs'
    dimensions and sizes 0 and 1 are specialised.

    Example:
        >>> scaled_sum = Fusible(lambda x, a: (a * x).sum(), "scaled_sum")
        >>> float(scaled_sum(torch.ones(3), 2.0, elements=3))
        6.0
    """

    def __init__(self, fn: Callable[..., Any], name: str) -> None:
        self.fn = fn
        self.name = name
        self._compiled: Optional[Callable[..., Any]] = None
        #: calls that went to the compiled function (tests check the path they force was taken)
        self.compiled_calls = 0
        _REGISTERED.append(self)

    def _compiled_fn(self) -> Callable[..., Any]:
        if self._compiled is None:
            logging.getLogger("torch.utils.cpp_extension").addFilter(_DropNoCudaNotice())
            self._compiled = torch.compile(self.fn, fullgraph=True)
        return self._compiled

    def __call__(self, *args: Any, elements: int, **kwargs: Any) -> Any:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if not wants_compile(elements, *tensors):
            return self.fn(*args, **kwargs)
        try:
            with torch._dynamo.config.patch(**_DYNAMO_SETTINGS):
                result = self._compiled_fn()(*args_with_dynamic_sizes(args), **kwargs)
        except Exception as err:  # a compile failure, or an error eager raises as well
            result = self.fn(*args, **kwargs)  # raises the caller's error if it is one
            _disable(self.name, err)
            return result
        self.compiled_calls += 1
        return result


def compiled_calls() -> int:
    """Calls to compiled functions so far in this process, over every ``Fusible``."""
    return sum(f.compiled_calls for f in _REGISTERED)


def _disable(name: str, err: BaseException) -> None:
    global _disabled_reason
    if _disabled_reason is not None:
        return
    first = (str(err).strip().splitlines() or [""])[0][:200]
    _disabled_reason = f"{type(err).__name__}: {first}"
    warnings.warn(f"sfrik_scale: torch.compile failed for {name} ({_disabled_reason}); running element-wise "
                  f"passes eagerly from now on (slower, same results; {MODE_ENV}=never silences this)",
                  RuntimeWarning, stacklevel=3)


def reset() -> None:
    """Forget an earlier compile failure (tests)."""
    global _disabled_reason
    _disabled_reason = None
