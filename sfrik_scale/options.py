"""Typed options that a plugin (a loss, an optimiser, a dataset) declares about itself.

The configuration is built from these declarations: each option becomes one key of its
section (``loss.sim_coeff``, ``optim.eta``, ``data.synthetic_size``) with its type, default,
help and checks, so that adding a plugin never means editing ``config.py``. Losses declare
theirs in their `sfrik_scale.losses.spec.LossSpec`; optimisers and datasets when they are
registered (``OPTIMIZERS.register("lars", summary=..., options=(Option(...), ...))``).

Example:
    >>> Option("eta", float, 0.02, "LARS trust coefficient.", minimum=0.0, strict=True).problem(0.0)
    'must be > 0, got 0.0'
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence, Tuple

__all__ = ["Option", "declarations", "in_unit_interval"]


@dataclass(frozen=True)
class Option:
    """One keyword argument of a plugin, as the configuration offers it (``<section>.<name>``).

    ``type`` is the value's type as the configuration parses it (``float``, ``int``,
    ``Tuple[float, ...]``); ``default`` is what a run gets when the key is left unset (for a
    loss, None means the class's own default). ``minimum`` with ``strict`` gives the check
    ">= minimum" or "> minimum"; ``check`` returns a message when a value is invalid, else None.
    """

    name: str
    type: Any
    default: Any
    help: str
    minimum: Optional[float] = None
    strict: bool = False
    check: Optional[Callable[[Any], Optional[str]]] = None

    def problem(self, value: Any) -> Optional[str]:
        """Why ``value`` is invalid for this option, or None (None values are always valid)."""
        if value is None:
            return None
        if self.minimum is not None:
            bad = not isinstance(value, (int, float)) or not math.isfinite(value) or (
                value <= self.minimum if self.strict else value < self.minimum)
            if bad:
                return f"must be {'>' if self.strict else '>='} {self.minimum:g}, got {value}"
        return self.check(value) if self.check is not None else None


def in_unit_interval(value: Any) -> Optional[str]:
    """Check of a number, or of each number of a tuple, in [0, 1) (momenta, Adam's betas)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if all(isinstance(v, (int, float)) and 0 <= v < 1 for v in values):
        return None
    return (f"each must be in [0, 1), got {values}" if isinstance(value, (list, tuple))
            else f"must be in [0, 1), got {value}")


def declarations(plugins: Iterable[Tuple[str, Sequence[Option]]]) -> dict[str, list[Tuple[str, Option]]]:
    """Every option name the plugins declare -> [(plugin name, its declaration), ...], in the
    order of first declaration; the plugins' section of the configuration is built from it."""
    table: dict[str, list[Tuple[str, Option]]] = {}
    for plugin, options in plugins:
        for option in options:
            table.setdefault(option.name, []).append((plugin, option))
    return table
