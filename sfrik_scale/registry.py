"""Name -> factory registries (models, losses, optimisers, datasets, augmentation sets).

A registry refuses duplicate names, so two plugins can never silently shadow each
other, and its error for an unknown name lists what is available. An entry may carry a
one-line ``summary`` (for help texts) and the typed `sfrik_scale.options.Option` s it takes
from the configuration, from which ``config.py`` builds that section's keys.
"""
from __future__ import annotations

from typing import Callable, Dict, Generic, Iterator, Sequence, Tuple, TypeVar

from sfrik_scale.options import Option, declarations

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of factories.

    Example:
        >>> LOSSES = Registry("loss")
        >>> @LOSSES.register("sfrik")
        ... def make_sfrik(**kw): ...
        >>> LOSSES.get("sfrik")
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: Dict[str, T] = {}
        self._summaries: Dict[str, str] = {}
        self._options: Dict[str, Tuple[Option, ...]] = {}

    def register(self, name: str, *, summary: str = "", options: Sequence[Option] = ()) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``, with a one-line ``summary`` and the
        configuration ``options`` it takes; a second registration raises ValueError."""

        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            self._summaries[name] = summary
            self._options[name] = tuple(options)
            return obj

        return decorator

    def get(self, name: str) -> T:
        """The factory registered as ``name``; KeyError naming the known entries otherwise."""
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise KeyError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def summary(self, name: str) -> str:
        """The entry's one-line description ("" when it was registered without one)."""
        self.get(name)
        return self._summaries[name]

    def options(self, name: str) -> Tuple[Option, ...]:
        """The configuration options the entry declared when it was registered."""
        self.get(name)
        return self._options[name]

    def option_declarations(self) -> dict[str, list[Tuple[str, Option]]]:
        """Every option name an entry declares -> [(entry name, its declaration), ...]
        (entries by name, options in their declared order)."""
        return declarations((name, self._options[name]) for name in self.names())

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
