"""Exact tensor-byte accounting: a dispatch-level tracker with nested peak scopes.

:class:`TensorByteTracker` is a ``TorchDispatchMode`` that sees every tensor an ATen op
returns, counts each new storage once (views and in-place results share their base's
storage and cost nothing) and forgets it when the storage is freed (a weak reference
callback). It works on real tensors (CPU runs, where process RSS would mix in the
allocator's caches, libraries and the interpreter) and on fake tensors
(``torch._subclasses.FakeTensorMode``), where nothing is allocated at all: that is how the
simulator measures a step of a model that does not fit in this machine.

Peaks are kept per *scope*: :meth:`TensorByteTracker.scope` opens a window whose peak is
the largest live total seen while it is open, and scopes nest (a module inside a phase inside
a step). With ``round_to=512`` sizes are rounded up as the CUDA caching allocator rounds its
blocks, so fake CUDA runs predict ``torch.cuda.max_memory_allocated``.

Storages that exist before the tracker starts (parameters, optimizer state, engine buffers)
are invisible to it until registered with :meth:`TensorByteTracker.track`;
:func:`live_tensors` lists every tensor the garbage collector can see, for that purpose.

Example:
    >>> tracker = TensorByteTracker()
    >>> with tracker, tracker.scope() as s:
    ...     a = torch.empty(1024, dtype=torch.float32)     # 4 KiB
    ...     b = a.view(32, 32)                             # a view: no new storage
    ...     del a, b
    >>> s.peak, tracker.current
    (4096, 0)
"""
from __future__ import annotations

import contextlib
import gc
import math
import warnings
import weakref
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterable, Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

#: the CUDA caching allocator rounds every block up to a multiple of this (kMinBlockSize)
CUDA_BLOCK_BYTES = 512
_TO_COPY = torch.ops.aten._to_copy.default


@dataclass
class Scope:
    """A window of a :class:`TensorByteTracker`: ``start`` bytes live when it opened,
    ``peak`` the largest live total while it was open, ``end`` when it closed."""

    name: str = ""
    start: int = 0
    peak: int = 0
    end: int = 0
    #: live bytes per category at the scope's peak (kept only when opened with snapshot=True)
    at_peak: Optional[dict] = None

    @property
    def extra(self) -> int:
        """Peak bytes above what was live when the scope opened."""
        return self.peak - self.start


@dataclass
class _Entry:
    nbytes: int
    category: str
    weak: int = 0                           # c10 weak pointer to the StorageImpl
    pyref: Any = field(default=None, repr=False)  # weak reference to its Python object


