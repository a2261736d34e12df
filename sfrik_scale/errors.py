"""Errors a user can act on, and the one place that turns them into a line and an exit status.

Every command (``sfrik-scale COMMAND``, ``python -m sfrik_scale.pretrain``,
``python -m sfrik_scale.eval.cli``) runs its handler through :func:`run_command`:

* bad input (``ValueError`` and its kin ``ConfigError``, ``KeyError``, ``FileNotFoundError``)
  prints ``sfrik-scale COMMAND: error: MESSAGE`` on one line and returns exit status 2;
* a run failure raised by this package (a ``RuntimeError`` subclass defined in
  ``sfrik_scale``: a peer rank died, a checkpoint could not be written, the loss became
  non-finite) prints ``sfrik-scale COMMAND: NAME: MESSAGE`` and returns 1;
* anything else is a bug and keeps its traceback.

Nothing here imports the rest of the package, so every layer may raise these errors.
"""
from __future__ import annotations

import difflib
import sys
from typing import Any, Callable, Sequence

#: exit status of bad input (a config value, a path, an option)
EXIT_BAD_INPUT = 2
#: exit status of a run that failed on its own (a peer, the disk, divergence)
EXIT_RUN_FAILURE = 1
#: what counts as bad input
INPUT_ERRORS = (ValueError, KeyError, FileNotFoundError)


class ConfigError(ValueError):
    """An invalid configuration value; ``key`` is the dotted key at fault (``"train.epochs"``)."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}")


class RaisedOnEveryRank:
    """Mixin of errors that every rank raises alike, after agreeing through a collective: a rank
    reports its own message and does not blame its peers for failing with the same one."""


class StorageError(RaisedOnEveryRank, ValueError):
    """A folder the run must write to cannot be written (read-only, full, a file in the way)."""


class NonFiniteInputError(ValueError):
    """The embeddings given to a loss hold NaN or Inf (raised on every rank)."""


def one_line(message: object) -> str:
    """The message on one line: control characters a user typed (\\r, \\n, ...) are escaped."""
    return "".join(ch if ch.isprintable() or ch == " " else repr(ch)[1:-1] for ch in str(message))


def suggest(name: str, choices: Sequence[str], prefix: str = "") -> str:
    """`` (did you mean a or b?)`` for the choices close to ``name``, else an empty string."""
    close = difflib.get_close_matches(str(name), list(choices), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(prefix + c for c in close)}?)" if close else ""


def short(value: Any) -> str:
    """``repr(value)`` cut to 60 characters, for messages that quote what the user gave."""
    try:
        text = repr(value)
    except RecursionError:
        return "<deeply nested value>"
    return text if len(text) <= 60 else text[:57] + "..."


def is_run_failure(err: BaseException) -> bool:
    """A RuntimeError this package raised on purpose (its message tells the whole story)."""
    return isinstance(err, RuntimeError) and type(err).__module__.startswith("sfrik_scale")


def run_command(command: str, handler: Callable[[], Any]) -> int:
    """Run ``handler()`` and map its errors to one stderr line and an exit status (module docstring)."""
    try:
        return int(handler() or 0)
    except INPUT_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"sfrik-scale {command}: error: {one_line(message)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RuntimeError as err:
        if not is_run_failure(err):
            raise
        print(f"sfrik-scale {command}: {type(err).__name__}: {one_line(err)}", file=sys.stderr)
        return EXIT_RUN_FAILURE
