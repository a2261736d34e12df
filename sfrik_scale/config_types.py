"""Values of a run configuration checked against their field types: YAML and command-line
values converted where it is safe (an integer for a float, a list for a tuple) and otherwise
refused with a `ConfigError` naming the key, the expected type and what was given.

A leaf of `sfrik_scale.config`: it knows Python's typing, not the configuration's sections.
"""
from __future__ import annotations

import json
import math
import typing
from typing import Any, Literal, Union

from sfrik_scale.errors import ConfigError
from sfrik_scale.errors import short as _short
from sfrik_scale.errors import suggest as _suggest


def accepts_str(tp: Any) -> bool:
    if tp is str:
        return True
    return typing.get_origin(tp) is Union and str in typing.get_args(tp)


def type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is Union:
        return " or ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin is tuple:
        return "a list of numbers" if args[-1] is Ellipsis else f"a list of {len(args)} numbers"
    if origin is dict:
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked (and converted: int -> float, list -> tuple) against annotation ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    wrong = ConfigError(key, f"expected {type_name(tp)}, got {type(value).__name__} {_short(value)}")
    if tp is Any:
        return value
    if origin is Union:
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return coerce(value, inner, key)
    if origin is Literal:
        if isinstance(value, bool) or value not in args or type(value) not in {type(a) for a in args}:
            names = [str(a) for a in args]
            raise ConfigError(key, f"must be one of {', '.join(repr(a) for a in args)}, got {_short(value)}"
                                   f"{_suggest(str(value), names)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise wrong
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-6 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise wrong from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong
        try:
            value = float(value)
        except OverflowError:
            raise ConfigError(key, f"{_short(value)} is out of range") from None
        if not math.isfinite(value):
            raise ConfigError(key, f"must be finite, got {value}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {type(value).__name__} {_short(value)} (quote it)")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise wrong
        if args[-1] is not Ellipsis and len(value) != len(args):
            raise ConfigError(key, f"expected {len(args)} values, got {len(value)}")
        inner = args[0] if args[-1] is Ellipsis else None
        return tuple(coerce(v, inner or args[i], f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise wrong
        try:
            check_json_like(value, key)
            return json.loads(json.dumps(value))
        except RecursionError:
            raise ConfigError(key, "nested too deeply") from None
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in this module, not user input


def check_json_like(value: Any, key: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(key, f"mapping keys must be strings, got {_short(k)}")
            check_json_like(v, f"{key}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_json_like(v, f"{key}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(key, f"must be finite, got {value}")
    elif value is not None and not isinstance(value, (str, int, float, bool)):
        raise ConfigError(key, f"{type(value).__name__} values are not allowed here (JSON types only)")