class TensorByteTracker(TorchDispatchMode):
    """Count the bytes of every tensor storage created while the mode is active.

    Args:
        round_to: round each storage up to a multiple of this many bytes (512 mimics the
            CUDA caching allocator; 1 counts exact bytes).
        device_type: only count storages on this device type ("cpu", "cuda"); None: all.

    Attributes:
        current: bytes of tracked storages alive now.
        peak: the largest ``current`` seen since the tracker was created (or :meth:`reset_peak`).
        by_category: live bytes per category (the ``category`` given to :meth:`track`, or the
            tracker's ``default_category`` at the time an op created the storage).

    How a release is detected: a storage's Python object dies with the last Python tensor
    using it, but the storage itself may live on inside C++ (tensors saved for backward, the
    autocast weight cache). So the Python object's death only makes the storage a suspect;
    a weak reference to the C++ StorageImpl tells when it is really gone, checked before any
    peak can be recorded and whenever ``current`` is read.

    Note: storages resized in place through ``UntypedStorage.resize_`` (ZeRO-3 parameter
    release) are seen the next time an op returns them, not at the resize itself.
    """

    def __init__(self, round_to: int = 1, device_type: Optional[str] = None) -> None:
        super().__init__()
        self.round_to = max(1, int(round_to))
        self.device_type = device_type
        self._current = 0
        self.peak = 0
        self.by_category: dict[str, int] = {}
        #: the largest live bytes each category reached (since creation or reset_category_peaks)
        self.category_peaks: dict[str, int] = {}
        self.default_category = "activations"
        self._entries: dict[int, _Entry] = {}
        self._suspects: set[int] = set()
        self._open: list[Scope] = []

    # ------------------------------------------------------------------ bookkeeping
    @property
    def current(self) -> int:
        self._purge()
        return self._current

    def _size(self, nbytes: int) -> int:
        return int(math.ceil(nbytes / self.round_to) * self.round_to) if nbytes else 0

    def _add_tensor(self, t: torch.Tensor, category: Optional[str] = None) -> None:
        if self.device_type is not None and t.device.type != self.device_type:
            return
        try:
            storage = t.untyped_storage()
            key = storage._cdata
        except (RuntimeError, NotImplementedError, TypeError, AttributeError):  # sparse, nested, opaque
            return
        nbytes = self._size(storage.nbytes())
        entry = self._entries.get(key)
        if entry is not None and key in self._suspects:
            if torch.UntypedStorage._expired(entry.weak):  # a new storage at a freed address
                self._release(key)
                entry = None
            else:  # the same storage, back in Python: watch its new Python object
                self._suspects.discard(key)
                entry.pyref = weakref.ref(storage, partial(_on_pyobj_death, weakref.ref(self), key))
        if entry is not None:
            if entry.nbytes != nbytes:  # resized in place (an out= op, resize_)
                self._change(entry.category, nbytes - entry.nbytes)
                entry.nbytes = nbytes
            return
        entry = _Entry(nbytes, category or self.default_category, storage._weak_ref())
        entry.pyref = weakref.ref(storage, partial(_on_pyobj_death, weakref.ref(self), key))
        self._entries[key] = entry
        self._change(entry.category, nbytes)

    def _release(self, key: int) -> None:
        entry = self._entries.pop(key, None)
        self._suspects.discard(key)
        if entry is not None:
            torch.UntypedStorage._free_weak_ref(entry.weak)
            self._current -= entry.nbytes
            self.by_category[entry.category] -= entry.nbytes

    def _purge(self) -> None:
        if self._suspects:
            # a snapshot: weak-reference callbacks may add suspects meanwhile (other threads too)
            for key in list(self._suspects):
                entry = self._entries.get(key)
                if entry is None or torch.UntypedStorage._expired(entry.weak):
                    self._release(key)

    def _change(self, category: str, delta: int) -> None:
        if delta > 0:
            self._purge()  # releases must be known before a peak is recorded
        self._current += delta
        self.by_category[category] = self.by_category.get(category, 0) + delta
        if delta > 0:
            if self.by_category[category] > self.category_peaks.get(category, 0):
                self.category_peaks[category] = self.by_category[category]
            if self._current > self.peak:
                self.peak = self._current
            for scope in self._open:
                if self._current > scope.peak:
                    scope.peak = self._current
                    if scope.at_peak is not None:
                        scope.at_peak = {k: v for k, v in self.by_category.items() if v}

    def __del__(self) -> None:
        for entry in self._entries.values():
            try:
                torch.UntypedStorage._free_weak_ref(entry.weak)
            except Exception:  # interpreter shutdown
                pass
        self._entries.clear()

    # ------------------------------------------------------------------ public API
    def track(self, *objects: Any, category: str = "model") -> None:
        """Count tensors that already exist: tensors, modules (parameters, their gradients,
        buffers), optimizers (their state and parameters), or iterables of those."""
        for obj in objects:
            for t in _tensors_of(obj):
                self._add_tensor(t, category)

    def retag(self, t: torch.Tensor, category: str) -> None:
        """File the storage of ``t`` (tracked or not yet) under ``category`` from now on."""
        self._add_tensor(t, category)  # registers it if new (or a new storage at a freed address)
        try:
            key = t.untyped_storage()._cdata
        except (RuntimeError, NotImplementedError, TypeError, AttributeError):
            return
        entry = self._entries.get(key)
        if entry is None:
            return
        elif entry.category != category:
            self.by_category[entry.category] -= entry.nbytes
            self.by_category[category] = self.by_category.get(category, 0) + entry.nbytes
            entry.category = category

    def reset_category_peaks(self) -> None:
        """Restart :attr:`category_peaks` from the bytes live now."""
        self._purge()
        self.category_peaks = {k: v for k, v in self.by_category.items() if v}

    def reset_peak(self) -> None:
        """Start a new peak window for :attr:`peak` (open scopes keep theirs)."""
        self.peak = self.current

    @contextlib.contextmanager
    def scope(self, name: str = "", snapshot: bool = False) -> Iterator[Scope]:
        """A nested peak window; the yielded Scope is filled in as the block runs."""
        scope = self.open_scope(name, snapshot)
        try:
            yield scope
        finally:
            self.close_scope(scope)

    def open_scope(self, name: str = "", snapshot: bool = False) -> Scope:
        """Open a peak window (close it with :meth:`close_scope`; windows may overlap).
        With ``snapshot``, the scope also keeps the per-category bytes at its peak."""
        scope = Scope(name, self.current, self.current)
        if snapshot:
            scope.at_peak = {k: v for k, v in self.by_category.items() if v}
        self._open.append(scope)
        return scope

    def close_scope(self, scope: Scope) -> Scope:
        scope.end = self.current
        if scope in self._open:
            self._open.remove(scope)
        return scope

    @contextlib.contextmanager
    def category(self, name: str) -> Iterator[None]:
        """Attribute storages created in the block to ``name`` (e.g. "optimizer_state")."""
        previous, self.default_category = self.default_category, name
        try:
            yield
        finally:
            self.default_category = previous

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        category = None
        if func is _TO_COPY and args and isinstance(args[0], torch.Tensor) and args[0].is_leaf \
                and args[0].requires_grad:
            category = "weight_copies"  # a cast of a parameter (autocast's cached fp16 weights)
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if outputs:
            # views and in-place results share an input's storage: nothing was allocated (and an
            # input created before tracking began must not be counted now)
            inputs = {_cdata(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
            for t in outputs:
                if _cdata(t) not in inputs:
                    self._add_tensor(t, category)
        return out


def _cdata(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError, TypeError, AttributeError):
        return -1


def _on_pyobj_death(tracker_ref: "weakref.ref", key: int, _: Any) -> None:
    tracker = tracker_ref()
    if tracker is not None and key in tracker._entries:
        tracker._suspects.add(key)


def _tensors_of(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
        if obj.grad is not None:
            yield obj.grad
    elif isinstance(obj, torch.nn.Module):
        for p in obj.parameters():
            yield from _tensors_of(p)
        yield from obj.buffers()
    elif isinstance(obj, torch.optim.Optimizer):
        for group in obj.param_groups:
            for p in group["params"]:
                yield from _tensors_of(p)
        for state in obj.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_of(v)
    elif isinstance(obj, Iterable) and not isinstance(obj, (str, bytes)):
        for v in obj:
            yield from _tensors_of(v)


def live_tensors(device_type: Optional[str] = None) -> list[torch.Tensor]:
    """Every tensor object the garbage collector can reach (one per storage), and the
    gradients of those that are leaves. Tensors held only inside C++ (autograd's saved
    tensors) are not among them; at a step boundary there are none of those."""
    seen: set[int] = set()
    found: list[torch.Tensor] = []
    with warnings.catch_warnings():  # isinstance() on deprecated module attributes warns
        warnings.simplefilter("ignore")
        objects = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in objects:
        for t in (obj, obj.grad if obj.is_leaf else None):
            if t is None or (device_type is not None and t.device.type != device_type):
                continue
            try:
                key = t.untyped_storage()._cdata
            except (RuntimeError, NotImplementedError, TypeError, AttributeError):
                continue
            if key not in seen:
                seen.add(key)
                found.append(t)
    return found


def storage_bytes(tensors: Iterable[torch.Tensor], round_to: int = 1) -> int:
    """Total bytes of the distinct storages behind ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage._cdata] = int(math.ceil(storage.nbytes() / round_to) * round_to)
    return sum(seen.values())
